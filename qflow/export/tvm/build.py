"""Compile ``model.int.onnx`` with TVM (Relax) for a target and write the ``tvm/`` directory.

``tvm/`` holds the compiled library (``model.so``), or, for a cross build without a
cross linker, the object files; ``build.json`` (what was built, for which device, the
input and output shapes and types) and ``run.py`` (the standalone runner, numpy + TVM
runtime only).

How a target is built, by its TVM target ``kind`` and architecture:

- ``llvm`` for this machine (``targets/cpu.yaml``): no ``mcpu`` given means this
  machine's CPU (LLVM's host CPU name), so the vector units are used; linked with the
  host's C++ compiler;
- ``llvm`` with another ``mtriple`` (``targets/arm64.yaml``): linked with the target's
  ``cross_compiler`` when it is on PATH, otherwise the object files are written (one
  ``lib0.o`` with the kernels, one ``devc.o`` with the VM bytecode and constants) with a
  note on how to link them;
- ``cuda``: host code for this machine, kernels compiled through nvcc; the module is
  built without a GPU and runs only where one is present.

CPU builds schedule their convolutions (:mod:`qflow.export.tvm.schedule`): TVM's default
CPU pipeline leaves them as scalar loops. Builds for this machine, where its CPU has
AVX-512 VNNI, run the convolution and dense layers on 8-bit codes as int8 kernels first
(:mod:`qflow.export.tvm.vnni`). Their tile sizes may be tuned on this machine
(:mod:`qflow.export.tvm.tune`, ``BuildOptions.tune_trials``), and the batch size fixed
(``BuildOptions.batch``): a static batch lets LLVM unroll and drop the bounds arithmetic;
the runner then feeds the build that many samples per call, padding the last call.

Exactness: no fast-math is allowed in the target (:func:`tvm_target` refuses it), and
the model passes :func:`qflow.export.tvm.frontend.check_exact` before import.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import tarfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from qflow.errors import QflowError
from qflow.export.int_onnx import INPUT_NAME
from qflow.graph.ir import QGraph
from qflow.graph.transformer import DECLARED_TYPE_OPS
from qflow.targets import TargetSpec

from . import frontend, runner, tune, vnni
from .schedule import schedule_convolutions

LIBRARY = "model.so"
OBJECTS_ARCHIVE = "model.tar"
RUNNER = "run.py"
#: TVM target kind -> the device the compiled module runs on
DEVICES = {"llvm": "cpu", "cuda": "cuda"}
#: environment for TVM's CUDA compile callbacks: no fast math (nvcc and NVRTC default to
#: --use_fast_math), so a float step of the graph (a double MaxPool) stays IEEE-exact
EXACT_CUDA_ENVIRONMENT = {"TVM_CUDA_NVCC_NO_FAST_MATH": "1",
                          "TVM_CUDA_NVRTC_EXTRA_OPTS": "--ftz=false --prec-div=true "
                                                       "--prec-sqrt=true --fmad=false"}
#: longest chain of operators fused into one CUDA kernel when the graph has the integer
#: transformer ops: TVM's GPU statement simplifier grows exponentially with a fused chain of
#: integer selects and divisions (one GELU: 0.7 s at depth 4, 28 s at 16, over 400 s at the
#: default); shorter kernels compute the same integers
CUDA_FUSE_DEPTH = 4
#: bytes of the largest intermediate tensor per CPU call (:func:`samples_per_call`)
CALL_BYTES = 256 * 1024
#: LLVM target options that allow inexact floating-point rewrites
FAST_MATH_KEYS = ("fast-math", "fast-math-nnan", "fast-math-ninf", "fast-math-nsz",
                  "fast-math-arcp", "fast-math-contract", "fast-math-reassoc")


@dataclass(frozen=True, kw_only=True)
class BuildOptions:
    """How to build: a fixed batch size (None: any batch), and the tile tuning."""

    batch: int | None = None
    #: tile measurements at most (0: the default tiles, no measuring)
    tune_trials: int = 0
    #: a previous export's ``tvm/tuning.json`` whose tiles matching layers reuse
    tune_log: Path | None = None


def host_arch() -> str:
    machine = platform.machine().lower()
    return runner.MACHINE_ARCH.get(machine, machine)


def target_arch(tvm_target: dict) -> str:
    """The CPU architecture the host code runs on: the mtriple's, else this machine's."""
    triple = tvm_target.get("mtriple")
    if not triple:
        return host_arch()
    machine = triple.split("-")[0]
    return runner.MACHINE_ARCH.get(machine, machine)


def tvm_target(spec: TargetSpec) -> dict:
    """The TVM target JSON to compile with (this machine's CPU filled in for host builds)."""
    config = dict(spec.tvm)
    kind = config.get("kind")
    if kind not in DEVICES:
        raise QflowError(f"target {spec.name}: TVM target kind {kind!r} is not supported "
                         f"(supported: {', '.join(DEVICES)})")
    fast = [k for k in FAST_MATH_KEYS if config.get(k)]
    if fast:
        raise QflowError(f"target {spec.name}: {fast[0]} would let LLVM change float64 "
                         "results; remove it from the target file")
    if kind == "llvm" and "mtriple" not in config and "mcpu" not in config:
        from tvm.target import codegen

        config["mcpu"] = codegen.llvm_get_system_cpu()
    return config


def _target_object(config: dict):
    import tvm

    if config["kind"] == "llvm":
        return tvm.target.Target(config)
    return tvm.target.Target(config, host={"kind": "llvm"})


def build_tvm(graph: QGraph, int_onnx: Path, out_dir: Path, spec: TargetSpec,
              progress: Callable[[str], None], options: BuildOptions | None = None) -> dict:
    """Compile ``int_onnx`` for ``spec`` into ``out_dir``; return the build description."""
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    options = options or BuildOptions()
    config = tvm_target(spec)
    log = check_build_options(options, spec)
    model = onnx.load(int_onnx)
    frontend.check_exact(model)
    model = frontend.pools_as_sums(model)
    int8_plan = vnni.plan_int8_layers(model) if _int8_capable(config) else {}
    frontend.register_converters()
    shapes = ({INPUT_NAME: [options.batch, *graph.tensors[graph.input].shape]}
              if options.batch else None)
    tuning: dict = {}
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():  # without --batch, the batch size is symbolic
            warnings.filterwarnings("ignore", message=".*unknown dimension")
            module = from_onnx(model, shape_dict=shapes, dtype_dict={INPUT_NAME: "int64"})
        cuda = config["kind"] == "cuda"
        fuse = ({"relax.FuseOps.max_depth": CUDA_FUSE_DEPTH} if cuda and any(
            n.op in DECLARED_TYPE_OPS for n in graph.nodes) else {})
        target = _target_object(config)
        with (_environment(EXACT_CUDA_ENVIRONMENT if cuda else {}),
              tvm.transform.PassContext(config=fuse)):
            pipeline = ("default" if cuda else _cpu_pipeline(
                target, options, log, tuning, progress, int8_plan))
            executable = tvm.compile(module, target=target, relax_pipeline=pipeline)
    except QflowError:
        raise
    except Exception as exc:  # TVM's errors are many-lined C++ traces
        raise QflowError(f"TVM could not compile {int_onnx.name} for target {spec.name}: "
                         f"{error_summary(exc)}") from None
    seconds = time.perf_counter() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    arch, device = target_arch(config), DEVICES[config["kind"]]
    linked, note = _export(executable, out_dir, spec, arch)
    if device != "cpu" and not tvm.runtime.enabled(device):
        note += (f" (this TVM has no {device.upper()} runtime: the kernels are embedded as "
                 f"{device.upper()} source; running needs a GPU and a {device.upper()}-enabled "
                 "TVM runtime)")
    shutil.copyfile(Path(runner.__file__), out_dir / RUNNER)
    if tuning.get("log"):
        tune.write_log(tuning["log"], out_dir / tune.LOG_FILE)
    manifest = {
        "format": runner.FORMAT,
        "target": spec.name,
        "tvm_target": config,
        "device": device,
        "arch": arch,
        "library": LIBRARY if linked else None,
        "objects": None if linked else sorted(p.name for p in out_dir.glob("*.o")),
        "note": note,
        "input": _tensor_spec(graph, graph.input),
        "output": _tensor_spec(graph, graph.output),
        "batch": options.batch,
        "samples_per_call": samples_per_call(graph) if device == "cpu" else None,
        "tuning": ({"log": tune.LOG_FILE, "trials": tuning["log"]["trials"]}
                   if tuning.get("log") else None),
        "int8_layers": tuning.get("int8_layers", []),
        "tvm_version": tvm.__version__,
        "build_seconds": round(seconds, 2),
    }
    (out_dir / runner.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    progress(f"TVM {spec.name}: compiled in {seconds:.1f} s for {device} ({arch}); {note}")
    if manifest["int8_layers"]:
        layers = sum(n.op in ("conv2d", "dense") for n in graph.nodes)
        progress(f"TVM {spec.name}: {len(manifest['int8_layers'])} of {layers} convolution and "
                 "dense layers run as int8 kernels (AVX-512 VNNI)")
    if device == "cpu" and options.batch is None:
        progress(f"TVM {spec.name}: built for any batch size; a build for a fixed one can run "
                 f"several times faster: --batch 1 for latency, --batch "
                 f"{manifest['samples_per_call']} for throughput (the samples per call whose "
                 "tensors stay in cache)")
    return manifest


def check_build_options(options: BuildOptions, spec: TargetSpec) -> dict | None:
    """A one-line QflowError for a build option ``spec`` does not take; else the tuning
    log ``options.tune_log`` names, read (None without one)."""
    if options.batch is not None and options.batch < 1:
        raise QflowError(f"--batch must be an integer >= 1, not {options.batch}")
    if options.tune_trials < 0:
        raise QflowError(f"--tune must be an integer >= 0, not {options.tune_trials}")
    if not (options.tune_trials or options.tune_log):
        return None
    from . import require_tvm

    require_tvm()
    config = tvm_target(spec)
    if config["kind"] != "llvm" or target_arch(config) != host_arch():
        raise QflowError(f"--tune and --tune-log apply to builds for this machine's CPU "
                         f"(target cpu); {spec.name} is not one: tuning measures each "
                         "layer here")
    return tune.read_log(options.tune_log) if options.tune_log else None


def _int8_capable(config: dict) -> bool:
    """Does the build run on this machine's CPU, and has it the int8 kernels'
    instructions (:mod:`.vnni`)?"""
    from tvm.target import codegen

    return (config["kind"] == "llvm" and "mtriple" not in config
            and config.get("mcpu") == codegen.llvm_get_system_cpu() and vnni.host_has_vnni())


def _cpu_pipeline(target, options: BuildOptions, log: dict | None, tuning: dict,
                  progress: Callable[[str], None], int8_plan: dict):
    """TVM's default CPU pipeline with the int8 layers of ``int8_plan`` first
    (:mod:`.vnni`; their nodes go into ``tuning["int8_layers"]``) and qflow's
    convolution schedule after the fusion (:mod:`.schedule`), its tiles tuned first when
    asked (:mod:`.tune`; the new log goes into ``tuning["log"]``)."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline

    @tvm.transform.module_pass(opt_level=0, name="qflow.Int8Layers")
    def int8_layers(mod, _context):
        mod, tuning["int8_layers"] = vnni.use_int8_kernels(mod, int8_plan)
        return mod

    @tvm.transform.module_pass(opt_level=0, name="qflow.ScheduleConvolutions")
    def scheduled(mod, _context):
        tiles = None
        if options.tune_trials or log:
            tiles, tuning["log"] = tune.tune_tiles(mod, target, options.tune_trials, log,
                                                   options.batch, progress)
        return schedule_convolutions(mod, tiles)

    @tvm.transform.module_pass(opt_level=0, name="qflow.CpuPipeline")
    def cpu_pipeline(mod, _context):
        with target:
            return tvm.transform.Sequential(
                [int8_layers, *pipeline.library_dispatch_passes(target),
                 *pipeline.legalize_passes(target), scheduled,
                 *pipeline.dataflow_lower_passes(target), *pipeline.finalize_passes(target)])(mod)

    return cpu_pipeline


@contextlib.contextmanager
def _environment(settings: dict[str, str]):
    """Set environment variables for the duration of a build, then restore them."""
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _export(executable, out_dir: Path, spec: TargetSpec, arch: str) -> tuple[bool, str]:
    """Write the library (or the object files); return (linked, a one-line note)."""
    if arch == host_arch():
        executable.export_library(str(out_dir / LIBRARY))
        return True, f"wrote {LIBRARY}"
    linker = spec.cross_compiler
    if linker and shutil.which(linker):
        from tvm.support import cc

        executable.export_library(str(out_dir / LIBRARY), fcompile=cc.cross_compiler(linker))
        return True, f"wrote {LIBRARY} (linked with {linker})"
    # no cross linker: TVM's tar "compiler" only archives the object files
    archive = out_dir / OBJECTS_ARCHIVE
    executable.export_library(str(archive))
    with tarfile.open(archive) as tar:
        tar.extractall(out_dir, filter="data")
    archive.unlink()
    objects = " ".join(sorted(p.name for p in out_dir.glob("*.o")))
    return False, (f"{linker or 'no cross compiler named'} not found: wrote the {arch} object "
                   f"files ({objects}); link them with `{linker or 'g++'} -shared -o "
                   f"{LIBRARY} {objects}` (or install the cross toolchain and export again)")


def samples_per_call(graph: QGraph) -> int:
    """Samples the runner passes per call on a CPU: the build's intermediate tensors stay
    in cache (the largest, as float64, within :data:`CALL_BYTES`), a large batch runs as
    a loop of small ones, and the per-call overhead stays small."""
    largest = max(int(np.prod(t.shape)) for t in graph.tensors.values()) * 8
    return int(np.clip(CALL_BYTES // max(largest, 1), 1, runner.RUN_CHUNK))


def _tensor_spec(graph: QGraph, tensor: str) -> dict:
    t = graph.tensors[tensor].type
    return {"shape": list(graph.tensors[tensor].shape), "type": t.to_ap(),
            "fractional": t.fractional, "qmin": int(t.qmin), "qmax": int(t.qmax)}


def error_summary(exc: BaseException) -> str:
    """The last non-empty line of an error (TVM puts its message after the trace)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[-1] if lines else type(exc).__name__
    return text[:300]
