"""Pre-quantized checkpoints: AWQ, GPTQ, compressed-tensors and FP8, read from their published layouts.

A checkpoint is pre-quantized when its config.json has a `quantization_config`. `scheme_for`
reads it; `QuantizedTensors` then wraps the checkpoint's tensor stream: the tensors of every
quantized linear module are held back, and at the end of the stream each module comes out as
one `<module>.weight` entry holding a `HostInt4`, `HostInt8` or float array. The loader keeps
`HostInt4` / `HostInt8` quantized on the device (`Int4Weight` / `Int8Weight`, the same path as
`quantization="int4"` / `"int8"`) and dequantizes them only for modules that are not a plain
linear kernel here (fused or per-expert tensors). FP8 weights come out as `HostFp8` (kept in
float8_e4m3fn as `Fp8Weight`, W8A8) where the scheme says `keep_fp8`, else dequantized on the host.

Layouts (HF linear weight `W [out, in]`; our kernel is `W.T [in, out]`; `q` unsigned 4-bit):
- AWQ (AutoAWQ GEMM, `quant_method: awq`, `version: gemm`): `qweight [in, out / 8]` int32 packed
  along output columns, nibble `i` of word `j` holding column `8 j + AWQ_ORDER[i]`
  (`AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]`); `qzeros [in / G, out / 8]` packed the same way;
  `scales [in / G, out]`. `W.T[r, c] = (q[r, c] - z[r // G, c]) * s[r // G, c]`.
- GPTQ (AutoGPTQ / GPTQModel, `quant_method: gptq`): `qweight [in / 8, out]` int32 packed along
  input rows (nibble `i` of word `j` is row `8 j + i`); `qzeros [in / G, out / 8]` packed along
  columns in order, holding `z - 1` in the v1 format (`checkpoint_format: gptq`, AutoGPTQ) and `z`
  in v2 (`gptq_v2`, GPTQModel); `scales [in / G, out]`; `g_idx [in]`, each row's group (rows
  out of group order with `desc_act`, act-order). `sym` only fixes z at 8.
- compressed-tensors `pack-quantized` (llm-compressor): `weight_packed [out, ceil(in / 8)]` int32,
  values `q_signed + 2^(bits-1)` packed densely along the input (nibble `i` of word `j` is input
  `8 j + i`); `weight_scale [out, in / G]` (`[out, 1]` per channel); asymmetric schemes add
  `weight_zero_point` packed the same way along the output dim (`[ceil(out / 8), in / G]`);
  `weight_shape = [out, in]`; `W = (q - zp) * scale`. 8-bit symmetric per-channel weights are
  kept as int8; other 8-bit schemes are dequantized.
- FP8: `weight [out, in]` float8_e4m3fn times `weight_scale` (compressed-tensors
  `float-quantized`: a scalar, `[out, 1]` or `[out, G]`) or times `weight_scale_inv`, one per
  128 x 128 block (`quant_method: fp8`, `weight_block_size`, as DeepSeek-V3 ships); read by
  `model_lib.quantization.fp8.from_checkpoint`. float8_e5m2 weights are always dequantized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from model_lib.quantization import fp8, int4
from model_lib.quantization.base import QuantizedWeight
from model_lib.quantization.fp8 import HostFp8
from model_lib.quantization.int8 import Int8Weight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = tuple(int(i) for i in np.argsort(AWQ_ORDER))  # column c of a word is nibble [c]
METHODS = ("awq", "gptq", "compressed-tensors", "fp8")
FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2")
MAX_BLOCK = 1 << 16  # a bound on FP8 block sides read from a config


class QuantizedCheckpointError(ValueError):
    """A pre-quantized checkpoint this loader cannot read as it is."""


@dataclass
class HostInt4:
    """An int4 weight in our `[in, out]` layout on the host: `q` 0..15, group `scales` and `zeros`, `perm`."""

    q: np.ndarray  # [in, out] uint8
    scales: np.ndarray  # [in / G, out] float32
    zeros: np.ndarray  # [in / G, out] integer
    perm: np.ndarray | None = None  # stored row -> original input row (act-order)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantized(self) -> np.ndarray:
        """The float32 HF weight `[out, in]`."""
        group = self.q.shape[0] // self.scales.shape[0]
        w = (self.q.astype(np.float32) - np.repeat(self.zeros, group, 0)) * np.repeat(self.scales, group, 0)
        if self.perm is not None:
            w = w[np.argsort(self.perm)]
        return np.ascontiguousarray(w.T)

    def to_weight(self, axes: Sequence[str | None] | None = None, head_size: int = 1) -> QuantizedWeight:
        return int4.from_values(self.q, self.scales, self.zeros, self.perm, axes=axes, head_size=head_size)


@dataclass
class HostInt8:
    """A symmetric per-output-channel int8 weight in our `[in, out]` layout on the host."""

    values: np.ndarray  # [in, out] int8
    scale: np.ndarray  # [out] float32

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape)

    def dequantized(self) -> np.ndarray:
        return np.ascontiguousarray((self.values.astype(np.float32) * self.scale).T)

    def to_weight(self, axes: Sequence[str | None] | None = None, head_size: int = 1) -> QuantizedWeight:
        return Int8Weight(self.values, self.scale, axes=axes, head_size=head_size)


HostQuantized = (HostInt4, HostInt8, HostFp8)


def unpack_int32(packed: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """int32 words -> `32 / bits` unsigned values each along `axis` (0 or -1), lowest bits first."""
    per = 32 // bits
    words = np.ascontiguousarray(packed).view(np.uint32)
    values = (words[..., None] >> (np.arange(per, dtype=np.uint32) * bits)) & np.uint32((1 << bits) - 1)
    if axis == 0:  # [rows / per, cols, per] -> [rows, cols]
        return values.transpose(0, 2, 1).reshape(-1, packed.shape[1]).astype(np.uint8)
    return values.reshape(*packed.shape[:-1], -1).astype(np.uint8)


def _float(array: np.ndarray) -> np.ndarray:
    return np.asarray(array).astype(np.float32)


def _groups_in_order(q: np.ndarray, scales: np.ndarray, zeros: np.ndarray, g_idx: np.ndarray | None,
                     module: str) -> HostInt4:
    """A `HostInt4` whose rows are sorted by group: `g_idx` (act-order) becomes a row permutation."""
    groups = scales.shape[0]
    size = q.shape[0] // groups
    if g_idx is None or np.array_equal(g_idx, np.arange(q.shape[0]) // size):
        return HostInt4(q, scales, zeros)
    g_idx = np.asarray(g_idx, np.int64)
    if g_idx.min() < 0 or g_idx.max() >= groups or np.any(np.bincount(g_idx, minlength=groups) != size):
        raise QuantizedCheckpointError(f"{module}.g_idx does not give each of the {groups} groups {size} rows")
    perm = np.argsort(g_idx, kind="stable")
    return HostInt4(q[perm], scales, zeros, perm.astype(np.int32))


@dataclass(frozen=True)
class Scheme:
    """What a `quantization_config` says, as far as reading the tensors needs it."""

    method: str
    bits: int = 4
    gptq_v1: bool = True  # GPTQ qzeros hold z - 1
    pack_format: str = "pack-quantized"  # compressed-tensors: pack-quantized or float-quantized
    block: tuple[int, int] | None = None  # FP8 `weight_block_size` (rows, columns of the HF weight)
    keep_fp8: bool = False  # FP8 e4m3 weights stay FP8 (`HostFp8`) instead of being dequantized

    @property
    def fp8(self) -> bool:
        """Whether the scheme's weights are FP8 (`quant_method: fp8` or compressed-tensors `float-quantized`)."""
        return self.method == "fp8" or self.pack_format == "float-quantized"

    @property
    def leaves(self) -> tuple[str, ...]:
        """Tensor leaf names that belong to a quantized module (`weight` too where it is FP8)."""
        if self.method in ("awq", "gptq"):
            return ("qweight", "qzeros", "scales", "g_idx")
        if self.method == "compressed-tensors":
            return ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx", "input_scale")
        return ("weight_scale_inv", "weight_scale", "input_scale")

    def convert(self, module: str, tensors: dict[str, np.ndarray]) -> Any:
        """One module's tensors -> a `HostInt4`, `HostInt8` or float `[out, in]` array."""
        if "weight" in tensors and str(tensors["weight"].dtype) in FP8_DTYPES:
            return _fp8(module, tensors, self.block, self.keep_fp8)
        if self.method in ("awq", "gptq"):
            return (_awq if self.method == "awq" else _gptq)(module, tensors, self)
        if "weight_packed" in tensors:
            return _packed(module, tensors, self)
        raise QuantizedCheckpointError(f"{module}: tensors {sorted(tensors)} match no {self.method} layout")


