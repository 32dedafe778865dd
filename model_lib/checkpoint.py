"""Hugging Face checkpoint I/O: config.json + safetensors (single or sharded).

Loading streams tensor by tensor: each is read from the memory-mapped file,
renamed/split/transposed by the family's weight map, converted to the target
dtype, checked against the shape the config implies, and placed on the device
mesh (only each device's own shard is copied) before the next one is read.

Errors name the checkpoint file and the tensor: missing, unexpected, wrongly
shaped or truncated tensors, a missing config, an unknown architecture.
"""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path
from typing import Any, Container, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from model_lib.config import ModelConfig
from model_lib.gguf import is_gguf_file, iter_gguf_tensors, load_gguf_config
from model_lib.quantization import NF4Weight, QuantizedWeight, QuantState, nf4_storage_axes, quantize_nf4_host
from model_lib.quantization.checkpoints import HostQuantized, QuantizedTensors, Scheme
from model_lib.quantization.gguf_blocks import HostGGUFBlocks
from model_lib.quantization.stacked import StackedWeight
from model_lib.registry import Family, get_family
from model_lib.sharding import ShardingPlan, shard_quantized

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded as it is."""


def read_config_json(path: Path) -> dict[str, Any]:
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(f"no {CONFIG_FILE} in checkpoint folder {path}")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file} is not valid JSON: {e}") from None


def architecture_in(path: str | Path, table: Container[str]) -> str | None:
    """The checkpoint folder's architecture if `table` holds it (None otherwise, or for a GGUF file)."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        return None
    architectures = read_config_json(path).get("architectures") or []
    return architectures[0] if architectures and architectures[0] in table else None


def read_hf_config(path: Path, table: Container[str], what: str) -> tuple[dict[str, Any], str, Any]:
    """(config.json, its architecture, the transformers config) of a checkpoint whose architecture `table`
    holds; `CheckpointError` naming the supported ones (`what`: "a pooling model", ...) otherwise."""
    from transformers import AutoConfig

    raw = read_config_json(path)
    architecture = (raw.get("architectures") or [None])[0]
    if architecture not in table:
        raise CheckpointError(f"{path}: architecture {architecture!r} is not {what}; supported: "
                              f"{', '.join(sorted(table))}")
    return raw, architecture, AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)


def resolve_dtype(dtype: Any, hf_config: dict[str, Any]) -> str:
    """Requested dtype, else the checkpoint's own if it is a float type we run, else float32."""
    if dtype is None:
        stored = str(hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32")
        name = stored.removeprefix("torch.")
        return name if name in SUPPORTED_DTYPES else "float32"
    name = jnp.dtype(dtype).name
    if name not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; use one of {SUPPORTED_DTYPES}")
    return name


def load_config(path: str | Path, dtype: Any = None) -> tuple[ModelConfig, Family]:
    """`ModelConfig` and family of a checkpoint folder or GGUF file, without reading any weights."""
    from transformers import AutoConfig, PretrainedConfig

    path = Path(path)
    if is_gguf_file(path):
        return load_gguf_config(path, dtype)
    raw = read_config_json(path)
    architectures = raw.get("architectures") or []
    if not architectures:
        raise CheckpointError(f"{path / CONFIG_FILE} names no 'architectures'")
    family = get_family(architectures[0])
    if family.remote_code:
        # Only remote code knows this model_type; its config.json is read as plain fields.
        # A plain config standardises legacy rotary keys (`rope_scaling`, `rope_theta`) into
        # `rope_parameters` only once its other fields exist, so they are set afterwards.
        hf = PretrainedConfig.from_dict(copy.deepcopy({k: v for k, v in raw.items() if k != "rope_scaling"}))
        if raw.get("rope_scaling") or "rope_theta" in raw:
            hf.rope_parameters = dict(raw.get("rope_scaling") or {"rope_type": "default"})
            hf.standardize_rope_params()
        config = family.config_from_hf(hf, architectures[0]).replace(hf_config_json=json.dumps(raw, sort_keys=True))
    else:
        hf = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        config = family.config_from_hf(hf, architectures[0])
    config = _mtp_layers_held(config, path)
    return config.replace(dtype=resolve_dtype(dtype, raw)), family.for_config(config)


def tensor_names(path: Path) -> list[str]:
    """Names of the checkpoint's tensors, from its index or the file headers (no tensor is read)."""
    index = path / INDEX_FILE
    if index.is_file():
        return list(json.loads(index.read_text()).get("weight_map", {}))
    return [name for file in checkpoint_files(path) for name in _header(file)[1] if name != "__metadata__"]


def _mtp_layers_held(config: ModelConfig, path: Path) -> ModelConfig:
    """No MTP block where the checkpoint holds none of `model.layers.{num_layers}` (transformers saves
    DeepSeek-V3 without it whatever `num_nextn_predict_layers` says); a config alone keeps its count."""
    if not config.num_mtp_layers or not any(path.glob("*.safetensors")):
        return config
    prefix = f"model.layers.{config.num_layers}."
    return config if any(name.startswith(prefix) for name in tensor_names(path)) else config.replace(num_mtp_layers=0)


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, from its index if it is sharded."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [path / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{index} lists {file.name}, which is missing")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no safetensors weights in checkpoint folder {path}")
    return files


