"""numpy == torch == C++ ``ap_fixed``, code for code, under every rounding × overflow pair.

``tests/cpp/ap_cast.cpp`` is compiled once per session against the ap_types headers that
ship inside the installed hls4ml package (located without importing hls4ml) and casts
the same doubles that go through ``qflow.numerics.to_codes`` and ``qflow.ops.to_codes``.
The headers are the reference: they are what HLS C simulation runs.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qflow import ops
from qflow.numerics import FixedType, Overflow, Rounding, to_codes

CPP_SOURCE = Path(__file__).parent / "cpp" / "ap_cast.cpp"

# (W, I, signed): widths 1..32, W = 1 both ways, I < 0, I > W, I = W, I = 0, unsigned.
SHAPES = [
    (1, 1, True),
    (1, -2, False),
    (2, -3, True),
    (4, 6, False),
    (5, 5, True),
    (8, 3, True),
    (8, 0, False),
    (12, -4, False),
    (16, 20, True),
    (17, 9, True),
    (24, 1, True),
    (32, 16, True),
    (32, 40, False),
    (32, -5, True),
]
PAIRS = [(r, o) for r in Rounding for o in Overflow]  # the order ap_cast.cpp writes them in
MIN_VALUES_PER_PAIR = 100_000
COMPILE_TIMEOUT_S = 600


def ap_types_dir() -> Path:
    # find_spec on a top-level package locates it without running its __init__.
    spec = importlib.util.find_spec("hls4ml")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("hls4ml is not installed: the ap_types headers ship inside it (pip hls4ml)")
    for root in spec.submodule_search_locations:
        folder = Path(root) / "templates" / "vivado" / "ap_types"
        if (folder / "ap_fixed.h").is_file():
            return folder
    pytest.fail(f"no templates/vivado/ap_types/ap_fixed.h under {spec.submodule_search_locations}")


@pytest.fixture(scope="session")
def ap_cast(tmp_path_factory):
    """Compiled reference programs, as ``[(shapes, executable), ...]``.

    Each ``(W, I, signed, Q, O)`` is its own template instantiation, so compilation
    dominates the run time: the shapes are split over a few programs built in parallel,
    at -O0, which compiles a third faster than -O1 and still casts the ~3M values in
    seconds.
    """
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.fail("g++ not found on PATH: it is needed to build the ap_fixed reference")
    include = ap_types_dir()
    out = tmp_path_factory.mktemp("ap_cast")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n_parts = max(1, min(len(SHAPES), cpus or 1, 4))
    groups = [SHAPES[k::n_parts] for k in range(n_parts)]
    builds = []
    for k, group in enumerate(groups):
        macro = " ".join(f"SHAPE({w},{i},{int(s)})" for w, i, s in group)
        exe = out / f"ap_cast_{k}"
        cmd = [gxx, "-std=c++14", "-O0", "-isystem", str(include),
               f"-DAP_CAST_SHAPES={macro}", str(CPP_SOURCE), "-o", str(exe)]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        builds.append((group, exe, cmd, proc))
    programs = []
    for group, exe, cmd, proc in builds:
        try:
            _, err = proc.communicate(timeout=COMPILE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail(f"compiling the ap_fixed reference timed out: {' '.join(cmd)}")
        if proc.returncode != 0:
            pytest.fail(f"compiling the ap_fixed reference failed: {' '.join(cmd)}\n{err[-4000:]}")
        programs.append((group, exe))
    return programs


def run_ap_cast(exe: Path, jobs: dict, workdir: Path) -> dict:
    """Codes from the C++ program: ``{shape: int64 array (pair, value)}``."""
    src, dst = workdir / f"{exe.name}.in", workdir / f"{exe.name}.out"
    with open(src, "wb") as fh:
        for (w, i, s), values in jobs.items():
            fh.write(np.array([w, i, int(s)], dtype=np.int32).tobytes())
            fh.write(np.array([values.size], dtype=np.int64).tobytes())
            fh.write(np.ascontiguousarray(values, dtype=np.float64).tobytes())
    done = subprocess.run(
        [str(exe), str(src), str(dst)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{exe.name} failed:\n{done.stderr}"
    # The program echoes its mode order and each job, so a mix-up cannot go unnoticed.
    lines = done.stdout.splitlines()
    assert lines[: len(PAIRS)] == [f"AP_{r} AP_{o}" for r, o in PAIRS]
    assert lines[len(PAIRS) :] == [f"{w} {i} {int(s)} {v.size}" for (w, i, s), v in jobs.items()]
    codes = np.fromfile(dst, dtype=np.int64)
    assert codes.size == len(PAIRS) * sum(v.size for v in jobs.values())
    result, at = {}, 0
    for shape, values in jobs.items():
        n = len(PAIRS) * values.size
        result[shape] = codes[at : at + n].reshape(len(PAIRS), values.size)
        at += n
    return result


def shape_values(width: int, int_width: int, signed: bool, rng: np.random.Generator):
    """Test doubles for one type shape, in units that make ties and overflow frequent."""
    t = FixedType.from_width(width, int_width, signed=signed)
    f, qmin, qmax = t.fractional, t.qmin, t.qmax
    span = qmax - qmin + 1
    parts = []
    # On grids 1..3 bits finer than the type, over the range and twice its size on each
    # side: 1/2, 1/4, 1/8 of these are exact ties.
    for extra in (1, 2, 3):
        lo, hi = (qmin - 2 * span) << extra, (qmax + 2 * span + 1) << extra
        fine = rng.integers(lo, hi, size=1536)
        parts.append(np.ldexp(fine.astype(np.float64), -(f + extra)))
    # Exact ties ±(k + 1/2) LSB, k from 0 to past the range.
    k = rng.integers(0, max(-qmin, qmax) + 4, size=1024)
    sign = rng.choice([-1.0, 1.0], size=k.size)
    parts.append(np.ldexp(sign * (k + 0.5), -f))
    # The limits, zero and ±1 LSB, each shifted by -2..2 LSB in quarter steps.
    anchors = np.array([qmin, qmax, -qmax, 0, 1, -1], dtype=np.float64)
    offsets = np.arange(-8, 9) / 4
    parts.append(np.ldexp((anchors[:, None] + offsets[None, :]).ravel(), -f))
    # Arbitrary doubles (53-bit mantissas, so the sticky bits matter) around the range.
    reach = np.ldexp(3.0 * max(-qmin, qmax, 1), -f)
    parts.append(rng.uniform(-reach, reach, size=1024))
    # Far out of range: random 53-bit mantissas whose top bit sits from 2**I (just past
    # the range) up to 2**1023, half of them within 80 bits so WRAP keeps varied bits.
    top = np.concatenate(
        [rng.integers(int_width, int_width + 80, size=512), rng.integers(int_width, 1024, 512)]
    )
    mantissa = rng.integers(1 << 52, 1 << 53, size=top.size).astype(np.float64)
    sign = rng.choice([-1.0, 1.0], size=top.size)
    parts.append(sign * np.ldexp(mantissa, top - 52))
    # Named magnitudes. No subnormals: qflow's scaling loses them (see
    # test_negative_subnormal_truncates_to_minus_one_lsb in test_numerics_properties.py).
    named = np.array(
        [1e30, 2.0**60, 2.0**60 + 2.0**8, 1e300, sys.float_info.max, 2.0**-1000, 1e-300,
         sys.float_info.min, 0.0]
    )  # fmt: skip
    parts.append(np.concatenate([named, -named]))
    return np.concatenate(parts)


def qflow_codes(values: np.ndarray, t: FixedType) -> tuple[np.ndarray, np.ndarray]:
    # Scaling DBL_MAX-sized values overflows to inf, which the kernel maps exactly.
    with np.errstate(over="ignore"):
        by_numpy = to_codes(values, t)
    by_torch = ops.to_codes(torch.from_numpy(values), t).numpy()
    return by_numpy, by_torch


def test_reference_program_decodes_known_casts(ap_cast, tmp_path):
    """Hand-computed codes, so a harness bug cannot make C++ and qflow agree by accident."""
    shape = (8, 3, True)  # f = 5
    (exe,) = [exe for group, exe in ap_cast if shape in group]
    values = np.array([1 / 64, 3 / 64, -1 / 64, 100.0, -100.0, 4.0, -4.0 - 1 / 64])
    codes = run_ap_cast(exe, {shape: values}, tmp_path)[shape]
    by_pair = dict(zip(PAIRS, codes.tolist(), strict=True))
    # t = 0.5, 1.5, -0.5, 3200, -3200, 128, -128.5
    assert by_pair[Rounding.RND_CONV, Overflow.SAT] == [0, 2, 0, 127, -128, 127, -128]
    assert by_pair[Rounding.TRN, Overflow.WRAP] == [0, 1, -1, -128, -128, -128, 127]
    assert by_pair[Rounding.RND, Overflow.SAT_ZERO] == [1, 2, 0, 0, 0, 0, -128]
    assert by_pair[Rounding.RND_ZERO, Overflow.SAT_SYM] == [0, 1, 0, 127, -127, 127, -127]


def test_numpy_torch_and_ap_fixed_agree(ap_cast, tmp_path):
    rng = np.random.default_rng(20240611)
    values = {shape: shape_values(*shape, rng) for shape in SHAPES}
    cpp = {}
    for group, exe in ap_cast:
        cpp.update(run_ap_cast(exe, {shape: values[shape] for shape in group}, tmp_path))

    counts = dict.fromkeys(PAIRS, 0)
    mismatches = dict.fromkeys(PAIRS, 0)
    examples = {}
    for (w, i, s), v in values.items():
        for p, (rounding, overflow) in enumerate(PAIRS):
            t = FixedType.from_width(w, i, signed=s, rounding=rounding, overflow=overflow)
            by_numpy, by_torch = qflow_codes(v, t)
            by_cpp = cpp[w, i, s][p]
            bad = np.flatnonzero((by_numpy != by_cpp) | (by_torch != by_cpp))
            counts[rounding, overflow] += v.size
            mismatches[rounding, overflow] += bad.size
            for j in bad[:3]:
                examples.setdefault((rounding, overflow), []).append(
                    f"  {float(v[j])!r} ({float(v[j]).hex()}) as {t.to_ap()}: numpy {by_numpy[j]}, "
                    f"torch {by_torch[j]}, C++ {by_cpp[j]}"
                )

    failing = [pair for pair in PAIRS if mismatches[pair]]
    table = [f"{'rounding':<12} {'overflow':<9} {'values':>8} {'mismatches':>10}"]
    table += [f"{r!s:<12} {o!s:<9} {counts[r, o]:>8} {mismatches[r, o]:>10}" for r, o in failing]
    for pair in failing:
        table.append(f"{pair[0]} / {pair[1]}, first examples:")
        table += examples[pair][:4]
    assert not failing, "qflow disagrees with ap_fixed:\n" + "\n".join(table)
    assert min(counts.values()) >= MIN_VALUES_PER_PAIR, counts
