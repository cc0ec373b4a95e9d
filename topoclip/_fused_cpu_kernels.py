"""The Numba loops behind ``topoclip.fused_cpu`` (imported only when one is first needed:
importing Numba costs a few tenths of a second, and compiling, once per machine, a few seconds).

Every loop takes C-contiguous 2-D arrays of one dtype; rows are shared among the threads.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

# Fast-math without "no NaNs / no infinities": the loops keep IEEE semantics for NaN and inf
# (a non-finite logit stays visible, as in the eager code), while contraction into FMAs,
# reassociation of the row sums and approximate reciprocals let them vectorise.
_IEEE_FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}
# The same without reassociation, for loops whose rounding order matters (log1p's correction).
_ORDERED_FAST = {"nsz", "arcp", "contract", "afn"}


@intrinsic
def _bits_as_float32(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def _float32_bits(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


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


def exp(x):  # pragma: no cover - replaced by the compiled overload below
    raise NotImplementedError


@overload(exp, fastmath=_IEEE_FAST)
def _exp_impl(x):
    if x == types.float32:
        # Cephes' expf: exp(x) = 2^n exp(r), |r| <= ln(2)/2, a degree-7 polynomial (relative
        # error ~1 ulp), 2^n built from its exponent bits. Arguments are clamped to
        # [-87.3, 88]: below, the result is the smallest normal number instead of 0 (a term
        # 1e-38 times smaller than any sum it enters); above, 1.7e38 instead of inf, which
        # keeps ratios such as cosh/sinh at their limit. NaN stays NaN.
        def impl(x):
            x = np.float32(-87.33654) if x < np.float32(-87.33654) else x
            x = np.float32(88.0) if x > np.float32(88.0) else x
            n = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
            r = x - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)
            p = np.float32(1.9875691500e-4)
            p = p * r + np.float32(1.3981999507e-3)
            p = p * r + np.float32(8.3334519073e-3)
            p = p * r + np.float32(4.1665795894e-2)
            p = p * r + np.float32(1.6666665459e-1)
            p = p * r + np.float32(5.0000001201e-1)
            p = p * r * r + r + np.float32(1.0)
            return p * _bits_as_float32((np.int32(n) + np.int32(127)) << np.int32(23))

        return impl
    return lambda x: np.exp(x)


def log(x):  # pragma: no cover - replaced by the compiled overload below
    raise NotImplementedError


@overload(log, fastmath=_ORDERED_FAST)
def _log_impl(x):
    if x == types.float32:
        # Cephes' logf for positive normal numbers (the only ones it is given: acosh's
        # arguments are >= 1): x = 2^e m, m in [sqrt(1/2), sqrt(2)), log(m) by a degree-9
        # polynomial in m - 1, exact near m = 1.
        def impl(x):
            bits = _float32_bits(x)
            e = np.float32(((bits >> np.int32(23)) & np.int32(0xFF)) - np.int32(126))
            m = _bits_as_float32((bits & np.int32(0x7FFFFF)) | np.int32(0x3F000000))  # in [0.5, 1)
            small = m < np.float32(0.70710678)
            e = e - np.float32(1.0) if small else e
            m = (m + m if small else m) - np.float32(1.0)
            z = m * m
            p = np.float32(7.0376836292e-2)
            p = p * m - np.float32(1.1514610310e-1)
            p = p * m + np.float32(1.1676998740e-1)
            p = p * m - np.float32(1.2420140846e-1)
            p = p * m + np.float32(1.4249322787e-1)
            p = p * m - np.float32(1.6668057665e-1)
            p = p * m + np.float32(2.0000714765e-1)
            p = p * m - np.float32(2.4999993993e-1)
            p = p * m + np.float32(3.3333331174e-1)
            y = m * z * p - np.float32(2.12194440e-4) * e - np.float32(0.5) * z
            return m + y + np.float32(0.693359375) * e

        return impl
    return lambda x: np.log(x)


def arccosh(z):  # pragma: no cover - replaced by the compiled overload below
    raise NotImplementedError


# Helpers with a division are inlined at Numba's level: a separately compiled overload keeps
# Python's zero-division check, which stops the calling loop from vectorising (acosh ran 7x
# slower); inlined, they take the loop's own flags and error model (every loop below uses
# NumPy's: a division by zero gives inf or NaN, which the loops mask).
@overload(arccosh, inline="always")
def _arccosh_impl(z):
    if z == types.float32:
        # z >= 1: log1p(d + sqrt(d (d + 2))), d = z - 1 (exact near z = 1, where the distance is
        # small), with log1p(t) = log(1 + t) - ((1 + t) - 1 - t) / (1 + t); log(2z) for z > 1e4
        # (where d^2 could overflow; the dropped term is below 1e-8).
        def impl(z):
            d = z - np.float32(1.0)
            t = d + np.sqrt(d * (d + np.float32(2.0)))
            u = np.float32(1.0) + t
            near = log(u) - ((u - np.float32(1.0)) - t) / u
            far = log(z) + np.float32(0.6931471805599453)
            return far if z > np.float32(1e4) else near

        return impl
    return lambda z: np.arccosh(z)


def sinh_cosh(theta):  # pragma: no cover - replaced by the compiled overload below
    raise NotImplementedError


@overload(sinh_cosh, inline="always")
def _sinh_cosh_impl(theta):
    if theta == types.float32:
        # theta >= 0. Both from one exp; sinh by its series below 1/2, where e - 1/e would
        # cancel (the first omitted term is below 1e-8 of sinh there).
        def impl(theta):
            half, one = np.float32(0.5), np.float32(1.0)
            e = exp(theta)
            inv = one / e
            t2 = theta * theta
            series = theta * (one + t2 * (np.float32(1.0 / 6.0) + t2 * (np.float32(1.0 / 120.0) + t2 * np.float32(1.0 / 5040.0))))
            return (series if theta < half else half * (e - inv)), half * (e + inv)

        return impl
    return lambda theta: (np.sinh(theta), np.cosh(theta))


# fastmath lets the loops vectorise (reassociation, no NaN/inf checks): every input is clamped
# to [-1, 1] first, so nothing they skip can occur.
@njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
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


@njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
def weighted_theta_over_sin(cos, weight, out, sin_floor_sq):
    rows, cols = cos.shape
    one = cos.dtype.type(1.0)
    for i in prange(rows):
        for j in range(cols):
            c = min(max(cos[i, j], -one), one)
            # (1 - c)(1 + c): 1 - c is exact near c = 1, where theta is small
            sin_sq = max((one - c) * (one + c), sin_floor_sq)
            out[i, j] = weight[i, j] * max(arccos(c) / np.sqrt(sin_sq), one)


@njit(parallel=True, fastmath=_ORDERED_FAST, cache=True, error_model="numpy")
def euclidean_logits(gram, norms_u, norms_v, scale):
    """In place: G = u v^T becomes -scale * sqrt(max(|u|^2 + |v|^2 - 2 G, 0)), rounded in the
    order of the unfused similarity (the norms' sum first)."""
    rows, cols = gram.shape
    zero, two = gram.dtype.type(0.0), gram.dtype.type(2.0)
    for i in prange(rows):
        row = gram[i]
        nu = norms_u[i]
        for j in range(cols):
            row[j] = -scale * np.sqrt(max((nu + norms_v[j]) - two * row[j], zero))


@njit(parallel=True, fastmath=_IEEE_FAST, cache=True, error_model="numpy")
def distance_weights(grad, logits, factor, row_sums):
    """In place: grad becomes factor * grad / logits where logits < 0, else 0 (a distance of 0:
    the zero subgradient; non-finite results are 0 too, as eager nan_to_num); row sums kept."""
    rows, cols = grad.shape
    zero, inf = grad.dtype.type(0.0), grad.dtype.type(np.inf)
    for i in prange(rows):
        g, row = grad[i], logits[i]
        total = zero
        for j in range(cols):
            w = factor * g[j] / row[j] if row[j] < zero else zero
            w = w if abs(w) < inf else zero
            g[j] = w
            total += w
        row_sums[i] = total


@njit(parallel=True, fastmath=_ORDERED_FAST, cache=True, error_model="numpy")
def lorentz_logits(gram, t_u, t_v, c, factor):
    """In place: G = u v^T becomes factor * acosh(max(c t_u t_v - c G, 1)) (factor =
    -scale / sqrt(c)), rounded as the unfused similarity (the time product first)."""
    rows, cols = gram.shape
    one = gram.dtype.type(1.0)
    for i in prange(rows):
        row = gram[i]
        ct = c * t_u[i]
        for j in range(cols):
            row[j] = factor * arccosh(max(ct * t_v[j] - c * row[j], one))


@njit(parallel=True, fastmath=_IEEE_FAST, cache=True, error_model="numpy")
def lorentz_weights(grad, logits, theta_per_logit, factor):
    """The Lorentz backward's element-wise part, in place: with theta = theta_per_logit * logits
    (the distance times sqrt(c)), grad g becomes A = factor * g / sinh(theta) (0 at theta = 0);
    returns (sum g * logits, sum A cosh(theta))."""
    rows, cols = grad.shape
    zero = grad.dtype.type(0.0)
    sum_g_logits = zero
    sum_a_cosh = zero
    for i in prange(rows):
        g, row = grad[i], logits[i]
        s1 = zero
        s2 = zero
        for j in range(cols):
            theta = theta_per_logit * row[j]
            sinh, cosh = sinh_cosh(theta)
            s1 += g[j] * row[j]
            a = factor * g[j] / sinh if theta > zero else zero
            g[j] = a
            s2 += a * cosh
        sum_g_logits += s1
        sum_a_cosh += s2
    return sum_g_logits, sum_a_cosh


__all__ = ["numba", "theta_squared", "weighted_theta_over_sin", "euclidean_logits", "distance_weights",
           "lorentz_logits", "lorentz_weights"]