def _header(file: Path) -> tuple[int, dict[str, Any]]:
    """(header length, header) of a safetensors file."""
    with file.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{file} is truncated: no safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        if 8 + header_len > file.stat().st_size:
            raise CheckpointError(f"{file} is truncated inside its header ({file.stat().st_size} bytes)")
        return header_len, json.loads(f.read(header_len))


def _check_complete(file: Path, header_len: int, header: dict[str, Any]) -> None:
    """Name the first tensor that a truncated file cuts off (safetensors only says 'incomplete')."""
    data_size = file.stat().st_size - 8 - header_len
    for name, info in header.items():
        if name != "__metadata__" and info["data_offsets"][1] > data_size:
            raise CheckpointError(
                f"tensor {name!r} in {file} is truncated: needs bytes up to {info['data_offsets'][1]}, "
                f"the file holds {data_size}"
            )


# safetensors dtypes numpy has no type for (FP8 checkpoints): read from the bytes as ml_dtypes.
RAW_DTYPES = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _read_raw(file: Path, header_len: int, info: dict[str, Any]) -> np.ndarray:
    import ml_dtypes

    start, end = info["data_offsets"]
    data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + header_len + start, shape=(end - start,))
    return np.asarray(data).view(getattr(ml_dtypes, RAW_DTYPES[info["dtype"]])).reshape(info["shape"])


def iter_tensors(path: Path) -> Iterator[tuple[Path, str, np.ndarray]]:
    """(file, name, host array) for every tensor of the checkpoint, one at a time."""
    for file in checkpoint_files(path):
        header_len, header = _header(file)
        _check_complete(file, header_len, header)
        try:
            with safe_open(file, framework="numpy") as f:
                for name in f.keys():
                    info = header[name]
                    raw = info["dtype"] in RAW_DTYPES
                    yield file, name, _read_raw(file, header_len, info) if raw else f.get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"cannot read {file}: {e}") from None


def abstract_params(model: nnx.Module) -> dict[str, nnx.Variable]:
    """Parameter path ('model.layers.0.mlp.up_proj.kernel') -> variable."""
    _, state = nnx.split(model)
    return {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}


def _swap_last(array: np.ndarray) -> np.ndarray:
    """HF linear `[..., out, in]` <-> our kernel `[..., in, out]` (`.T` for 2-D, per expert for stacks)."""
    return np.swapaxes(array, -1, -2)


