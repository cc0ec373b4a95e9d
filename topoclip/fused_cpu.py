"""Fused element-wise passes for the blocked similarity kernels on the CPU, compiled by Numba.

A blocked loss spends most of its non-GEMM time in chains of element-wise operations over
each block of cosines (clamp, arccos, square, accumulate; in backward arccos, 1 - c^2, rsqrt,
floor, multiply): eager PyTorch makes one trip through memory per operation. Here each chain
is one loop, compiled once per machine (Numba's on-disk cache) and run on the same number of
threads as PyTorch. Measured at b = 8,192 on 2 cores, per 256 x 8,192 block of cosines: the
forward's clamp-arccos-square-accumulate 3.8 ms eager -> 0.6 ms fused, the backward's
theta / sin(theta) times the loss weight 5.0 ms -> 0.9 ms (the eager timings include one copy
of the block, which restored the cosines that their in-place operations overwrite).

arccos: Numba's np.arccos calls the scalar C library (about 5x slower than PyTorch's
vectorised one), so float32 uses Hastings' polynomial (Abramowitz & Stegun 4.4.46,
|error| <= 2e-8, below float32's rounding), which the compiler vectorises; float64 keeps the
exact np.arccos (the precision gradcheck needs).

Only contiguous float32/float64 CPU tensors take these paths (``usable``); everything else,
and every machine without Numba, takes the eager PyTorch code, which the tests hold equal.
``TOPOCLIP_FUSED_CPU=0`` turns them off.
"""

from __future__ import annotations

import contextlib
import os
import threading
from functools import lru_cache

import torch
from torch import Tensor

__all__ = ["usable", "set_enabled", "disabled", "theta_squared", "weighted_theta_over_sin", "euclidean_logits",
           "distance_weights", "lorentz_logits", "lorentz_weights"]

_enabled = os.environ.get("TOPOCLIP_FUSED_CPU", "1") != "0"
# Numba's default thread pool aborts the process when two Python threads launch parallel
# loops at once; a lock makes concurrent callers take turns instead.
_launch = threading.Lock()

# The modes of theta_squared: overwrite, add, or add and finish as -scale * sqrt(sum).
FIRST, ADD, LAST = 0, 1, 2


def set_enabled(flag: bool) -> bool:
    """Turn the fused paths on or off (tests compare them with the eager code); returns the
    previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(flag)
    return previous


@contextlib.contextmanager
def disabled():
    previous = set_enabled(False)
    try:
        yield
    finally:
        set_enabled(previous)


def usable(*tensors: Tensor) -> bool:
    if not _enabled or _kernels() is None:
        return False
    first = tensors[0]
    return all(
        t.device.type == "cpu" and t.dtype == first.dtype and t.dtype in (torch.float32, torch.float64)
        and t.ndim <= 2 and t.is_contiguous()
        for t in tensors
    )


def theta_squared(cos: Tensor, acc: Tensor, mode: int, scale: float = 0.0) -> None:
    """With theta = arccos(clamp(cos, -1, 1)): acc = theta^2 (FIRST), acc += theta^2 (ADD), or
    acc = -scale * sqrt(acc + theta^2) (LAST), in one pass. ``cos`` is left as it is."""
    _run("theta_squared", cos, acc, mode, scale)


def weighted_theta_over_sin(cos: Tensor, weight: Tensor, out: Tensor, sin_floor: float) -> None:
    """out = weight * max(theta / max(sin(theta), sin_floor), 1), theta = arccos(clamp(cos)),
    in one pass: the derivative of the geodesic through arccos (see geometry's
    ``_theta_over_sin_of_cos``, the eager form with the same floor)."""
    _run("weighted_theta_over_sin", cos, weight, out, sin_floor * sin_floor)


def euclidean_logits(gram: Tensor, norms_u: Tensor, norms_v: Tensor, scale: float) -> None:
    """In place: the Gram block u v^T becomes -scale * sqrt(max(|u|^2 + |v|^2 - 2 u.v, 0))."""
    _run("euclidean_logits", gram, norms_u, norms_v, scale)


def distance_weights(grad: Tensor, logits: Tensor, factor: float, row_sums: Tensor) -> None:
    """In place: grad becomes factor * grad / logits (0 where logits = 0 or the result is not
    finite), and row_sums its row sums."""
    _run("distance_weights", grad, logits, factor, row_sums)


def lorentz_logits(gram: Tensor, t_u: Tensor, t_v: Tensor, c: float, factor: float) -> None:
    """In place: the Gram block becomes factor * acosh(max(c t_u t_v - c u.v, 1))."""
    _run("lorentz_logits", gram, t_u, t_v, c, factor)


def lorentz_weights(grad: Tensor, logits: Tensor, theta_per_logit: float, factor: float) -> tuple[float, float]:
    """In place: grad becomes factor * grad / sinh(theta), theta = theta_per_logit * logits (0 at
    theta = 0); returns (sum grad * logits, sum of the new grad times cosh(theta))."""
    return _run("lorentz_weights", grad, logits, theta_per_logit, factor)


def _run(name: str, *args):
    kernels = _kernels()
    dtype = next(a for a in args if isinstance(a, Tensor)).dtype
    scalar = (torch.empty((), dtype=dtype).numpy()).dtype.type
    converted = [a.detach().numpy() if isinstance(a, Tensor) else scalar(a) if isinstance(a, float) else a for a in args]
    with _launch:
        _match_threads(kernels.numba)
        return getattr(kernels, name)(*converted)


def _match_threads(numba) -> None:
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


@lru_cache(maxsize=1)
def _kernels():
    """The compiled kernels, or None where Numba cannot be imported (the eager path is used)."""
    try:
        from topoclip import _fused_cpu_kernels
    except ImportError:
        return None
    return _fused_cpu_kernels