def _need(module: str, tensors: dict[str, np.ndarray], *names: str) -> list[np.ndarray]:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise QuantizedCheckpointError(f"quantized module {module} lacks {', '.join(f'{module}.{n}' for n in missing)}")
    return [tensors[n] for n in names]


def _awq(module: str, tensors: dict[str, np.ndarray], scheme: Scheme) -> HostInt4:
    qweight, qzeros, scales = _need(module, tensors, "qweight", "qzeros", "scales")
    reorder = lambda words: unpack_int32(words, 4, -1).reshape(words.shape[0], -1, 8)[..., AWQ_REVERSE_ORDER]  # noqa: E731
    q = reorder(qweight).reshape(qweight.shape[0], -1)
    zeros = reorder(qzeros).reshape(qzeros.shape[0], -1)
    return _groups_in_order(q, _float(scales), zeros, None, module)


def _gptq(module: str, tensors: dict[str, np.ndarray], scheme: Scheme) -> HostInt4:
    qweight, qzeros, scales = _need(module, tensors, "qweight", "qzeros", "scales")
    q = unpack_int32(qweight, 4, 0)
    zeros = unpack_int32(qzeros, 4, -1).astype(np.int32) + (1 if scheme.gptq_v1 else 0)
    return _groups_in_order(q, _float(scales), zeros, tensors.get("g_idx"), module)


