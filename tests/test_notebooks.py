"""Every notebook in notebooks/ runs top to bottom on the CPU with the bundled model."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_the_notebooks_are_the_documented_ones():
    assert [p.stem for p in NOTEBOOKS] == ["lora_finetuning", "quickstart", "serving_openai"]
    readme = (REPO / "README.md").read_text()
    assert all(f"notebooks/{p.name}" in readme for p in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    # The kernel starts while the other test worker keeps both cores busy: allow it more than nbclient's 60 s.
    client = NotebookClient(
        notebook, timeout=900, startup_timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    )
    client.execute()
    outputs = "".join(
        out.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    )
    assert "Traceback" not in outputs
