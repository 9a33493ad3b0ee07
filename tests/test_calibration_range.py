"""Calibration never picks a format under which a value it saw overflows.

The input's binary point is calibrated once and not trained: under every rounding x
overflow mode the calibrated input type holds the calibration data's minimum and
maximum after rounding (1.0, and values just below 1.0 that round up to it, included),
with the fewest integer bits that do. Trained roles keep that rule where an out-of-range
value would be wrapped or zeroed (WRAP, SAT_ZERO); under SAT/SAT_SYM their start may
clip. The digits reproduction (RND_INF/WRAP input) trains as well as the same recipe
with SAT.
"""

import contextlib
import io
import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn

import qflow
from qflow.cli.main import main
from qflow.config import QFXConfig, QuantSpec
from qflow.nn import QInput
from qflow.numerics import FixedType, Overflow, Rounding, from_codes, to_codes
from qflow.quantizers import FixedQuantizer
from qflow.train import calibrate

MODES = list(itertools.product(Rounding, Overflow))
WIDTHS = (1, 2, 3, 6, 8, 16)


def _datasets(width: int, signed: bool) -> dict[str, np.ndarray]:
    """Calibration data (float32 values, as calibrate() feeds them): max exactly 1.0, just
    below it (one float32 ulp; half an LSB of the width's [0, 1) type, a tie), and random."""
    rng = np.random.default_rng(width * 2 + signed)
    base = rng.uniform(-1 if signed else 0, 1, (64, 10))
    half_lsb = 2.0 ** -(width + 1 - signed)  # half an LSB of the type with 0 integer bits
    sets = {
        "max 1.0": np.where(np.arange(10) == 3, 1.0, base * 0.9),
        "float below 1.0": np.where(np.arange(10) == 3, np.nextafter(np.float32(1), 0), base),
        "tie below 1.0": np.where(np.arange(10) == 3, 1 - half_lsb, base * 0.5),
        "random": rng.standard_normal((64, 10)) * 2.0 ** rng.integers(-6, 6),
    }
    if signed:
        sets["min -1.0"] = np.where(np.arange(10) == 5, -1.0, base * 0.5)
        sets["min -2.0"] = np.where(np.arange(10) == 5, -2.0, base)
        sets["tie beyond -1.0"] = np.where(np.arange(10) == 5, -1 - half_lsb, base * 0.5)
    else:
        sets = {k: np.abs(v) for k, v in sets.items()}
    return {k: v.astype(np.float32) for k, v in sets.items()}


def _calibrated_input_type(spec: QuantSpec, x: np.ndarray, *, model: bool = False) -> FixedType:
    """The input type after ``calibrate``: through a whole quantized model, or (faster, the
    same module and call) the model-input module alone."""
    config = QFXConfig(input=spec)
    if model:
        torch.manual_seed(0)
        net = qflow.quantize_(nn.Sequential(nn.Linear(x.shape[1], 3)), config)
        calibrate(net.train(), x)
        return net[0].quant.fixed_type()
    module = QInput(config)
    calibrate(module, x)
    return module.quant.fixed_type()


def _unbounded(t: FixedType) -> FixedType:
    """``t``'s grid and rounding with room for every value: the codes before overflow."""
    return FixedType(signed=True, integer=t.integer + 8, fractional=t.fractional,
                     rounding=t.rounding, overflow="SAT")


def _overflowing(x: np.ndarray, t: FixedType) -> int:
    """Samples of ``x`` whose code in ``t`` is not the rounded value (wrapped, zeroed,
    saturated): 0 when ``t`` holds the data."""
    return int(np.count_nonzero(to_codes(x, t) != to_codes(x, _unbounded(t))))


@pytest.mark.parametrize(("rounding", "overflow"), MODES, ids=lambda m: str(m))
def test_input_calibration_holds_min_and_max(rounding, overflow):
    failures, cases = [], 0
    # signed=None: the sign comes from the data (here signed data)
    for width, signed in itertools.product(WIDTHS, (True, False, None)):
        spec = QuantSpec(bits=width, signed=signed, rounding=rounding, overflow=overflow,
                         trainable=False)
        for name, x in _datasets(width, signed is not False).items():
            cases += 1
            t = _calibrated_input_type(spec, x)
            x64 = x.astype(np.float64)
            lo, hi = x64.min(), x64.max()
            where = f"{t} on {name!r}"
            # the extremes cast to their nearest representable value (by the rounding
            # mode), never wrapped, zeroed or clipped; no sample overflows
            assert t.signed is (signed is not False)
            for v in (hi, lo):
                exact = from_codes(to_codes([v], _unbounded(t)), t)
                if from_codes(to_codes([v], t), t) != exact:
                    failures.append(f"{where}: {v!r} casts to "
                                    f"{from_codes(to_codes([v], t), t)[0]!r}, not {exact[0]!r}")
            if n := _overflowing(x64, t):
                failures.append(f"{where}: {n} samples overflow")
            # the fewest integer bits that do: one fewer overflows
            fewer = t.replace(integer=t.integer - 1, fractional=t.fractional + 1)
            if fewer.width == t.width and not _overflowing(x64, fewer):
                failures.append(f"{where}: {fewer} holds the data too")
    assert cases == len(WIDTHS) * (7 + 4 + 7)
    assert not failures, f"{len(failures)} failures in {cases} cases:\n" + "\n".join(failures[:20])


