"""topoclip bench: each action at a tiny size, and the max-batch search on a fake trial."""

import math

import pytest

from tests.helpers import TINY_TOWERS
from topoclip.bench.loss import AUTO_TILE_BATCH, format_table, plan_methods, run_loss_bench
from topoclip.bench.max_batch import format_trials, run_max_batch, search_max_batch


def _fake(threshold):
    calls = []

    def fits(b):
        calls.append(b)
        return b <= threshold

    return fits, calls


@pytest.mark.parametrize("threshold", [1, 63, 64, 65, 1000, 4095])
def test_search_doubles_then_bisects_to_the_exact_threshold(threshold):
    fits, calls = _fake(threshold)
    lo, hi = search_max_batch(fits, start=64, max_batch=1 << 20, bisect=30)
    assert (lo, hi) == (threshold, threshold + 1)
    # Bisection costs about log2 of the bracket, not a scan.
    assert len(calls) <= 2 * math.log2(max(threshold, 64)) + 4


def test_search_without_bisection_reports_the_doubling_bracket():
    fits, calls = _fake(1000)
    assert search_max_batch(fits, start=64, max_batch=1 << 20) == (512, 1024)
    assert calls == [64, 128, 256, 512, 1024]


def test_search_stops_at_the_cap_and_respects_granularity():
    fits, calls = _fake(10**9)
    assert search_max_batch(fits, start=8, max_batch=100) == (64, None)
    assert calls == [8, 16, 32, 64]
    fits, calls = _fake(1000)
    lo, hi = search_max_batch(fits, start=256, max_batch=4096, bisect=10, granularity=256)
    assert (lo, hi) == (768, 1024) and all(c % 256 == 0 for c in calls)


def test_search_rejects_bad_bounds():
    with pytest.raises(ValueError, match="start"):
        search_max_batch(lambda b: True, start=0, max_batch=8)


def test_plan_methods_adds_tiled_rows_from_the_threshold():
    assert plan_methods(64, ["sphere"], tiled=False) == ["floor", "openclip", "sphere"]
    assert plan_methods(AUTO_TILE_BATCH, ["sphere"], tiled=False)[-1] == "sphere tiled"
    assert plan_methods(64, ["lorentz"], tiled=True, sigmoid=True) == [
        "floor", "openclip", "openclip-siglip", "lorentz", "lorentz sigmoid", "lorentz tiled", "lorentz sigmoid tiled"]


def _cells(table, method):
    (line,) = [line for line in table.splitlines() if line.split("|")[2].strip() == method]
    return [c.strip() for c in line.split("|")[1:-1]]


def test_loss_bench_tiny_table_has_every_row_and_finite_ratios():
    rows = run_loss_bench([64], dim=16, topologies=["sphere"], tiled=True, repeats=1, openclip=False, log=lambda m: None)
    assert [r["method"] for r in rows] == ["floor", "sphere", "sphere tiled"]
    assert all(r["time"] > 0 and math.isfinite(r["time"]) and r["peak"] >= 0 for r in rows)
    table = format_table(rows)
    assert len(table.splitlines()) == 2 + 3
    t = {r["method"]: r["time"] for r in rows}
    tiled = _cells(table, "sphere tiled")
    # × floor is the ratio paired inside the method's own process; tiled/plain time is a ratio
    # of the measured medians; no OpenCLIP row, no ratio.
    assert [r["floor_ratio"] > 0 for r in rows] == [True] * 3 and rows[0]["floor_ratio"] == 1.0
    assert float(tiled[3].split()[0]) == pytest.approx(rows[2]["floor_ratio"], abs=0.006)
    assert tiled[3].split()[1].startswith("[")  # its interquartile range over the rounds
    assert tiled[4] == "-"
    assert float(tiled[7]) == pytest.approx(t["sphere tiled"] / t["sphere"], rel=0.01, abs=0.01)
    assert _cells(table, "floor")[3] == "1.00"


