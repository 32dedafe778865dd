"""Check the GPU path without a GPU: lower for CUDA, pull out the Triton modules, compile them to PTX.

Interpret mode checks a kernel's math; this checks that it will compile for an H100 and
what the compiled code looks like, on any machine with the `triton` package (the test
extra; no CUDA plugin, no driver):

1. `lower_for_h100(jitted, *args)`: lower a jitted function for platform `cuda` on an
   abstract H100 (`jax.sharding.AbstractDevice`). jax 0.10 takes the platform from an
   abstract mesh only when every axis is Explicit, which the Auto-sharded model steps are
   not, so the platform is also named explicitly.
2. `triton_modules(lowered)`: every Pallas Triton kernel in the StableHLO, i.e. each
   `__gpu$xla.gpu.triton` custom call's Triton IR (MLIR bytecode in its backend config).
   Parsing it with jaxlib's MLIR verifies it (an invalid module raises `TritonIRError`).
3. `compile_to_ptx(module)`: the `triton` package's own CUDA pipeline for sm_90a (TTIR
   passes, TTGIR with Hopper pipelining and MMA selection, LLVM, PTX), then `ptxas -v`
   (bundled with the triton wheel) for registers, spills and stack frame.
4. `problems(report)`: what makes a kernel unfit: register spills, more shared memory than
   an H100 block has, and matmul tiles of 64+ rows that did not become wgmma (Hopper's
   warpgroup MMA; `mma.sync` is the Ampere path).

XLA compiles these modules with its own copy of the same Triton pipeline; the triton
package matching the GPU image (3.6) is the closest stand-in available off the GPU.

Mosaic GPU kernels (`mosaic_modules`) go less far: their Python lowering (layout inference,
the mosaic_gpu dialect down to gpu/nvvm/llvm ops, the shared-memory budget) runs when the
computation is lowered, and the module in each `mosaic_gpu_v2` custom call is parsed back
and verified here, but the rest of their pipeline (the C++ passes to LLVM and PTX) lives in
the CUDA plugin's Mosaic GPU bindings, which a CPU-only jaxlib lacks: no PTX, no register
or spill figures for them off the GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

TRITON_CALL = "__gpu$xla.gpu.triton"
MOSAIC_CALL = "mosaic_gpu_v2"
H100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda")
CAPABILITY = 90  # sm_90 (compiled as sm_90a, which has wgmma)
MMA_ROWS = 64  # the M side of one wgmma instruction per warpgroup
MAX_SHARED_BYTES = 227 * 1024  # shared memory one H100 block may use


class TritonIRError(RuntimeError):
    """A Triton module that does not parse or verify, or that the Triton pipeline rejects."""


class MosaicIRError(RuntimeError):
    """A Mosaic GPU module that does not parse or verify."""


@dataclasses.dataclass(frozen=True)
class TritonModule:
    """One Pallas Triton kernel as lowered: its name, launch settings and Triton IR (text)."""

    name: str
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]
    ir: str

    @property
    def key(self) -> str:
        """Identity for de-duplication (the same kernel in every layer compiles once)."""
        text = f"{self.num_warps}/{self.num_stages}/{self.ir}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class PtxReport:
    """Facts about one kernel compiled for sm_90a."""

    name: str
    num_warps: int
    num_stages: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    shared_bytes: int
    wgmma: bool  # wgmma.mma_async in the PTX
    mma_sync: bool  # mma.sync (Ampere-style tensor-core MMA) in the PTX
    dot_tiles: tuple[tuple[int, int, int], ...]  # (M, N, K) of every tt.dot after the TTIR passes
    ptx: str = dataclasses.field(repr=False)

    def summary(self) -> str:
        tiles = ",".join(f"{m}x{n}x{k}" for m, n, k in self.dot_tiles) or "none"
        mma = "wgmma" if self.wgmma else "mma.sync" if self.mma_sync else "no MMA"
        return (f"{self.name}: warps={self.num_warps} stages={self.num_stages} regs={self.registers} "
                f"spills={self.spill_stores}/{self.spill_loads} stack={self.stack_frame} smem={self.shared_bytes} "
                f"dots={tiles} {mma}")


def lower_for_h100(jitted: Callable, *args: Any, **kwargs: Any) -> jax.stages.Lowered:
    """`jitted.trace(*args, **kwargs).lower(...)` for platform cuda on an abstract H100; args may be
    `jax.ShapeDtypeStruct`s (nothing is allocated)."""
    mesh = AbstractMesh((1,), ("data",), axis_types=(AxisType.Auto,), abstract_device=H100)
    with jax.sharding.use_abstract_mesh(mesh):
        return jitted.trace(*args, **kwargs).lower(lowering_platforms=(H100.platform,))


def abstract(tree: Any) -> Any:
    """Arrays (and anything with shape and dtype) -> `jax.ShapeDtypeStruct`s, for `lower_for_h100`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, "shape") else x, tree)