def _to_ours(
    name: str, tensor: np.ndarray, family: Family, config: ModelConfig, expected: dict[str, nnx.Variable]
) -> list[tuple[str, np.ndarray, int | None]]:
    """One HF tensor -> our (path, array, expert index or None) triples, in our layout.

    A stacked parameter's per-expert pieces come back one at a time with their expert index.
    """
    weight_map = family.weight_map
    module, _, leaf = weight_map.tensor_to_ours(name).rpartition(".")
    if weight_map.is_expert_rows(module):
        tensor = tensor.reshape(config.num_experts, -1, *tensor.shape[1:])
    if leaf == "weight" and weight_map.is_conv1d(module):
        tensor = _swap_last(tensor)
    elif leaf == "weight" and weight_map.is_either_layout(module) and tensor.shape[-1] != _input_width(
            module, family, expected):
        tensor = _swap_last(tensor)  # stored [in, out]
    stacked = weight_map.stacked_for_hf(module)
    if stacked is not None:
        ours, expert = stacked
        if leaf == "weight" and f"{ours}.kernel" in expected:
            return [(f"{ours}.kernel", _swap_last(tensor), expert)]
        return [(f"{ours}.{leaf}", tensor, expert)]
    fused = weight_map.fused_for_hf(module)
    if fused is not None:
        spec, modules = fused
        try:
            targets = list(zip(modules, spec.split(tensor, config)))
        except ValueError as e:
            raise CheckpointError(f"tensor {name!r} has shape {tensor.shape}: {e}") from None
    else:
        targets = [(weight_map.module_to_ours(module), tensor)]
    out = []
    for ours, array in targets:
        if leaf == "weight" and f"{ours}.kernel" in expected:
            out.append((f"{ours}.kernel", _swap_last(array), None))  # HF linear [out, in] -> kernel [in, out]
        else:
            out.append((f"{ours}.{leaf}", array, None))
    return out


def _input_width(hf_module: str, family: Family, expected: dict[str, nnx.Variable]) -> int:
    """The input width of the linear (or of the first part of the fused linear) `hf_module` loads into."""
    fused = family.weight_map.fused_for_hf(hf_module)
    ours = fused[1][0] if fused is not None else family.weight_map.module_to_ours(hf_module)
    return expected[f"{ours}.kernel"].shape[-2]


def _hf_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = tuple(shape)
    return (*shape[:-2], shape[-1], shape[-2]) if key.endswith(".kernel") and len(shape) >= 2 else shape


def quantize_and_place(array: np.ndarray, variable: nnx.Variable, plan: ShardingPlan | None) -> NF4Weight:
    """NF4 form of one kernel read from the checkpoint, placed (sharded like the kernel) on the mesh.

    Quantized on the host a few rows at a time from the checkpoint's own array (a transposed
    view is fine); the full-precision kernel never reaches the device.
    """
    metadata = variable.get_metadata()
    axes, head_size = metadata.get("logical_axes"), metadata.get("head_size", 1)
    host = quantize_nf4_host(array, variable.get_value().dtype)
    storage = nf4_storage_axes(host.shape, axes, head_size)

    def put(name: str, value: np.ndarray) -> jax.Array:
        if plan is None:
            return jnp.asarray(value)
        meta = storage.get(name, {"logical_axes": (None,) * value.ndim, "head_size": 1})
        return plan.place(value, sharding=plan.sharding(meta["logical_axes"], value.shape, meta["head_size"]))

    return NF4Weight(
        put("packed", host.packed), put("absmax_q", host.absmax_q), put("absmax_scale", host.absmax_scale),
        put("offset", np.asarray(host.offset, np.float32)), host.shape, axes=axes, head_size=head_size,
    )


HOST_QUANTIZED = (*HostQuantized, HostGGUFBlocks)


def _expert_kernel(hf_key: str, family: Family, expected: dict[str, nnx.Variable]) -> tuple[str, int] | None:
    """(our stacked kernel key, expert) for an HF per-expert linear `<experts.e.module>.weight` (not fused or Conv1D)."""
    weight_map = family.weight_map
    module, _, leaf = weight_map.tensor_to_ours(hf_key).rpartition(".")
    stacked = weight_map.stacked_for_hf(module)
    if leaf != "weight" or stacked is None or weight_map.is_expert_rows(module) or weight_map.is_conv1d(module):
        return None
    key = f"{stacked[0]}.kernel"
    return (key, stacked[1]) if key in expected else None