@pytest.mark.slow
def test_loss_bench_openclip_row_and_ratios():
    pytest.importorskip("open_clip")
    rows = run_loss_bench([64], dim=16, topologies=["sphere"], repeats=1, log=lambda m: None)
    assert [r["method"] for r in rows] == ["floor", "openclip", "sphere"]
    table = format_table(rows)
    t = {r["method"]: r["time"] for r in rows}
    assert float(_cells(table, "sphere")[4]) == pytest.approx(t["sphere"] / t["openclip"], rel=0.01, abs=0.01)
    assert _cells(table, "openclip")[4] == "1.00"


def test_loss_bench_skips_what_does_not_fit():
    rows = run_loss_bench([4096], dim=16, topologies=["sphere"], memory_gib=1e-6, log=lambda m: None)
    assert all(r["skipped"].startswith("skipped (needs ~") for r in rows)
    assert "skipped (needs ~" in format_table(rows)


def test_loss_bench_rejects_unknown_topology():
    with pytest.raises(ValueError, match="--topologies"):
        run_loss_bench([64], topologies=["torus"])


def test_max_batch_tiny_model_runs_real_trials():
    # One real trial (each child imports torch and the trainer: seconds); the search itself is
    # tested above on a fake trial.
    res = run_max_batch(limit_gib=8, chunk=16, start=64, max_batch=64, overrides=TINY_TOWERS, log=lambda m: None)
    assert res["largest"] == 64 and res["smallest_failing"] is None
    assert [t["batch"] for t in res["trials"]] == [64]
    assert all(t["ok"] and t["peak"] > 0 and t["step_time"] > 0 for t in res["trials"])
    assert "largest exact step within 8 GiB (chunk 16): 64 (search cap reached)" in format_trials(res)


def test_max_batch_trial_over_the_limit_is_stopped_and_fails():
    # A few MiB: the child passes it while importing torch and is killed.
    res = run_max_batch(limit_gib=0.02, chunk=1, start=1, max_batch=1, overrides=TINY_TOWERS, log=lambda m: None)
    assert res["largest"] is None and res["smallest_failing"] == 1
    (t,) = res["trials"]
    assert not t["ok"] and t["error"].startswith("exceeded")


def test_train_step_bench_tiny_model_reports_a_finite_ratio():
    pytest.importorskip("open_clip")
    from topoclip.bench.train_step import format_result, run_train_step_bench

    res = run_train_step_bench(batch=4, model="topoclip-bench-tiny", steps=2, log=lambda m: None)
    assert res["openclip"] > 0 and res["topoclip"] > 0
    assert res["ratio"] == pytest.approx(res["topoclip"] / res["openclip"])
    assert "| topoclip-bench-tiny | 4 |" in format_result(res)


def test_cli_bench_parses_and_reports_bad_input(capsys):
    from topoclip.cli import build_parser, main

    args = build_parser().parse_args(["bench", "max-batch", "--limit-gib", "2", "--max", "1024", "model.image.depth=1"])
    assert (args.bench_action, args.limit_gib, args.max_batch, args.chunk, args.overrides) == (
        "max-batch", 2.0, 1024, 256, ["model.image.depth=1"])
    assert main(["bench", "loss", "--batch", "64", "--topologies", "torus"]) == 2
    assert "--topologies: unknown topology 'torus'" in capsys.readouterr().err
    assert main(["bench", "max-batch", "--start", "4096", "--max", "1024"]) == 2


