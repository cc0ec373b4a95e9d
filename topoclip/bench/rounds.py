"""Ratios of two timings that stay true on a busy machine.

On shared cores the speed drifts by tens of percent within seconds, so a method timed in one
stretch and its reference in another can be off by a factor of three. Here the two alternate
in short rounds, ``floor, method, floor, method, floor, ...``: each method call is compared
with the mean of the floor calls just before and just after it, so a change of speed that
lasts longer than a round cancels. The median of those per-round ratios is the result; its
interquartile range is the spread. Rounds go on until the spread is small (``target_spread``
of the median, after ``min_rounds``) or the time budget is spent; a measurement whose spread
stayed wide is marked unstable rather than reported as a plain number.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["RatioMeasurement", "load_average", "machine_line", "paired_rounds", "quartiles", "timer"]


@dataclass(frozen=True)
class RatioMeasurement:
    """``ratio``: median over rounds of method time / floor time; ``low``/``high``: its first
    and third quartiles; ``rounds``; the median seconds of each; ``stable``: the spread
    (high - low) / ratio reached the target; ``minimum``/``maximum``: the range of the rounds
    (wider: what a comparison between two child processes is held to)."""

    ratio: float
    low: float
    high: float
    rounds: int
    method_time: float
    floor_time: float
    stable: bool
    minimum: float = float("nan")  # the smallest and largest per-round ratio
    maximum: float = float("nan")

    @property
    def spread(self) -> float:
        return (self.high - self.low) / self.ratio if self.ratio else float("inf")

    def as_dict(self) -> dict:
        return {"floor_ratio": self.ratio, "ratio_low": self.low, "ratio_high": self.high, "rounds": self.rounds,
                "time": self.method_time, "floor_time": self.floor_time, "stable": self.stable,
                "ratio_min": self.minimum, "ratio_max": self.maximum}


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile), linear between order statistics."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def timer(device: torch.device | str = "cpu", clock: Callable[[], float] | None = None) -> Callable[[Callable[[], None]], float]:
    """``time_call(step) -> seconds``, synchronising a CUDA device around the step; ``clock``
    defaults to ``time.perf_counter`` (looked up at each call, so a test can replace it)."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"

    def time_call(step: Callable[[], None]) -> float:
        now = clock or time.perf_counter
        if cuda:
            torch.cuda.synchronize(dev)
        t0 = now()
        step()
        if cuda:
            torch.cuda.synchronize(dev)
        return now() - t0

    return time_call


def paired_rounds(method: Callable[[], None], floor: Callable[[], None], time_call: Callable[[Callable[[], None]], float],
                  *, min_rounds: int = 5, max_rounds: int = 41, budget_seconds: float = 60.0, target_spread: float = 0.10,
                  first_method_time: float | None = None) -> RatioMeasurement:
    """Alternate ``floor`` and ``method`` (both warmed up already) and return the median ratio.

    ``time_call`` times one call (see :func:`timer`; tests pass a fake clock). The budget
    counts the timed seconds of both. ``first_method_time``: a method time already taken (the
    one measured with the memory peak), used as the first round's.
    """
    if min_rounds < 1 or max_rounds < min_rounds:
        raise ValueError(f"rounds: need 1 <= min_rounds <= max_rounds, got {min_rounds}, {max_rounds}")
    floors = [time_call(floor)]
    methods: list[float] = []
    ratios: list[float] = []
    spent = floors[0]
    while True:
        t_method = first_method_time if not methods and first_method_time is not None else time_call(method)
        t_floor = time_call(floor)
        methods.append(t_method)
        floors.append(t_floor)
        spent += t_method + t_floor
        ratios.append(t_method / (0.5 * (floors[-2] + t_floor)))
        if len(ratios) >= min_rounds:
            low, mid, high = quartiles(ratios)
            stable = (high - low) <= target_spread * mid
            if stable or len(ratios) >= max_rounds or spent >= budget_seconds:
                return RatioMeasurement(mid, low, high, len(ratios), statistics.median(methods),
                                        statistics.median(floors), stable, min(ratios), max(ratios))


def machine_line() -> str:
    """CPU model, threads and the load average: what a reader needs to weigh a timing."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    cores = os.cpu_count()
    return f"{cpu}, {cores} logical cores, torch {torch.__version__} with {torch.get_num_threads()} threads, {load_average()}"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (how many other processes wanted the cores)."""
    try:
        return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"