EMBEDDING_TABLE = "model.embed_tokens.weight"


def _block_table(hf_key: str, tensor: Any, family: Family, expected: dict[str, nnx.Variable]) -> str | None:
    """The token embedding's key for its GGUF blocks, kept as the `[features, vocab]` kernel of the tied head."""
    if not isinstance(tensor, HostGGUFBlocks) or family.weight_map.tensor_to_ours(hf_key) != EMBEDDING_TABLE:
        return None
    return EMBEDDING_TABLE if EMBEDDING_TABLE in expected else None


def _kernel_shape(key: str, expected: dict[str, nnx.Variable]) -> tuple[int, ...]:
    """The `[in, out]` shape a quantized weight for `key` holds (an embedding table's transposed)."""
    shape = tuple(expected[key].shape)
    return shape[::-1] if key == EMBEDDING_TABLE else shape


def _plain_kernel(hf_key: str, family: Family, expected: dict[str, nnx.Variable]) -> str | None:
    """Our kernel key for an HF linear `<module>.weight` that maps one-to-one (not fused, stacked, Conv1D or
    of either layout)."""
    weight_map = family.weight_map
    module = weight_map.tensor_to_ours(hf_key).rpartition(".")[0]
    if (weight_map.is_expert_rows(module) or weight_map.is_conv1d(module) or weight_map.stacked_for_hf(module)
            or weight_map.fused_for_hf(module) or weight_map.is_either_layout(module)):
        return None
    key = f"{weight_map.module_to_ours(module)}.kernel"
    return key if key in expected else None


def _stack_pieces(pieces: list[Any]) -> np.ndarray | StackedWeight:
    """Per-expert pieces of one stacked kernel: a `StackedWeight` when all are quantized alike, else float32."""
    if all(isinstance(p, HOST_QUANTIZED) for p in pieces):
        try:
            return StackedWeight([p.to_weight() for p in pieces])
        except ValueError:
            pass  # experts quantized in different layouts: read as the float weights they stand for
    return np.stack([p.dequantized().T if isinstance(p, HOST_QUANTIZED) else p for p in pieces])