def test_digits_like_data_at_6_bits():
    """The issue's case: [0, 1] data reaching 1.0, 6-bit RND_INF input."""
    x = np.random.default_rng(0).integers(0, 17, (256, 64)).astype(np.float32) / 16
    x[0, 0] = 1.0
    for overflow in Overflow:
        spec = QuantSpec(bits=6, rounding="RND_INF", overflow=overflow, trainable=False)
        t = _calibrated_input_type(spec, x, model=True)
        assert t.to_ap() == f"ap_ufixed<6,1,AP_RND_INF,AP_{overflow}>"
        assert to_codes([1.0], t).tolist() == [32]  # not 0 (wrapped) nor 63 (clipped)


@pytest.mark.parametrize("overflow", [Overflow.WRAP, Overflow.SAT_ZERO])
def test_trained_roles_hold_the_range_where_it_would_wrap_or_zero(overflow):
    rng = np.random.default_rng(3)
    for rounding in Rounding:
        act = FixedQuantizer(QuantSpec(bits=6, rounding=rounding, overflow=overflow))
        x = torch.tensor(np.abs(rng.standard_normal((32, 20))), dtype=torch.float32)
        x[0, 0] = 4.0
        act(x)
        t = act.fixed_type()
        assert _overflowing(x.double().numpy(), t) == 0, t
        # per-channel weights: every channel holds its own range
        w = torch.tensor(rng.standard_normal((8, 5)) * 2.0 ** np.arange(8)[:, None],
                         dtype=torch.float32)
        w[2, 0] = 4.0
        quant = FixedQuantizer(QuantSpec(bits=5, signed=True, per_channel=True,
                                         rounding=rounding, overflow=overflow), channels=8,
                               ndim=2)
        quant(w)
        for row, t in zip(w.double().numpy(), quant.fixed_types(), strict=True):
            assert _overflowing(row, t) == 0, t


def test_trained_roles_may_clip_under_saturation():
    """Under SAT a trained binary point starts by least squared error: one outlier is
    clipped rather than costing every other value resolution."""
    x = torch.full((1000,), 0.25)
    x[0] = 1.0
    for overflow in (Overflow.SAT, Overflow.SAT_SYM):
        trained = FixedQuantizer(QuantSpec(bits=4, signed=False, overflow=overflow))
        trained(x)
        assert trained.fixed_type().integer < 1  # 1.0 clipped
        fixed = FixedQuantizer(QuantSpec(bits=4, signed=False, overflow=overflow,
                                         trainable=False))
        fixed(x)
        assert fixed.fixed_type().integer == 1  # not trained: holds 1.0


def _quantize(tmp_path, name: str, overflow: str) -> dict:
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(f"version: 1\ninput: {{rounding: RND_INF, overflow: {overflow}}}\n")
    out = tmp_path / name
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main(["quantize", "--recipe", str(recipe), "--bits", "6", "--epochs", "3",
                     "--qat-epochs", "2", "--quiet", "--out", str(out)])
    assert code == 0
    return json.loads((out / "metrics.json").read_text())


def test_digits_rnd_inf_wrap_trains_like_sat(tmp_path):
    wrap, sat = _quantize(tmp_path, "wrap", "WRAP"), _quantize(tmp_path, "sat", "SAT")
    for metrics, overflow in ((wrap, "WRAP"), (sat, "SAT")):
        (fmt,) = [f for f in metrics["formats"] if f["layer"] == "input"]
        assert (fmt["signed"], fmt["width"], fmt["int_width_max"], fmt["overflow"]) == (
            False, 6, 1, overflow)  # ap_ufixed<6,1>: holds the digits' 1.0
    assert wrap["quantized_accuracy"] >= sat["quantized_accuracy"] - 3, (wrap, sat)
