"""Multi-token-prediction blocks (DeepSeek-V3, GLM-4.5) as our speculative draft runs them, against
transformers' own `MtpModel` (what `generate(use_mtp=True)` drafts with) on the same checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import model_lib
from tests.spec_drafts import add_mtp_block
from tests.tiny_models import SEQ_LEN, random_ids

# (tiny case, whether its block carries copies of the embeddings and head: DeepSeek-V3's do, GLM-4.6's not)
MTP_CASES = [("deepseek_v3-noaux-yarn", True), ("glm4_moe-grouped-sigmoid", False)]


@pytest.mark.parametrize("case, copies", MTP_CASES)
def test_mtp_draft_matches_transformers(tiny_checkpoint, tmp_path, case, copies):
    import jax.numpy as jnp
    import transformers
    from transformers.modeling_layers import MtpModel

    from model_lib.families.deepseek_mtp import MTPDraft
    from model_lib.layers import DenseBatch

    folder = tmp_path / "checkpoint"
    add_mtp_block(tiny_checkpoint(case)[0], folder, copies=copies)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    n = reference.config.num_hidden_layers
    # transformers finds the block by the published checkpoints' index (61; 46 or 92): point it at ours.
    reference._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{n}\..*"]
    reference_mtp = MtpModel.from_pretrained(reference).float().eval()

    ids = random_ids(2, SEQ_LEN, seed=3)
    steps = SEQ_LEN - 1  # position p reads token p + 1 and the target's final normed state at p
    with torch.no_grad():
        hidden = reference.model(torch.as_tensor(ids)).last_hidden_state
        positions = torch.arange(steps)[None].expand(2, -1)
        out = reference_mtp.forward_layer(0, hidden[:, :-1], positions, None, input_ids=torch.as_tensor(ids[:, 1:]))
        want = reference_mtp._project_to_logits(out).numpy()

    model = model_lib.from_pretrained(folder)
    assert len(model.mtp) == 1
    draft = MTPDraft(model)
    assert draft.capture_layers() == (n,)
    ones = jnp.ones((2, SEQ_LEN), jnp.int32)
    batch = DenseBatch(positions=jnp.broadcast_to(jnp.arange(SEQ_LEN), (2, SEQ_LEN)), segment_ids=ones,
                       seq_lens=jnp.full((2, SEQ_LEN), SEQ_LEN))
    _, _, captured = model.model(jnp.asarray(ids), batch, capture=(n,))
    np.testing.assert_allclose(np.asarray(captured), hidden.numpy(), atol=1e-4)
    shifted = DenseBatch(positions=batch.positions[:, :steps], segment_ids=ones[:, :steps],
                         seq_lens=jnp.full((2, steps), steps))
    out, _ = draft(jnp.asarray(ids[:, 1:]), captured[:, :-1], shifted, None, True)
    got = np.asarray(draft.logits(out))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
    assert (got.argmax(-1) == want.argmax(-1)).all()