def load_params(
    model: nnx.Module,
    family: Family,
    path: Path,
    plan: ShardingPlan | None,
    *,
    quantize: frozenset[str] = frozenset(),
    scheme: Scheme | None = None,
    gguf_blocks: bool = False,
) -> dict[str, jax.Array | QuantizedWeight]:
    """Read every tensor the abstract `model` expects from a checkpoint folder or GGUF file, converted and placed.

    Kernels whose keys are in `quantize` come back as `NF4Weight`s, quantized as they are read. With
    a pre-quantization `scheme`, its int4 / int8 linear weights come back as `Int4Weight` / `Int8Weight`
    and FP8 ones as `Fp8Weight` where the scheme keeps them (dequantized where the module is not a
    plain linear kernel here), and with `gguf_blocks` a GGUF file's Q4_0 / Q4_1 / Q8_0 ones as
    `GGUFBlockWeight`s (per-expert pieces of a stacked expert kernel as one `StackedWeight`;
    dequantized where the module is neither).
    """
    config: ModelConfig = model.config
    expected = abstract_params(model)
    loaded: dict[str, jax.Array] = {}
    sources: dict[str, str] = {}
    # Per-expert pieces of stacked parameters, held until the last expert arrives.
    pending: dict[str, dict[int, np.ndarray]] = {}

    def place(key: str, array: np.ndarray) -> None:
        variable = expected[key]
        if key in quantize:
            loaded[key] = quantize_and_place(array, variable, plan)
            return
        array = np.ascontiguousarray(array.astype(variable.get_value().dtype, copy=False))
        if plan is None or "logical_axes" not in variable.get_metadata():
            loaded[key] = jnp.asarray(array) if plan is None else plan.place(array)
        else:
            loaded[key] = plan.place(array, sharding=plan.variable_sharding(variable, array.shape))

    if is_gguf_file(path):
        tensors = iter_gguf_tensors(path, family, config, expected, keep_blocks=gguf_blocks)
    else:
        tensors = iter_tensors(path)
    if scheme is not None:
        tensors = QuantizedTensors(scheme, tensors)
    for file, name, tensor in tensors:
        hf_key = family.weight_map.canonical(name)
        if family.weight_map.is_ignored(hf_key) or (
            config.tie_word_embeddings and family.weight_map.module_to_ours(hf_key.rpartition(".")[0]) == "lm_head"
        ):
            continue
        targets = None
        if isinstance(tensor, HOST_QUANTIZED):
            key = _plain_kernel(hf_key, family, expected) or _block_table(hf_key, tensor, family, expected)
            piece = _expert_kernel(hf_key, family, expected) if key is None else None
            if piece is not None:  # a stacked expert's piece, held below until its experts are complete
                targets = [(piece[0], tensor, piece[1])]
            elif key is None:
                tensor = tensor.dequantized()  # a fused module: read as the float weight it stands for
            else:
                if key in loaded:
                    raise CheckpointError(f"tensor {name!r} in {file} duplicates one from {sources.get(key)}")
                if tensor.shape != _kernel_shape(key, expected):
                    raise CheckpointError(f"quantized {name!r} in {file} holds shape {_hf_shape(key, tensor.shape)}, "
                                          f"the config implies {_hf_shape(key, tuple(expected[key].shape))}")
                sources[key] = f"{file.name}:{name}"
                meta = expected[key].get_metadata()
                weight = tensor.to_weight(meta.get("logical_axes"), meta.get("head_size", 1))
                loaded[key] = weight if plan is None else shard_quantized(weight, plan, key)
                continue
        for key, array, expert in targets or _to_ours(hf_key, tensor, family, config, expected):
            if key not in expected:
                raise CheckpointError(f"unexpected tensor {name!r} in {file} (no parameter {key!r} in {config.architecture})")
            want = tuple(expected[key].shape)
            if expert is not None:
                if expert >= want[0]:
                    raise CheckpointError(f"unexpected tensor {name!r} in {file}: expert {expert} of {want[0]}")
                want = want[1:]
                source = f"{key}[{expert}]"
            else:
                source = key
            if source in sources or key in loaded:
                raise CheckpointError(f"tensor {name!r} in {file} duplicates one from {sources.get(source, sources.get(key))}")
            if tuple(array.shape) != want:
                raise CheckpointError(
                    f"tensor {name!r} in {file} has shape {_hf_shape(key, array.shape)}, "
                    f"the config implies {_hf_shape(key, want)}"
                )
            sources[source] = f"{file.name}:{name}"
            if expert is None:
                place(key, array)
                continue
            pieces = pending.setdefault(key, {})
            pieces[expert] = array
            if len(pieces) == expected[key].shape[0]:
                stacked = _stack_pieces([pieces[e] for e in range(len(pieces))])
                if isinstance(stacked, StackedWeight):
                    loaded[key] = stacked
                else:
                    place(key, stacked)
                del pending[key]
    missing = []
    for key in expected:
        if key in loaded:
            continue
        if key in pending:
            missing += [_hf_name(key, family, e) for e in range(expected[key].shape[0]) if e not in pending[key]]
        else:
            missing.append(_hf_name(key, family))
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is missing tensors: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else "")
        )
    return loaded


def _hf_name(key: str, family: Family, expert: int | None = None) -> str:
    """Our parameter path -> the HF tensor that holds it (one expert's, for a stacked parameter)."""
    weight_map = family.weight_map
    module, _, leaf = key.rpartition(".")
    hf_leaf = "weight" if leaf == "kernel" else leaf
    stacked = weight_map.stacked_for_ours(module)
    if stacked is not None:
        return f"{stacked.replace('{e}', '{e}' if expert is None else str(expert))}.{hf_leaf}"
    fused = weight_map.fused_for_ours(module)
    hf_module = fused[1] if fused else weight_map.module_to_hf(module)
    return weight_map.tensor_to_hf(f"{hf_module}.{hf_leaf}")