def _packed(module: str, tensors: dict[str, np.ndarray], scheme: Scheme) -> Any:
    packed, scale, shape = _need(module, tensors, "weight_packed", "weight_scale", "weight_shape")
    out, width = (int(v) for v in np.asarray(shape).reshape(-1))
    offset = 1 << (scheme.bits - 1)
    q = unpack_int32(packed, scheme.bits, -1)[:, :width]  # [out, in], unsigned
    scale = _float(scale).reshape(out, -1)  # [out, in / G]
    if "weight_zero_point" in tensors:
        zp = np.asarray(tensors["weight_zero_point"])
        if zp.dtype == np.int32 and zp.shape[0] != out:  # packed along the output dim
            zp = unpack_int32(zp, scheme.bits, 0)[:out].astype(np.int32)
        else:
            zp = zp.astype(np.int32).reshape(out, -1) + offset
    else:
        zp = np.full(scale.shape, offset, np.int32)
    if scheme.bits == 8 and scale.shape[1] == 1 and np.all(zp == offset):
        return HostInt8((q.astype(np.int16) - offset).astype(np.int8).T.copy(), scale[:, 0].copy())
    if scheme.bits == 4:
        return _groups_in_order(np.ascontiguousarray(q.T), np.ascontiguousarray(scale.T),
                                np.ascontiguousarray(zp.T), tensors.get("weight_g_idx"), module)
    group = width // scale.shape[1]
    return ((q.astype(np.float32) - np.repeat(zp, group, 1)) * np.repeat(scale, group, 1)).astype(np.float32)


def _fp8(module: str, tensors: dict[str, np.ndarray], block: tuple[int, int] | None, keep: bool) -> Any:
    weight = tensors["weight"]
    if "weight_scale_inv" in tensors:  # one scale per block
        scale = tensors["weight_scale_inv"]
        block = block or tuple(math.ceil(n / s) for n, s in zip(weight.shape, scale.shape))
    else:
        (scale,), block = _need(module, tensors, "weight_scale"), None
    if str(weight.dtype) != "float8_e4m3fn":  # e5m2 values do not all fit e4m3: dequantized
        keep, weight = False, weight.astype(np.float32)
    try:
        host = fp8.from_checkpoint(module, weight, scale, block)
    except fp8.Fp8Error as error:
        raise QuantizedCheckpointError(str(error)) from None
    return host if keep else host.dequantized()