def test_measure_pairs_the_method_with_the_floor_in_its_own_process(monkeypatch):
    """× floor is the median of per-round ratios (method step between two floor steps), not a
    ratio of separately taken medians: a machine that slows down halfway scales both alike."""
    from topoclip.bench import loss as bench_loss
    from topoclip.bench import rounds

    clock = {"now": 0.0, "speed": 1.0, "steps": 0}
    costs = {"floor": 1.0, "sphere": 1.3}

    def fake_make_step(method, b, d, dev, tile_size, dtype=None):
        def step():
            clock["steps"] += 1
            if clock["steps"] > 7:
                clock["speed"] = 3.0  # from the third (floor, method) pair on, three times slower
            clock["now"] += costs[method] * clock["speed"]
        return step

    monkeypatch.setattr(bench_loss, "_make_step", fake_make_step)
    monkeypatch.setattr(rounds.time, "perf_counter", lambda: clock["now"])
    res = bench_loss.measure("sphere", b=8, d=4, repeats=5, device="cpu")
    assert res["floor_ratio"] == pytest.approx(1.3) and res["stable"] and res["rounds"] == 5
    assert res["ratio_low"] == pytest.approx(1.3) and res["ratio_high"] == pytest.approx(1.3)
    assert bench_loss.measure("sphere", b=8, d=4, repeats=3, device="cpu", paired=False).keys() == {"time", "peak"}


def test_table_reports_the_paired_floor_ratio_and_the_tiled_ratios():
    mib = 2**20
    rows = [
        {"b": 8192, "method": "floor", "time": 1.0, "peak": 300 * mib},
        # paired in its own process: this 1.3, not 1.45 / 1.0, is the ratio checked
        {"b": 8192, "method": "sphere", "time": 1.45, "peak": 1000 * mib, "floor_ratio": 1.3},
        {"b": 8192, "method": "oblique-inner", "time": 1.5, "peak": 1000 * mib},
        {"b": 16384, "method": "sphere", "time": 4.0, "peak": 4000 * mib},
        {"b": 16384, "method": "sphere tiled", "time": 5.0, "peak": 100 * mib},
        {"b": 16384, "method": "euclidean", "skipped": "skipped (needs ~30.0 GiB)"},
    ]
    table = format_table(rows)
    # × floor: the paired ratio where the row has one (1.3, not 1.45 / 1.0), else of the medians.
    at_8192 = {line.split("|")[2].strip(): line.split("|")[4].strip() for line in table.splitlines() if line.startswith("| 8192 |")}
    assert at_8192["sphere"] == "1.30" and at_8192["oblique-inner"] == "1.50"
    assert "| 16384 | euclidean | skipped (needs ~30.0 GiB) |" in table
    assert _cells(table, "sphere tiled")[7:] == ["1.25", "0.03"]


def test_the_gpu_benchmark_says_there_is_no_gpu_and_writes_nothing(tmp_path, monkeypatch):
    from topoclip.bench import gpu

    monkeypatch.setattr(gpu.torch.cuda, "is_available", lambda: False)
    said = []
    assert gpu.run_gpu_bench(tmp_path / "gpu.md", log=said.append) is None
    assert not (tmp_path / "gpu.md").exists() and "no CUDA device" in said[0] and "bench/gpu.sh" in said[0]
    full = gpu.plan_for(tiny=False)  # the GPU plan: b from 8,192 to 131,072, a step at 65,536
    assert sorted(full.batches) == [8192, 16384, 32768, 65536, 131072] and full.step_batch == 65536
    assert full.dtypes == ("fp32", "bf16") and "model.image.width=768" in full.step_overrides


@pytest.mark.slow
def test_the_gpu_benchmark_plan_runs_at_toy_sizes_on_the_cpu(tmp_path):
    from topoclip.bench.gpu import run_gpu_bench

    text = run_gpu_bench(tmp_path / "gpu.md", tiny=True, log=lambda m: None)
    assert text == (tmp_path / "gpu.md").read_text()
    for heading in ("## 1. Loss", "### fp32 features", "### bf16 features", "## 2. One exact training step",
                    "## 3. Training step against OpenCLIP", "## 4. Two processes (gloo)"):
        assert heading in text
    assert "| 32 | openclip-siglip |" in text and "| 32 | euclidean sigmoid tiled |" in text
    assert "failed" not in text and "median step" in text
