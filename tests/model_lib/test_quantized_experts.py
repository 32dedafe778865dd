"""Weight-only int8 / int4 MoE expert stacks (`quantization="int8"` / `"int4"` on an MoE model).

Every expert is quantized alone (int8 per output channel, int4 in groups of the input rows) and
the stack is held as one `StackedWeight`. The quantized model must match, tightly, a float model
holding its own dequantized weights (the grouped matmul on the dequantized stack is the
reference path), and the float model it was quantized from within a stated tolerance: max
|logit difference| <= 3% (int8) / 25% (int4) of the logit scale. The int4 bound is loose because
these tiny random weights are the worst case for it: the 64-wide inputs make one group per
column, over uniform random values.
"""

from __future__ import annotations

import numpy as np
import pytest

import model_lib
from model_lib.layers.moe import expert_layers
from model_lib.lora import linear_layers, param_bytes
from model_lib.quantization import Int4Weight, Int8Weight
from model_lib.quantization.stacked import StackedWeight
from tests.tiny_models import assert_logits_close, random_ids

pytestmark = pytest.mark.xdist_group("quantized_experts")

# method -> (stored format of each expert, tolerance against the float model as a fraction of the logit scale)
METHODS = {"int8": (Int8Weight, 0.03), "int4": (Int4Weight, 0.25)}


def _with_dequantized_weights(quantized, float_model):
    """`float_model` with every quantized kernel of `quantized` replaced by its float32 dequantized form."""
    import jax.numpy as jnp

    for source, target in ((linear_layers(quantized), linear_layers(float_model)),
                           (expert_layers(quantized), expert_layers(float_model))):
        for path, layer in source.items():
            if layer.quantized is not None:
                target[path].kernel.set_value(layer.quantized.dequantize(jnp.float32))
    return float_model


@pytest.mark.parametrize("method", sorted(METHODS))
def test_quantized_experts_match_their_dequantized_weights(method, tiny_checkpoint, forward):
    storage, tolerance = METHODS[method]
    folder, _ = tiny_checkpoint("qwen2_moe-shared")
    quantized = model_lib.from_pretrained(folder, quantization=method)
    experts = expert_layers(quantized)
    assert experts
    for layer in experts.values():
        assert isinstance(layer.quantized, StackedWeight) and isinstance(layer.quantized.stack, storage)
        assert layer.kernel is None and layer.quantized.shape[0] == 4
    float_model = model_lib.from_pretrained(folder)
    assert param_bytes(quantized) < 0.4 * param_bytes(float_model)

    ids = random_ids(2, 12, seed=4)
    mask = np.ones_like(ids)
    ours = np.asarray(forward(quantized, ids, mask))
    reference = np.asarray(forward(float_model, ids, mask))
    assert_logits_close(ours, reference, rel=tolerance)
    own = np.asarray(forward(_with_dequantized_weights(quantized, float_model), ids, mask))
    assert_logits_close(ours, own, rel=1e-5)