def _custom_call_configs(lowered: jax.stages.Lowered, target: str, read: Callable) -> list:
    """`read(backend_config)` for every custom call to `target` in the StableHLO (inside its context)."""
    from jax._src.lib.mlir import ir

    found = []

    def visit(op):
        op = op.operation
        if op.name == "stablehlo.custom_call" and ir.StringAttr(op.attributes["call_target_name"]).value == target:
            found.append(op)
        return ir.WalkResult.ADVANCE

    module = lowered.compiler_ir("stablehlo")
    with module.context:
        module.operation.walk(visit)
        return [read(ir.DictAttr(op.attributes["mhlo.backend_config"])) for op in found]


def triton_modules(lowered: jax.stages.Lowered) -> list[TritonModule]:
    """Every Triton kernel in a lowered computation, verified (see the module docstring)."""
    from jax._src.lib.mlir import ir

    def read(config):
        return TritonModule(
            name=ir.StringAttr(config["name"]).value,
            num_warps=ir.IntegerAttr(config["num_warps"]).value,
            num_stages=ir.IntegerAttr(config["num_stages"]).value,
            grid=tuple(ir.IntegerAttr(config[f"grid_{axis}"]).value for axis in "xyz"),
            ir=_bytecode_to_text(ir.StringAttr(config["ir"]).value_bytes, ir.StringAttr(config["name"]).value),
        )

    return _custom_call_configs(lowered, TRITON_CALL, read)


@dataclasses.dataclass(frozen=True)
class MosaicModule:
    """One Mosaic GPU kernel as lowered, parsed back and verified: what its gpu/nvvm ops use."""

    ir: str = dataclasses.field(repr=False)

    @property
    def wgmma(self) -> bool:
        return "nvvm.wgmma" in self.ir or "wgmma.mma_async" in self.ir

    @property
    def tma(self) -> bool:
        return "cp.async.bulk.tensor" in self.ir

    def summary(self) -> str:
        return f"mosaic kernel: {len(self.ir)} chars of IR, wgmma={self.wgmma}, tma={self.tma}"


def mosaic_modules(lowered: jax.stages.Lowered) -> list[MosaicModule]:
    """Every Mosaic GPU kernel in a lowered computation, parsed back (the lowering's own
    deserialisation pass) and verified; raises `MosaicIRError` for a module that does not verify."""
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib.mlir import ir
    from jax.experimental.mosaic.gpu import core, dialect

    def verify(bytecode: bytes) -> MosaicModule:
        context = jax_mlir.make_ir_context()
        with context, ir.Location.unknown():
            dialect.register_dialect(context)
            context.allow_unregistered_dialects = True  # the serialised form's versioned dialect, until deserialised
            try:
                module = core._run_serde_pass(ir.Module.parse(bytecode), serialize=False)
                context.allow_unregistered_dialects = False
                if not module.operation.verify():
                    raise MosaicIRError("a Mosaic GPU module does not verify")
            except Exception as error:  # MLIRError: the verifier's diagnostics
                raise MosaicIRError(f"a Mosaic GPU module does not verify: {error}") from error
            return MosaicModule(module.operation.get_asm(enable_debug_info=False))

    return [verify(data) for data in _custom_call_configs(lowered, MOSAIC_CALL,
                                                          lambda config: ir.StringAttr(config["module"]).value_bytes)]


def _bytecode_to_text(bytecode: bytes, name: str) -> str:
    """Triton IR bytecode (jaxlib's MLIR) -> verified textual IR, which the triton package can read
    (its MLIR differs from jaxlib's, so the bytecode itself does not carry over)."""
    from jax._src.lib.mlir import ir
    from jaxlib.mlir._mlir_libs import _triton_ext

    with ir.Context() as context, ir.Location.unknown():
        _triton_ext.register_dialect(context)
        try:
            module = ir.Module.parse(bytecode)
        except Exception as error:  # MLIRError: the verifier's diagnostics
            raise TritonIRError(f"Triton module {name} does not verify: {error}") from error
        if not module.operation.verify():
            raise TritonIRError(f"Triton module {name} does not verify")
        return module.operation.get_asm(enable_debug_info=False)


