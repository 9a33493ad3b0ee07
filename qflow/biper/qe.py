"""BiPer's quantization error for Laplace-distributed latent weights, in closed form.

A BiPer layer trains its stage-1 weights as sin(ω₀·w) and deploys α·sign(sin(ω₀·w)). For
latent weights w ~ Laplace(0, b), with the best scale α = E|sin(ω₀·w)| (the mean that
stage 2 starts from), the mean squared quantization error is

    QE = E[(sin(ω₀w) − α·sign(sin(ω₀w)))²] = E[sin²(ω₀w)] − (E|sin(ω₀w)|)²

and depends on b and ω₀ only through c = b·ω₀ (ω₀w ~ Laplace(0, c)):

    E[sin²] = 2c² / (1 + 4c²)                   (from the Laplace characteristic function)
    E|sin|  = s·coth(πs/2) / (1 + s²),  s = 1/c (a geometric sum over half periods)

It is 0 for c → 0, tends to 1/2 − 4/π² for c → ∞, and peaks at QE ≈ 0.102835 for
c ≈ 0.954882, the paper's choice guide for ω₀ given the spread of the weights.

>>> round(float(quantization_error(0.954882)), 6)
0.102835
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar


def mean_abs_sine(c):
    """E|sin(u)| for u ~ Laplace(0, c), c > 0: the stage-2 α of a Laplace layer."""
    s = 1.0 / np.asarray(c, dtype=np.float64)
    return s / np.tanh(np.pi * s / 2) / (1.0 + s * s)


def quantization_error(c):
    """QE(c) = E[sin²(u)] − (E|sin(u)|)² for u ~ Laplace(0, c), c = b·ω₀ > 0 (numpy
    broadcasting)."""
    c = np.asarray(c, dtype=np.float64)
    if (c <= 0).any():
        raise ValueError("quantization_error: b·ω₀ must be positive")
    return 2 * c * c / (1 + 4 * c * c) - mean_abs_sine(c) ** 2


def peak_quantization_error() -> tuple[float, float]:
    """(c, QE) at the maximum of :func:`quantization_error` over c = b·ω₀.

    >>> c, qe = peak_quantization_error()
    >>> round(c, 5), round(qe, 6)
    (0.95488, 0.102835)
    """
    found = minimize_scalar(lambda c: -quantization_error(c), bounds=(0.05, 20.0),
                            method="bounded", options={"xatol": 1e-12})
    return float(found.x), float(quantization_error(found.x))
