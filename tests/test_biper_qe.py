"""BiPer's quantization error QE(b·ω₀) for Laplace latent weights: the closed form
against sampling, and the paper's maximum."""

import numpy as np
import pytest

from qflow.biper.qe import mean_abs_sine, peak_quantization_error, quantization_error


def test_peak_is_the_papers():
    c, qe = peak_quantization_error()
    assert round(qe, 6) == 0.102835
    assert abs(c - 0.954882) < 5e-6


@pytest.mark.parametrize("c", [0.2, 0.954882, 3.0])
def test_closed_form_equals_sampling(c):
    b, omega0 = c / 20.0, 20.0  # only the product matters
    w = np.random.default_rng(0).laplace(0.0, b, 2_000_000)
    real = np.sin(omega0 * w)
    alpha = np.abs(real).mean()
    sampled = np.mean((real - alpha * np.where(real >= 0, 1.0, -1.0)) ** 2)
    assert abs(alpha - mean_abs_sine(c)) < 2e-3
    assert abs(sampled - quantization_error(c)) < 2e-3


def test_limits_and_errors():
    assert quantization_error(1e-4) < 1e-6
    assert abs(quantization_error(1e4) - (0.5 - 4 / np.pi**2)) < 1e-6
    with pytest.raises(ValueError, match="positive"):
        quantization_error(0.0)
