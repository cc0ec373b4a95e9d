"""The Numba loops behind ``topoclip.fused_cpu`` (imported only when one is first needed:
importing Numba costs a few tenths of a second, and compiling, once per machine, a few seconds).

Every loop takes C-contiguous 2-D arrays of one dtype; rows are shared among the threads.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload


def arccos(x):  # pragma: no cover - replaced by the compiled overload below
    raise NotImplementedError


@overload(arccos, fastmath=True)
def _arccos_impl(x):
    if x == types.float32:
        # Hastings' approximation (Abramowitz & Stegun 4.4.46): arccos(a) = sqrt(1 - a) P(a) on
        # [0, 1], |error| <= 2e-8; arccos(-a) = pi - arccos(a). Branch-free, so it vectorises.
        def impl(x):
            a = abs(x)
            p = np.float32(-0.0012624911)
            p = p * a + np.float32(0.0066700901)
            p = p * a - np.float32(0.0170881256)
            p = p * a + np.float32(0.0308918810)
            p = p * a - np.float32(0.0501743046)
            p = p * a + np.float32(0.0889789874)
            p = p * a - np.float32(0.2145988016)
            p = p * a + np.float32(1.5707963050)
            t = np.sqrt(np.float32(1.0) - a) * p
            return t if x >= 0 else np.float32(np.pi) - t

        return impl
    return lambda x: np.arccos(x)


# fastmath lets the loops vectorise (reassociation, no NaN/inf checks): every input is clamped
# to [-1, 1] first, so nothing they skip can occur.
@njit(parallel=True, fastmath=True, cache=True)
def theta_squared(cos, acc, mode, scale):
    rows, cols = cos.shape
    one = cos.dtype.type(1.0)
    # one loop per mode: a branch inside the loop stops it from vectorising
    if mode == 0:
        for i in prange(rows):
            for j in range(cols):
                t = arccos(min(max(cos[i, j], -one), one))
                acc[i, j] = t * t
    elif mode == 1:
        for i in prange(rows):
            for j in range(cols):
                t = arccos(min(max(cos[i, j], -one), one))
                acc[i, j] += t * t
    else:
        for i in prange(rows):
            for j in range(cols):
                t = arccos(min(max(cos[i, j], -one), one))
                acc[i, j] = -scale * np.sqrt(acc[i, j] + t * t)


@njit(parallel=True, fastmath=True, cache=True)
def weighted_theta_over_sin(cos, weight, out, sin_floor_sq):
    rows, cols = cos.shape
    one = cos.dtype.type(1.0)
    for i in prange(rows):
        for j in range(cols):
            c = min(max(cos[i, j], -one), one)
            # (1 - c)(1 + c): 1 - c is exact near c = 1, where theta is small
            sin_sq = max((one - c) * (one + c), sin_floor_sq)
            out[i, j] = weight[i, j] * max(arccos(c) / np.sqrt(sin_sq), one)


__all__ = ["numba", "theta_squared", "weighted_theta_over_sin"]