def hf_tensors(model: nnx.Module, family: Family) -> Iterator[tuple[str, np.ndarray]]:
    """Our parameters as HF-named host arrays in the checkpoint's layout."""
    weight_map = family.weight_map
    for name, array in _hf_linear_tensors(model, family):
        module, _, leaf = weight_map.tensor_to_ours(name).rpartition(".")
        if leaf == "weight" and weight_map.is_conv1d(module):
            array = _swap_last(array)
        array = array.reshape(-1, *array.shape[2:]) if weight_map.is_expert_rows(module) else array
        yield weight_map.nested(name), array


def _hf_linear_tensors(model: nnx.Module, family: Family) -> Iterator[tuple[str, np.ndarray]]:
    """Our parameters as HF-named host arrays, fused tensors joined, linear weights `[out, in]`."""
    config: ModelConfig = model.config
    pending: dict[str, dict[str, np.ndarray]] = {}
    for key, variable in abstract_params(model).items():
        module, _, leaf = key.rpartition(".")
        array = np.asarray(jax.device_get(variable.get_value()))
        if leaf == "kernel":
            array = _swap_last(array)
        if family.weight_map.stacked_for_ours(module) is not None:
            for expert in range(array.shape[0]):
                yield _hf_name(key, family, expert), array[expert]
            continue
        fused = family.weight_map.fused_for_ours(module)
        if fused is None:
            yield _hf_name(key, family), array
            continue
        spec, hf_module, parts = fused
        name = family.weight_map.tensor_to_hf(f"{hf_module}.{'weight' if leaf == 'kernel' else leaf}")
        group = pending.setdefault(name, {})
        group[module] = array
        if len(group) == len(parts):
            yield name, spec.join([group[p] for p in parts], config)
            del pending[name]


def save_pretrained(model: nnx.Module, path: str | Path, *, max_shard_size: int = 5 * 1024**3) -> None:
    """Write config.json and safetensors (sharded above `max_shard_size` bytes) in HF layout."""
    config: ModelConfig = model.config
    _, state = nnx.split(model)
    if any(isinstance(v, QuantState) for _, v in nnx.to_flat_state(state)):
        raise ValueError("cannot export quantized weights in the float layout; load the model without "
                         "quantization (or from a float checkpoint) to export it")
    family = get_family(config.architecture).for_config(config)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shard: dict[str, np.ndarray] = {}
    written: list[tuple[Path, list[str], int]] = []  # (temporary file, tensor names, bytes)

    def flush() -> None:
        file = path / f"model-{len(written) + 1:05d}.safetensors.tmp"
        save_file(shard, str(file), metadata={"format": "pt"})
        written.append((file, list(shard), sum(a.nbytes for a in shard.values())))
        shard.clear()

    for name, array in hf_tensors(model, family):
        if shard and sum(a.nbytes for a in shard.values()) + array.nbytes > max_shard_size:
            flush()
        shard[name] = np.ascontiguousarray(array)
    flush()

    for stale in [*path.glob("model*.safetensors"), path / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    if len(written) == 1:
        written[0][0].rename(path / SINGLE_FILE)
    else:
        weight_map = {}
        for i, (file, names, _) in enumerate(written, 1):
            final = f"model-{i:05d}-of-{len(written):05d}.safetensors"
            file.rename(path / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": sum(n for _, _, n in written)}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2))

    hf_config = config.hf_config_dict()
    hf_config["architectures"] = [config.architecture]
    hf_config["dtype"] = config.dtype
    hf_config.pop("torch_dtype", None)
    hf_config.pop("quantization_config", None)  # the weights written are float (FP8 ones were dequantized)
    (path / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True))
