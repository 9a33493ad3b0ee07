"""Run a compiled hls4ml C simulation on many samples in worker processes.

hls4ml's ``predict`` calls the project's ``<project>_double(x, y)`` once per sample, in
one process. The C simulation of a real model is slow (the MLPerf Tiny ResNet-8 in
io_stream: about 0.2 s a sample) and a project's code keeps state in ``static``
variables (line buffers of streamed convolutions, loaded weights), so threads cannot
share one loaded library: each worker process loads its own copy and runs a contiguous
slice of the samples; the slices come back in order.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np

#: samples per task: small enough for even progress and load balance, large enough that
#: sending the inputs costs nothing next to simulating them
CHUNK = 8
#: at most one progress line per this many seconds
PROGRESS_SECONDS = 5.0
#: worker processes start only when the samples left would take longer in this process
#: (each worker's start costs about a second: Python, numpy, qflow's import)
POOL_MIN_SECONDS = 10.0

def _top_function(library: str, function: str):
    """The top function of ``library`` (loading a path loaded before is a cheap lookup)."""
    top = getattr(ctypes.CDLL(library), function)
    pointer = np.ctypeslib.ndpointer(ctypes.c_double, flags="C_CONTIGUOUS")
    top.restype, top.argtypes = None, [pointer, pointer]
    return top


def simulate_rows(library: str, function: str, rows: np.ndarray, out_size: int) -> np.ndarray:
    """Run ``rows`` (float64, one sample per row, hls4ml layout) through the library."""
    top = _top_function(library, function)
    out = np.zeros((len(rows), out_size), dtype=np.float64)
    for i in range(len(rows)):
        result = np.zeros(out_size, dtype=np.float64)
        top(np.ascontiguousarray(rows[i]), result)
        out[i] = result
    return out


def simulate(library: str, function: str, rows: np.ndarray, out_size: int, *,
             workers: int = 1, progress: Callable[[str], None] | None = None,
             label: str = "C simulation") -> np.ndarray:
    """Outputs of every row, reporting ``label: done of total samples`` about every few
    seconds. The first chunk runs in this process; the rest go to ``workers`` processes
    when they would take more than :data:`POOL_MIN_SECONDS` here, else stay here."""
    rows = np.ascontiguousarray(rows, dtype=np.float64)
    chunks = [(i, rows[i:i + CHUNK]) for i in range(0, len(rows), CHUNK)]
    out = np.zeros((len(rows), out_size), dtype=np.float64)
    start = last = time.perf_counter()
    done = 0

    def report(count: int) -> None:
        nonlocal done, last
        done += count
        now = time.perf_counter()
        if progress is not None and (now - last >= PROGRESS_SECONDS or done == len(rows)):
            last = now
            progress(f"{label}: {done} of {len(rows)} samples, {now - start:.0f} s")

    def run_here(part) -> None:
        for i, chunk in part:
            out[i:i + len(chunk)] = simulate_rows(library, function, chunk, out_size)
            report(len(chunk))

    # the first chunk in this process: it tells whether worker processes would pay off
    run_here(chunks[:1])
    rest = chunks[1:]
    left = len(rows) - done
    estimate = (time.perf_counter() - start) / max(done, 1) * left
    workers = max(1, min(workers, len(rest)))
    if workers == 1 or estimate < POOL_MIN_SECONDS:
        run_here(rest)
        return out
    if progress is not None:
        progress(f"{label}: {left} samples left, about {estimate:.0f} s in one process: "
                 f"running them in {workers} worker processes")
    # spawn, not fork: the parent may hold threads (torch, ONNX Runtime) that fork breaks
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(simulate_rows, library, function, chunk, out_size): (i, len(chunk))
                   for i, chunk in rest}
        for future in as_completed(futures):
            i, count = futures[future]
            out[i:i + count] = future.result()
            report(count)
    return out
