"""The benchmark's ratio logic on a fake clock: alternating rounds of floor and method give the
true ratio on a machine that slows down midway (where timing the two in separate stretches does
not), noise widens the printed spread until the row is marked unstable, and two identical code
paths agree within their spreads. No real timing is asserted."""

import random
import statistics

import pytest

from topoclip.bench.loss import format_table, identical_paths_agree
from topoclip.bench.rounds import machine_line, paired_rounds, quartiles


class FakeMachine:
    """Steps advance a fake clock by cost x slowdown; the slowdown may change after some calls
    (another job taking the cores) and may carry multiplicative noise."""

    def __init__(self, slow_after=None, factor=3.0, noise=0.0, seed=0):
        self.now, self.calls = 0.0, 0
        self.slow_after, self.factor, self.noise = slow_after, factor, noise
        self.rng = random.Random(seed)

    def step(self, cost):
        def run():
            self.calls += 1
            slow = self.factor if self.slow_after is not None and self.calls > self.slow_after else 1.0
            jitter = 1.0 + self.noise * (2 * self.rng.random() - 1)
            self.now += cost * slow * jitter
        return run

    def time_call(self, step):
        t0 = self.now
        step()
        return self.now - t0


def test_alternating_rounds_see_through_a_machine_that_slows_down_midway():
    machine = FakeMachine(slow_after=9)
    floor, method = machine.step(1.0), machine.step(2.0)
    got = paired_rounds(method, floor, machine.time_call, min_rounds=9, target_spread=0.05)
    assert got.ratio == pytest.approx(2.0) and got.stable and got.rounds == 9
    # the one round that straddles the change is an outlier the median and quartiles ignore
    assert got.low == pytest.approx(2.0) and got.high == pytest.approx(2.0)
    assert got.minimum == pytest.approx(2.0) and got.maximum == pytest.approx(3.0)  # the straddling round
    # timing all floors, then all methods (two stretches) reads the slowdown as the method's
    naive = FakeMachine(slow_after=9)
    floors = [naive.time_call(naive.step(1.0)) for _ in range(9)]
    methods = [naive.time_call(naive.step(2.0)) for _ in range(9)]
    assert statistics.median(methods) / statistics.median(floors) == pytest.approx(6.0)


def test_noise_widens_the_spread_and_a_row_that_stays_wide_is_unstable():
    calm = FakeMachine(noise=0.01)
    quiet = paired_rounds(calm.step(1.5), calm.step(1.0), calm.time_call, min_rounds=5, target_spread=0.10)
    assert quiet.stable and quiet.rounds == 5 and quiet.ratio == pytest.approx(1.5, rel=0.03)
    noisy_machine = FakeMachine(noise=0.6, seed=1)
    noisy = paired_rounds(noisy_machine.step(1.5), noisy_machine.step(1.0), noisy_machine.time_call,
                          min_rounds=5, max_rounds=15, budget_seconds=1e9, target_spread=0.05)
    assert not noisy.stable and noisy.rounds == 15 and noisy.spread > 0.05
    assert noisy.low <= noisy.ratio <= noisy.high
    budget_machine = FakeMachine(noise=0.6, seed=2)
    capped = paired_rounds(budget_machine.step(1.5), budget_machine.step(1.0), budget_machine.time_call,
                           min_rounds=3, max_rounds=1000, budget_seconds=20.0, target_spread=0.0)
    assert not capped.stable and capped.rounds < 1000  # the time budget ended it
    row = {"b": 64, "method": "sphere", "peak": 0, **noisy.as_dict()}
    assert "unstable" in format_table([row])


def test_identical_code_paths_agree_within_their_spread_and_a_disagreement_is_said():
    machine = FakeMachine(slow_after=20, noise=0.05, seed=3)
    floor = machine.step(1.0)
    rows = []
    for name in ("sphere", "oblique-inner"):  # the same cost: the same code path
        m = paired_rounds(machine.step(1.2), floor, machine.time_call, min_rounds=7, target_spread=0.2)
        rows.append({"b": 8192, "method": name, "peak": 0, **m.as_dict()})
    (line,) = identical_paths_agree(rows)
    assert "agree within their ranges" in line
    rows[1] = {**rows[1], "floor_ratio": 3.0, "ratio_low": 2.9, "ratio_high": 3.1, "ratio_min": 2.8, "ratio_max": 3.2}
    assert "DISAGREE" in identical_paths_agree(rows)[0]


def test_quartiles_and_the_machine_line():
    assert quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)
    assert quartiles([7.0]) == (7.0, 7.0, 7.0)
    line = machine_line()
    assert "threads" in line and "load average" in line and "logical cores" in line
    with pytest.raises(ValueError, match="min_rounds"):
        paired_rounds(lambda: None, lambda: None, lambda s: 1.0, min_rounds=0)
