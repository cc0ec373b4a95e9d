"""Temperature converge step (Table 6): hand-computed trajectories and edge cases."""
import pytest

from topoclip.eval.convergence import epoch_relative_changes, temperature_convergence_step


def test_hand_computed_settling_trajectory():
    # Logged at epoch ends (100 steps per epoch). Relative change per epoch:
    #   0->100: 14.3 -> 20   : 39.9%     100->200: 20 -> 25   : 25%
    #   200->300: 25 -> 25.4 : 1.6%      300->400: 25.4 -> 25.8: 1.57%
    # Every epoch from step 200 on changes < 2%  ->  converge step 200.
    traj = [(0, 14.3), (100, 20.0), (200, 25.0), (300, 25.4), (400, 25.8)]
    assert temperature_convergence_step(traj, steps_per_epoch=100) == 200
    changes = epoch_relative_changes(traj, 100)
    assert [t for t, _ in changes] == [0, 100, 200, 300]
    assert changes[2][1] == pytest.approx(0.4 / 25)


def test_a_quiet_epoch_followed_by_a_rise_is_not_convergence():
    # 100->200 changes 1% (quiet) but 200->300 changes 10%: only the last epoch (1%) counts.
    traj = [(0, 10.0), (100, 20.0), (200, 20.2), (300, 22.22), (400, 22.3)]
    assert temperature_convergence_step(traj, 100) == 300


def test_never_converges_gives_none():
    # Last epoch still changes by 5% >= 2%.
    traj = [(0, 10.0), (100, 10.1), (200, 10.605)]
    assert temperature_convergence_step(traj, 100) is None
    # Exactly 2% is not "less than 2%".
    assert temperature_convergence_step([(0, 50.0), (100, 51.0)], 100) is None


def test_constant_converges_at_first_step_and_short_runs_are_undecided():
    assert temperature_convergence_step([(5, 1.0), (55, 1.0), (105, 1.0), (205, 1.0)], 100) == 5
    # Shorter than one epoch: nothing to judge.
    assert temperature_convergence_step([(0, 1.0), (50, 1.0)], 100) is None
    assert temperature_convergence_step([(0, 1.0)], 100) is None


def test_interpolates_between_logged_steps():
    # Logged every 40 steps, epoch = 100 steps, linear ramp 10 -> 14 over steps 0..160 then flat.
    # scale(0)=10, scale(100)=12.5, scale(200)=14 -> changes 25%, 12%: never converged.
    # Extend flat to 400: scale(300)=14, scale(400)=14 -> changes 0, 0: converged at step 200.
    ramp = [(s, 10.0 + 4.0 * min(s, 160) / 160) for s in range(0, 401, 40)]
    changes = epoch_relative_changes(ramp, 100)
    assert [c for _, c in changes] == pytest.approx([0.25, 1.5 / 12.5, 0.0, 0.0])
    assert temperature_convergence_step(ramp, 100) == 200


def test_unsorted_and_resumed_duplicates():
    # Steps out of order are sorted; a step logged twice keeps the later (post-resume) value.
    traj = [(100, 99.0), (0, 10.0), (200, 10.1), (100, 10.0), (300, 10.15)]
    assert temperature_convergence_step(traj, 100) == 0


def test_custom_tolerance_and_float_steps():
    traj = [(0.0, 10.0), (1.5, 10.4), (3.0, 10.5)]  # changes 4%, 0.96%
    assert temperature_convergence_step(traj, 1, rel_tol=0.05) == 0
    assert epoch_relative_changes([(0.5, 1.0), (1.5, 2.0)], 1) == [(0.5, 1.0)]


@pytest.mark.parametrize(
    "traj,spe,tol,match",
    [
        ([], 10, 0.02, "empty"),
        ([(0, 1.0)], 0, 0.02, "steps_per_epoch"),
        ([(0, 1.0)], 1.5, 0.02, "steps_per_epoch"),
        ([(0, float("nan"))], 10, 0.02, "not finite"),
        ([(0, 0.0), (10, 1.0)], 10, 0.02, "scale 0"),
        ([(0,)], 10, 0.02, r"trajectory\[0\]"),
        ([(0, 1.0)], 10, 0.0, "rel_tol"),
    ],
)
def test_bad_input(traj, spe, tol, match):
    with pytest.raises(ValueError, match=match):
        temperature_convergence_step(traj, spe, rel_tol=tol)