def scheme_for(hf_config: dict[str, Any]) -> Scheme | None:
    """The pre-quantization scheme of a checkpoint's config.json, or None for a float checkpoint."""
    qc = hf_config.get("quantization_config")
    if not qc:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method not in METHODS:
        raise QuantizedCheckpointError(f"quantization_config quant_method {method!r} is not supported; "
                                       f"supported: {', '.join(METHODS)}")
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        bits = int(qc.get("bits", qc.get("w_bit", 4)))
        if version != "gemm" or bits != 4 or not qc.get("zero_point", True):
            raise QuantizedCheckpointError(f"AWQ version {version!r} with {bits} bits, zero_point="
                                           f"{qc.get('zero_point', True)}: only 4-bit GEMM with zero points is read")
        return Scheme("awq")
    if method == "gptq":
        bits = int(qc.get("bits", 4))
        if bits != 4:
            raise QuantizedCheckpointError(f"GPTQ with {bits} bits is not supported (4 only)")
        fmt = str(qc.get("checkpoint_format", qc.get("format", "gptq"))).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise QuantizedCheckpointError(f"GPTQ checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
        return Scheme("gptq", gptq_v1=fmt == "gptq")
    if method == "compressed-tensors":
        groups = list((qc.get("config_groups") or {}).values())
        formats = {str(g.get("format") or qc.get("format") or "") for g in groups} or {str(qc.get("format", ""))}
        bits = {int((g.get("weights") or {}).get("num_bits", 4)) for g in groups} or {4}
        types = {str((g.get("weights") or {}).get("type", "int")) for g in groups}
        if len(formats) != 1 or len(bits) != 1:
            raise QuantizedCheckpointError(f"compressed-tensors groups mix formats {sorted(formats)} / bits {sorted(bits)}")
        fmt, (num_bits,) = formats.pop(), bits
        if fmt == "pack-quantized" and num_bits in (4, 8) and types <= {"int"}:
            return Scheme("compressed-tensors", bits=num_bits, pack_format=fmt)
        if fmt == "float-quantized" and num_bits == 8 and types <= {"float"}:
            return Scheme("compressed-tensors", bits=8, pack_format=fmt)
        raise QuantizedCheckpointError(f"compressed-tensors format {fmt!r} with {num_bits}-bit {sorted(types)} weights "
                                       "is not supported (pack-quantized int4/int8, float-quantized FP8)")
    block = qc.get("weight_block_size")
    if block is not None and (len(block) != 2 or not all(1 <= int(b) <= MAX_BLOCK for b in block)):
        raise QuantizedCheckpointError(f"fp8 weight_block_size {block} must be two sides in [1, {MAX_BLOCK}]")
    return Scheme("fp8", bits=8, block=None if block is None else (int(block[0]), int(block[1])))


class QuantizedTensors:
    """Wraps a `(file, name, array)` stream: quantized modules come out last, one `<module>.weight` each."""

    def __init__(self, scheme: Scheme, tensors: Iterator[tuple[Path, str, np.ndarray]]):
        self.scheme, self.tensors = scheme, tensors

    def __iter__(self) -> Iterator[tuple[Path, str, Any]]:
        held: dict[str, dict[str, np.ndarray]] = {}
        files: dict[str, Path] = {}
        for file, name, array in self.tensors:
            module, _, leaf = name.rpartition(".")
            fp8 = leaf == "weight" and str(array.dtype) in FP8_DTYPES
            if leaf in self.scheme.leaves or fp8:
                held.setdefault(module, {})[leaf] = array
                files[module] = file
            else:
                yield file, name, array
        for module, tensors in held.items():
            if set(tensors) <= {"input_scale"}:
                continue  # a static activation scale alone: activations are quantized per token instead
            yield files[module], f"{module}.weight", self.scheme.convert(module, tensors)
