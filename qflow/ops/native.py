"""Fused CPU loops for the per-tensor saturating casts of training (``native_cast.c``).

Torch runs a cast as three element-wise passes forward and five backward; the C loops
take one each, with the same values. The source is compiled once per machine with the
system C compiler (``$CC`` or ``cc``) into a cache directory (``$QFLOW_CACHE_DIR``, else
``$XDG_CACHE_HOME/qflow``, else ``~/.cache/qflow``) and loaded with ctypes. Without a
compiler, or with ``QFLOW_NATIVE=0``, the casts use torch's operations: slower, same
values; :func:`status` says which is in use.

>>> from qflow.ops import native
>>> native.status().split(":")[0] in ("native", "torch")
True
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

SOURCE = Path(__file__).with_name("native_cast.c")
#: No fast-math and no contraction into fused multiply-adds: every value must equal the
#: torch path's (see native_cast.c).
FLAGS = ("-O3", "-std=gnu11", "-shared", "-fPIC", "-fno-fast-math", "-ffp-contract=off")

_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_CTYPE = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double}


def cache_dir() -> Path:
    """Where compiled loops are kept (created on first use)."""
    if os.environ.get("QFLOW_CACHE_DIR"):
        return Path(os.environ["QFLOW_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qflow"


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CC") or "cc")


def _build(target: Path, compiler: list[str]) -> None:
    """Compile to a temporary file beside ``target``, then rename: never half-written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.stem, suffix=".tmp")
    os.close(fd)
    try:
        subprocess.run([*compiler, *FLAGS, str(SOURCE), "-o", tmp], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("QFLOW_NATIVE", "1") == "0":
        return None, "torch: disabled by QFLOW_NATIVE=0"
    compiler = _compiler()
    try:
        version = subprocess.run([*compiler, "--version"], check=True, capture_output=True,
                                 text=True, timeout=30).stdout
        key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, *compiler, version,
                                        platform.machine()]).encode()).hexdigest()[:16]
        target = cache_dir() / f"native_cast-{key}.so"
        if not target.exists():
            _build(target, compiler)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as err:
        detail = (getattr(err, "stderr", None) or str(err)).strip() or type(err).__name__
        reason = (f"torch: could not build {SOURCE.name} with {' '.join(compiler)}: "
                  f"{detail.splitlines()[-1]}")
        warnings.warn(f"qflow: training casts use torch's slower element-wise operations "
                      f"({reason})", RuntimeWarning, stacklevel=3)
        return None, reason
    for dtype, suffix in _SUFFIX.items():
        value = _CTYPE[dtype]
        forward = getattr(lib, f"qflow_cast_forward_{suffix}")
        forward.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, value, value,
                            value]
        forward.restype = None
        backward = getattr(lib, f"qflow_cast_backward_{suffix}")
        backward.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, value, value]
        backward.restype = ctypes.c_double
        pointer = ctypes.c_void_p
        channel_forward = getattr(lib, f"qflow_channel_cast_forward_{suffix}")
        channel_forward.argtypes = [pointer, pointer, ctypes.c_int64, ctypes.c_int64] + \
            [pointer] * 3
        channel_forward.restype = None
        channel_backward = getattr(lib, f"qflow_channel_cast_backward_{suffix}")
        channel_backward.argtypes = [pointer] * 4 + [ctypes.c_int64] * 2 + [pointer] * 3
        channel_backward.restype = None
    return lib, f"native: {target}"


def status() -> str:
    """``"native: <library>"`` or ``"torch: <why>"``, building the loops if needed."""
    return _load()[1]


def _usable(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype in _SUFFIX and t.is_contiguous()
               and t.dtype == tensors[0].dtype for t in tensors)


def cast_forward(x: torch.Tensor, lo: float, hi: float, magic: float) -> torch.Tensor | None:
    """``(clamp(x, lo, hi) + magic) - magic`` in one pass, or None where it cannot run."""
    lib = _load()[0]
    if lib is None or not _usable(x):
        return None
    y = torch.empty_like(x)
    getattr(lib, f"qflow_cast_forward_{_SUFFIX[x.dtype]}")(
        x.data_ptr(), y.data_ptr(), x.numel(), lo, hi, magic)
    return y


def cast_backward(grad_y: torch.Tensor, x: torch.Tensor, y: torch.Tensor, below: float,
                  above: float, need_grad_x: bool) -> tuple[torch.Tensor | None, float] | None:
    """``(grad_x, sum(grad_y * (y - x_in)))`` of :class:`qflow.ops.fixed._ScalarCast`.

    ``x_in`` is ``x`` where ``below < x < above`` and 0 elsewhere; ``grad_x`` is
    ``grad_y`` there and 0 elsewhere (None unless ``need_grad_x``). None where it cannot
    run.
    """
    lib = _load()[0]
    if lib is None or not _usable(grad_y, x, y) or grad_y.shape != x.shape:
        return None
    grad_x = torch.empty_like(x) if need_grad_x else None
    total = getattr(lib, f"qflow_cast_backward_{_SUFFIX[x.dtype]}")(
        grad_y.data_ptr(), x.data_ptr(), y.data_ptr(),
        None if grad_x is None else grad_x.data_ptr(), x.numel(), below, above)
    return grad_x, total


def available() -> bool:
    """Whether the loops are built and loaded (see :func:`status`)."""
    return _load()[0] is not None


class ChannelBounds:
    """Per-channel ``lo``, ``hi`` and magic-number arrays, kept alive with their addresses."""

    __slots__ = ("addresses", "channels", "hi", "lo", "magic")

    def __init__(self, lo: np.ndarray, hi: np.ndarray, magic: np.ndarray):
        self.lo, self.hi, self.magic = lo, hi, magic
        self.channels = lo.shape[0]
        self.addresses = (lo.ctypes.data, hi.ctypes.data, magic.ctypes.data)


def channel_cast_forward(x: torch.Tensor, bounds: ChannelBounds) -> torch.Tensor:
    """:func:`cast_forward` per channel: channel ``c`` is ``x[c]`` (``x`` contiguous, on
    the CPU, its dtype that of the bounds) with bounds ``lo[c]``, ``hi[c]``."""
    y = torch.empty_like(x)
    getattr(_load()[0], f"qflow_channel_cast_forward_{_SUFFIX[x.dtype]}")(
        x.data_ptr(), y.data_ptr(), bounds.channels, x.numel() // bounds.channels,
        *bounds.addresses)
    return y


def channel_cast_backward(grad_y: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                          bounds: ChannelBounds, need_grad_x: bool):
    """:func:`cast_backward` per channel, ``x_in = x`` where ``lo[c] <= x <= hi[c]``:
    ``(grad_x, sums)``, the sums a float64 tensor, one per channel (``grad_y``
    contiguous)."""
    grad_x = torch.empty_like(x) if need_grad_x else None
    sums = torch.empty(bounds.channels, dtype=torch.float64)
    getattr(_load()[0], f"qflow_channel_cast_backward_{_SUFFIX[x.dtype]}")(
        grad_y.data_ptr(), x.data_ptr(), y.data_ptr(),
        None if grad_x is None else grad_x.data_ptr(), bounds.channels,
        x.numel() // bounds.channels, *bounds.addresses[:2], sums.data_ptr())
    return grad_x, sums
