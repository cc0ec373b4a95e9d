"""When did the learned temperature settle? The "converge step" of *Design of the topology for contrastive visual-textual alignment*, Table 6.

The paper defines it as the step after which the temperature "changes less than 2% for an
epoch". Made exact here:

* Evaluation points are whole epochs counted from the first logged step ``s0``:
  ``t_j = s0 + j * steps_per_epoch`` for every ``t_j <= last logged step``. The scale at
  ``t_j`` is linearly interpolated between logged points, so any logging interval works
  (logging at epoch ends makes the interpolation exact).
* The change over epoch j is ``|scale(t_{j+1}) - scale(t_j)| / |scale(t_j)|``, relative to
  the scale at the start of the epoch.
* The converge step is the first ``t_j`` such that EVERY later epoch changes by less than
  ``rel_tol`` (0.02). It is ``None`` when the last epoch still changes by ``rel_tol`` or more
  (never converged within the run) or when the run is shorter than one epoch (nothing to
  judge). A constant trajectory converges at ``s0``.

Requiring every later epoch (not just one quiet epoch) keeps a plateau followed by a second
rise from being reported as converged. Epoch granularity is what the definition asks for; a
result is therefore a multiple of ``steps_per_epoch`` after ``s0``.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

__all__ = ["temperature_convergence_step", "epoch_relative_changes"]


def _clean_trajectory(trajectory: Iterable[Sequence[float]]) -> tuple[list[float], list[float]]:
    points = []
    for i, item in enumerate(trajectory):
        try:
            step, scale = item
            step, scale = float(step), float(scale)
        except (TypeError, ValueError):
            raise ValueError(f"trajectory[{i}] must be a (step, scale) pair of numbers, got {item!r}") from None
        if not math.isfinite(step) or not math.isfinite(scale):
            raise ValueError(f"trajectory[{i}] = ({step}, {scale}) is not finite (a diverged run has no converge step)")
        if scale == 0:
            raise ValueError(f"trajectory[{i}]: scale 0 has no relative change")
        points.append((step, i, scale))
    if not points:
        raise ValueError("trajectory is empty")
    # A resumed run may log a step twice; the later entry (after the resume) wins.
    by_step: dict[float, float] = {}
    for step, _, scale in sorted(points):
        by_step[step] = scale
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _interpolate(steps: list[float], scales: list[float], t: float, start: int) -> tuple[float, int]:
    """Scale at t (steps[0] <= t <= steps[-1]) and the segment index, scanning from ``start``."""
    i = start
    while i + 1 < len(steps) and steps[i + 1] < t:
        i += 1
    if i + 1 == len(steps) or t <= steps[i]:
        return scales[i], i
    w = (t - steps[i]) / (steps[i + 1] - steps[i])
    return scales[i] + w * (scales[i + 1] - scales[i]), i


def epoch_relative_changes(
    trajectory: Iterable[Sequence[float]], steps_per_epoch: int
) -> list[tuple[float, float]]:
    """``[(t_j, relative change over epoch j)]`` for every whole epoch in the trajectory."""
    if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be an integer >= 1, got {steps_per_epoch!r}")
    steps, scales = _clean_trajectory(trajectory)
    num_epochs = int((steps[-1] - steps[0]) // steps_per_epoch)
    values, segment = [], 0
    for j in range(num_epochs + 1):
        value, segment = _interpolate(steps, scales, steps[0] + j * steps_per_epoch, segment)
        values.append(value)
    return [
        (steps[0] + j * steps_per_epoch, abs(values[j + 1] - values[j]) / abs(values[j]))
        for j in range(num_epochs)
    ]


def temperature_convergence_step(
    trajectory: Iterable[Sequence[float]], steps_per_epoch: int, rel_tol: float = 0.02
) -> int | float | None:
    """First epoch point after which the scale changes by < ``rel_tol`` per epoch, or None.

    ``trajectory`` is a sequence of ``(step, scale)`` (the logit scale 1/T, or T itself: the
    definition is relative, though not symmetric between the two). See the module docstring
    for the exact definition. Returns an int when the steps are integers.
    """
    if isinstance(rel_tol, bool) or not isinstance(rel_tol, (int, float)) or not rel_tol > 0:
        raise ValueError(f"rel_tol must be a positive number, got {rel_tol!r}")
    changes = epoch_relative_changes(trajectory, steps_per_epoch)
    converged_at = None
    for t, change in reversed(changes):
        if change >= rel_tol:
            break
        converged_at = t
    if converged_at is not None and float(converged_at).is_integer():
        return int(converged_at)
    return converged_at