_DOT = re.compile(r"tt\.dot\b.*:\s*tensor<(\d+)x(\d+)x\w+.*?>\s*\*\s*tensor<(\d+)x(\d+)x")
_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


@functools.lru_cache(maxsize=None)
def _compile_cached(module: TritonModule) -> PtxReport:
    from triton._C.libtriton import ir as tir
    from triton.backends.compiler import GPUTarget, Language
    from triton.compiler.compiler import make_backend
    from triton import knobs

    target = GPUTarget("cuda", CAPABILITY, 32)
    backend = make_backend(target)
    options = backend.parse_options(dict(num_warps=module.num_warps, num_stages=module.num_stages))
    context = tir.context()
    tir.load_dialects(context)
    backend.load_dialects(context)
    stages: dict = {}
    backend.add_stages(stages, options, Language.TRITON)
    metadata: dict = {"target": target, **options.__dict__}
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / f"{module.name}.ttir"
        source.write_text(module.ir)
        try:
            src = tir.parse_mlir_module(str(source), context)
            src.context = context
            src = stages["ttir"](src, metadata)
            ttir = str(src)
            for stage in ("ttgir", "llir", "ptx"):
                src = stages[stage](src, metadata)
        except Exception as error:
            raise TritonIRError(f"Triton pipeline failed for {module.name}: {error}") from error
        ptx = src
        ptx_file = Path(folder) / "kernel.ptx"
        ptx_file.write_text(ptx)
        arch = f"sm_{CAPABILITY}a"
        result = subprocess.run([knobs.nvidia.ptxas.path, "-v", f"--gpu-name={arch}", str(ptx_file), "-o",
                                 str(Path(folder) / "kernel.cubin")], capture_output=True, text=True)
        if result.returncode != 0:
            raise TritonIRError(f"ptxas failed for {module.name}: {result.stderr[-2000:]}")
    log = result.stderr
    registers = _REGISTERS.search(log)
    spills = _SPILLS.search(log)
    tiles = tuple((int(m), int(n), int(k)) for m, k, _, n in _DOT.findall(ttir))
    return PtxReport(
        name=module.name,
        num_warps=int(metadata.get("num_warps", module.num_warps)),
        num_stages=module.num_stages,
        registers=int(registers.group(1)) if registers else 0,
        stack_frame=int(spills.group(1)) if spills else 0,
        spill_stores=int(spills.group(2)) if spills else 0,
        spill_loads=int(spills.group(3)) if spills else 0,
        shared_bytes=int(metadata.get("shared") or 0),
        wgmma="wgmma.mma_async" in ptx,
        mma_sync="mma.sync" in ptx,
        dot_tiles=tiles,
        ptx=ptx,
    )


def compile_to_ptx(module: TritonModule) -> PtxReport:
    """Compile one module for sm_90a with the triton package (cached per module)."""
    return _compile_cached(module)


def problems(report: PtxReport) -> list[str]:
    """Why a compiled kernel is unfit for an H100 (empty when it is fine)."""
    found = []
    if report.spill_stores or report.spill_loads:
        found.append(f"{report.name}: register spills ({report.spill_stores} B stores, {report.spill_loads} B loads, "
                     f"{report.registers} registers)")
    if report.shared_bytes > MAX_SHARED_BYTES:
        found.append(f"{report.name}: {report.shared_bytes} B of shared memory > {MAX_SHARED_BYTES} B per block")
    big = [tile for tile in report.dot_tiles if tile[0] >= MMA_ROWS]
    if big and not report.wgmma:
        found.append(f"{report.name}: matmul tiles {big} of {MMA_ROWS}+ rows compile without wgmma")
    return found


def check_lowered(lowered: jax.stages.Lowered) -> tuple[list[PtxReport], list[str]]:
    """Verify and compile every Triton module of a lowered computation: (reports, problems)."""
    reports, found, seen = [], [], set()
    for module in triton_modules(lowered):
        if module.key in seen:
            continue
        seen.add(module.key)
        report = compile_to_ptx(module)
        reports.append(report)
        found += problems(report)
    return reports, found
