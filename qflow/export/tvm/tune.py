"""Bounded tuning of the CPU schedule's tile sizes, with a log that later exports reuse.

The schedule (:mod:`.schedule`) tiles every convolution and dense layer by a number of
output channels times a number of output columns. Which tile is fastest depends on the
layer's shape and on the CPU. ``qflow export --tune TRIALS`` measures tiles: each trial
compiles one layer's fused function with one candidate tile and times it alone on this
machine (TVM's time evaluator, zero-filled inputs at the build's batch, or one sample for
a dynamic batch). The trials go round-robin over the layers, heaviest first, each
layer's default tile first, so that a small budget is spent where it matters; a layer
takes its fastest measured tile.

The log (``tvm/tuning.json``) holds, per layer function, its structural hash, the tiles
measured with their times and the tile taken. ``--tune-log FILE`` reads a previous log:
a layer whose function has the same hash takes the logged tile without a trial (a layer
of another model, or of the same model at another batch or bit width, does not match).

Exactness: a tile only reorders the loops and the summation of integer-valued products,
which the integer ONNX proved exact in any order; ``qflow verify`` checks the build.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from qflow.errors import QflowError

from .schedule import schedule_function, tile_candidates

LOG_FILE = "tuning.json"
LOG_FORMAT = "qflow-tvm-tuning/1"
#: each trial's timing: repeats (the minimum is taken), each at least this many ms
REPEATS, REPEAT_MS = 3, 20


def read_log(path: Path) -> dict:
    """A tuning log written by an earlier export; a one-line error when it is not one."""
    try:
        log = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise QflowError(f"--tune-log {path}: not a readable tuning log ({exc})") from None
    if not isinstance(log, dict) or log.get("format") != LOG_FORMAT \
            or not isinstance(log.get("functions"), dict):
        raise QflowError(f"--tune-log {path}: not a qflow tuning log (format {LOG_FORMAT!r} "
                         "expected; it is the tvm/tuning.json of an export made with --tune)")
    return log


def function_key(func) -> str:
    """A layer function's identity in the log: its structural hash, as text."""
    import tvm_ffi

    return f"{tvm_ffi.structural_hash(func) & (2**64 - 1):016x}"


def tune_tiles(mod, target, trials: int, log: dict | None, batch: int | None,
               progress: Callable[[str], None]) -> tuple[dict[str, tuple[int, int]], dict]:
    """(tile per function name, the new log) for the legalized, fused module ``mod``.

    ``trials`` measurements at most; functions found in ``log`` take its tile unmeasured.
    """
    import tvm

    logged = (log or {}).get("functions", {})
    layers = []
    for var, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc):
            candidates = tile_candidates(func)
            if candidates:
                layers.append((var.name_hint, func, candidates))
    layers.sort(key=lambda layer: -_work(layer[1], batch))
    entries, chosen, reused = {}, {}, 0
    for name, func, _ in layers:
        entry = logged.get(function_key(func))
        if entry and isinstance(entry.get("tiles"), list) and len(entry["tiles"]) == 2:
            entries[function_key(func)] = entry
            chosen[name] = tuple(int(t) for t in entry["tiles"])
            reused += 1
    pending = [layer for layer in layers if layer[0] not in chosen]
    measured: dict[str, dict[str, float]] = {name: {} for name, _, _ in pending}
    spent, start, last = 0, time.perf_counter(), time.perf_counter()
    for round_ in range(max((len(c) for _, _, c in pending), default=0)):
        for name, func, candidates in pending:
            if spent >= trials:
                break
            if round_ < len(candidates):
                tiles = candidates[round_]
                measured[name][_label(tiles)] = _measure(func, tiles, target, batch)
                spent += 1
                if time.perf_counter() - last > 5:
                    progress(f"TVM tuning: {spent} of {trials} trials ...")
                    last = time.perf_counter()
    for name, func, candidates in pending:
        times = {k: v for k, v in measured[name].items() if np.isfinite(v)}
        if not times:
            continue
        best = min(times, key=times.get)
        chosen[name] = next(t for t in candidates if _label(t) == best)
        entries[function_key(func)] = {
            "function": name, "tiles": list(chosen[name]),
            "microseconds": {k: round(v * 1e6, 3) for k, v in times.items()},
            "default": list(candidates[0])}
    progress(f"TVM tuning: {len(pending)} layers tuned in {spent} of {trials} trials "
             f"({time.perf_counter() - start:.1f} s)"
             + (f"; {reused} layers from the tuning log" if log else ""))
    new_log = {"format": LOG_FORMAT, "target": str(target), "batch": batch,
               "trials": spent, "functions": entries}
    return chosen, new_log


def write_log(log: dict, path: Path) -> None:
    Path(path).write_text(json.dumps(log, indent=2) + "\n")


def _label(tiles: tuple[int, int]) -> str:
    return f"{tiles[0]}x{tiles[1]}"


def _concrete(shape, batch: int | None) -> list[int]:
    import tvm

    return [int(d) if isinstance(d, tvm.tirx.IntImm) else (batch or 1) for d in shape]


def _work(func, batch: int | None) -> int:
    """Elements the function reads and writes: its size, to order the layers by."""
    return sum(int(np.prod(_concrete(p.shape, batch))) for p in func.params)


def _measure(func, tiles: tuple[int, int], target, batch: int | None) -> float:
    """Seconds per call of ``func`` scheduled with ``tiles``, alone, on this CPU."""
    import tvm

    scheduled = schedule_function(func, tiles)
    if scheduled is None:  # the schedule does not fit this tile after all
        return float("inf")
    module = tvm.IRModule({"main": scheduled.with_attr("global_symbol", "main")})
    library = tvm.compile(module, target=target).jit()
    device = tvm.cpu()
    args = [tvm.runtime.tensor(np.zeros(_concrete(p.shape, batch), dtype=str(p.dtype)), device)
            for p in func.params]
    timer = library.time_evaluator("main", device, repeat=REPEATS, min_repeat_ms=REPEAT_MS)
    return float(min(timer(*args).results))
