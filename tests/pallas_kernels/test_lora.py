"""Many-adapter LoRA product: the sorted grouped-matmul form (ragged_dot, and the Triton kernels in
interpret mode) against the per-token gathered reference; tokens without an adapter get zeros."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lora import lora_delta, reference

T, K, R, N, L = 24, 32, 16, 48, 3


def _inputs(seed: int, slots: list[int]):
    rng = np.random.RandomState(seed)
    x = jnp.asarray(rng.randn(len(slots), K), jnp.float32)
    a = jnp.asarray(rng.randn(L, K, R) * 0.3, jnp.float32)
    b = jnp.asarray(rng.randn(L, R, N) * 0.3, jnp.float32)
    return x, a, b, jnp.asarray(slots, jnp.int32)


# Interleaved adapters, tokens with none (-1) and out of range (L), an adapter no token uses.
SLOTS = {
    "mixed": [2, -1, 0, 0, 2, 1, -1, 2, 0, 1, 1, 2, -1, 0, 3, 2, 1, 0, 0, 0, 2, -1, 1, 2],
    "one_adapter": [1] * T,
    "no_adapter": [-1] * T,
}


@pytest.mark.parametrize("implementation", ["reference", "interpret"])
@pytest.mark.parametrize("case", sorted(SLOTS))
def test_grouped_form_matches_per_token_reference(case, implementation):
    x, a, b, slots = _inputs(0, SLOTS[case])
    expected = reference.lora_delta(x, a, b, slots)
    options = dict(block_m=16, block_n=16, block_k=16) if implementation == "interpret" else {}
    got = jax.jit(lambda *args: lora_delta(*args, implementation=implementation, **options))(x, a, b, slots)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=2e-5, atol=2e-5)
    dense = np.einsum("tk,tkr,trn->tn", np.asarray(x), np.asarray(a)[np.clip(slots, 0, L - 1)],
                      np.asarray(b)[np.clip(slots, 0, L - 1)])
    valid = (np.asarray(slots) >= 0) & (np.asarray(slots) < L)
    np.testing.assert_allclose(np.asarray(got), np.where(valid[:, None], dense, 0), rtol=1e-4, atol=1e-4)
    assert np.abs(np.asarray(got)[~valid]).max(initial=0) == 0


def test_shapes_are_checked():
    x, a, b, slots = _inputs(1, SLOTS["mixed"])
    with pytest.raises(ValueError, match="slots \\[T\\]"):
        lora_delta(x, a, b, slots[:5])
    with pytest.raises(ValueError, match="stacks do not fit"):
        lora_delta(x, a, b[:, :8], slots)


@pytest.mark.parametrize("tokens", [8, T])  # the CPU's gather form (decode-sized steps), then the grouped one
def test_default_path_matches_reference(tokens):
    x, a, b, slots = _inputs(2, SLOTS["mixed"][:tokens])
    got = jax.jit(lora_delta)(x, a, b, slots)
    np.testing.assert_allclose(np.asarray(got), np.asarray(reference.lora_delta(x, a, b, slots)), rtol=2e-5, atol=2e-5)
