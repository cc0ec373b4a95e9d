"""Contrastive loss: forward+backward time and peak memory, side by side in one run.

For each batch size b (d = 512 by default), each in a fresh child process (``child.py``) so
that peak memory is not polluted by earlier runs:

  floor             three plain b x b x d matrix products (the GEMMs any exact loss needs:
                    u v^T forward, G v and G^T u backward)
  openclip          open_clip.loss.ClipLoss on unit-normalised features (if installed)
  <topology>        topoclip.ContrastiveLoss, plain (never tiled)
  <topology> tiled  the exact tiled loss (with --tiled, and always from the tiling threshold on)

× floor is measured in the method's own child by alternating the floor and the method in short
rounds (``rounds.paired_rounds``): the median of the per-round ratios with its interquartile
range, rounds repeated until the range is within ``target_spread`` of the median or the time
budget is spent (then the row is marked unstable). Time is the method's median over those
rounds. Peak memory is the growth of the child's peak resident set over its inputs (CPU), or
torch.cuda.max_memory_allocated on a GPU, read before the paired floor is built. A method
whose b x b matrices would not fit in the memory left is skipped.

sphere and oblique-inner run the same code path (one GEMM on the flattened points): their
ratios measured in one run must agree within the printed spread, a check of the benchmark
itself that ``identical_paths_agree`` reports.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from typing import Callable

import torch

from .child import available_memory_bytes, peak_rss_bytes, reset_peak_rss, rss_bytes, run_child
from .rounds import paired_rounds, timer

__all__ = ["TOPOLOGIES", "AUTO_TILE_BATCH", "identical_paths_agree", "measure", "plan_methods", "run_loss_bench",
           "format_table"]

TOPOLOGIES = ("sphere", "euclidean", "oblique-inner", "oblique-geodesic", "lorentz")
OBLIQUE_BLOCKS = 8          # Ob(d/8, 8): Ob(64, 8) at d = 512
AUTO_TILE_BATCH = 16384     # ContrastiveLoss's default tile_threshold: tiled rows from here on
TILED = " tiled"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # of the features the loss is given
SIGMOID = " sigmoid"  # SigLIP's loss on the topology (with --sigmoid), beside OpenCLIP's SigLipLoss
# Bytes per b^2 a method keeps alive at its peak (fp32 b x b matrices x 4 bytes), used to skip
# a method before trying it. Rough upper guesses; once a method has been measured at a smaller
# b its own peak, scaled by b^2, replaces them.
_BYTES_PER_PAIR = {"floor": 4 * 2, "openclip": 4 * 10, "openclip-siglip": 4 * 10, "sphere": 4 * 6, "oblique-inner": 4 * 6,
                   "euclidean": 4 * 8, "oblique-geodesic": 4 * 8, "lorentz": 4 * 8}


def _topology(name: str, dim: int):
    import topoclip

    if topoclip.is_blockwise(name):
        if dim % OBLIQUE_BLOCKS:
            raise ValueError(f"--dim: {dim} is not divisible by the {OBLIQUE_BLOCKS} oblique blocks")
        return topoclip.topology(name, dim=dim, m=OBLIQUE_BLOCKS)
    return topoclip.topology(name, dim=dim)


def _clear_grads(*tensors: torch.Tensor) -> None:
    # As a training loop's zero_grad(set_to_none=True): the previous step's gradients are not
    # kept alive (and summed into) while the next one runs.
    for t in tensors:
        t.grad = None


def _make_step(method: str, b: int, d: int, device: torch.device, tile_size: int,
               dtype: torch.dtype = torch.float32) -> Callable[[], None]:
    """One fwd+bwd of ``method`` on random features of ``dtype`` (bf16: the features a bf16
    model hands the loss; topoclip computes the loss in fp32 from them, OpenCLIP in bf16)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, d, generator=g).to(device=device, dtype=dtype)
    y = torch.randn(b, d, generator=g).to(device=device, dtype=dtype)
    if method == "floor":
        def step():
            s = x @ y.T
            s @ y
            s.T @ x

        return step
    log_scale = torch.tensor(2.659, device=device, requires_grad=True)
    if method == "openclip":
        from open_clip.loss import ClipLoss

        clip_loss = ClipLoss()
        u = torch.nn.functional.normalize(x, dim=-1).requires_grad_(True)
        v = torch.nn.functional.normalize(y, dim=-1).requires_grad_(True)

        def step():
            _clear_grads(u, v, log_scale)
            clip_loss(u, v, log_scale.exp()).backward()

        return step
    bias = torch.tensor(-10.0, device=device, requires_grad=True)
    if method == "openclip-siglip":
        from open_clip.loss import SigLipLoss

        siglip = SigLipLoss()
        u = torch.nn.functional.normalize(x, dim=-1).requires_grad_(True)
        v = torch.nn.functional.normalize(y, dim=-1).requires_grad_(True)

        def step():
            _clear_grads(u, v, log_scale, bias)
            siglip(u, v, log_scale.exp(), bias).backward()

        return step
    import topoclip
    from topoclip.losses import SigmoidLoss

    name, tiled = (method[: -len(TILED)], True) if method.endswith(TILED) else (method, False)
    name, sigmoid = (name[: -len(SIGMOID)], True) if name.endswith(SIGMOID) else (name, False)
    topo = _topology(name, d)
    # Lorentz points start near the origin (MERU's feature scale); unit-scale tangent vectors.
    scale_in = d ** -0.5 if getattr(topo, "scales_tangent_input", False) else 1.0
    u = topo.project(scale_in * x).to(dtype).detach().requires_grad_(True)
    v = topo.project(scale_in * y).to(dtype).detach().requires_grad_(True)
    threshold = 0 if tiled else None
    if sigmoid:
        sigmoid_fn = SigmoidLoss(topo, tile_threshold=threshold, tile_size=tile_size)

        def step():
            _clear_grads(u, v, log_scale, bias)
            sigmoid_fn(u, v, log_scale.exp(), bias).backward()

        return step
    loss_fn = topoclip.ContrastiveLoss(topo, tile_threshold=threshold, tile_size=tile_size)

    def step():
        _clear_grads(u, v, log_scale)
        loss_fn(u, v, log_scale.exp()).backward()

    return step


def measure(method: str, b: int, d: int, repeats: int, device: str, tile_size: int = 1024,
            paired: bool = True, budget_seconds: float = 30.0, target_spread: float = 0.10,
            dtype: str = "fp32") -> dict:
    """Median fwd+bwd seconds, peak memory growth (bytes) and the ratio to the three-GEMM floor
    of one method (run in a child).

    The ratio comes from alternating rounds of floor and method in this very process
    (``rounds.paired_rounds``, at least ``repeats`` rounds): on a shared or throttled machine
    the speed drifts between and within child processes, while neighbouring calls see the same
    machine. ``paired=False`` (the floor's b x b matrix would not fit) times the method alone.
    """
    dev = torch.device(device)
    time_call = timer(dev)
    features = DTYPES[dtype]
    # A tiny run first initialises what is paid once per process (thread pool, autograd engine,
    # lazy imports), so that the peak below is the method's own.
    _make_step(method, min(b, 64), d, dev, tile_size, features)()
    step = _make_step(method, b, d, dev, tile_size, features)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        reset_peak_rss()
        base = rss_bytes()
    step()  # warm-up (allocator, thread pool)
    first = time_call(step)
    # The peak is read before the floor's own matrices exist in this process.
    peak = (torch.cuda.max_memory_allocated(dev) if cuda else peak_rss_bytes()) - base
    result = {"peak": max(peak, 0)}
    if method == "floor" or not paired:
        times = [first] + [time_call(step) for _ in range(repeats - 1)]
        return {"time": statistics.median(times), **result, **({"floor_ratio": 1.0} if method == "floor" else {})}
    floor = _make_step("floor", b, d, dev, tile_size, features)
    floor()
    rounds = paired_rounds(step, floor, time_call, min_rounds=repeats, max_rounds=max(repeats, 41),
                           budget_seconds=budget_seconds, target_spread=target_spread, first_method_time=first)
    return {**result, **rounds.as_dict()}


def plan_methods(b: int, topologies, tiled: bool, openclip: bool = True, sigmoid: bool = False) -> list[str]:
    """The methods measured at batch b: floor, OpenCLIP, each topology plain and maybe tiled;
    with ``sigmoid`` also OpenCLIP's SigLipLoss and each topology's sigmoid loss."""
    losses = list(topologies) + ([t + SIGMOID for t in topologies] if sigmoid else [])
    methods = ["floor"] + (["openclip"] if openclip else []) + (["openclip-siglip"] if openclip and sigmoid else []) + losses
    if tiled or b >= AUTO_TILE_BATCH:
        methods += [t + TILED for t in losses]
    return methods


def _estimate(method: str, b: int, d: int, measured: dict[str, tuple[int, int]]) -> int | None:
    """Bytes the method needs at batch b, or None for the tiled loss (O(b d + tile^2))."""
    if method.endswith(TILED):
        return None
    if method in measured:
        b0, peak0 = measured[method]
        return int(peak0 * (b / b0) ** 2)
    return _BYTES_PER_PAIR.get(method.removesuffix(SIGMOID), 4 * 8) * b * b + 4 * 4 * b * d


def _memory_budget(device: str) -> int | None:
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return available_memory_bytes()


def run_loss_bench(batches, dim: int = 512, topologies=TOPOLOGIES, tiled: bool = False, repeats: int = 5,
                   device: str = "cpu", tile_size: int = 1024, memory_gib: float | None = None,
                   openclip: bool = True, log: Callable[[str], None] | None = None, sigmoid: bool = False,
                   budget_seconds: float = 30.0, target_spread: float = 0.10, dtype: str = "fp32",
                   deadline: float | None = None) -> list[dict]:
    """Measure every (method, b) in the order given; returns rows {b, method, time, peak} or
    {b, method, skipped}. ``deadline`` (a ``time.monotonic()`` value): later methods are listed
    as skipped for time."""
    for t in topologies:
        if t not in TOPOLOGIES:
            raise ValueError(f"--topologies: unknown topology {t!r} (choose from {', '.join(TOPOLOGIES)})")
    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    if any(b < 1 for b in batches) or dim < 1 or repeats < 1:
        raise ValueError("--batch, --dim and --repeats must be >= 1")
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    has_openclip = openclip and importlib.util.find_spec("open_clip") is not None
    if openclip and not has_openclip:
        log("open_clip is not installed: no OpenCLIP rows")
    budget = int(memory_gib * 2**30) if memory_gib is not None else _memory_budget(device)
    measured: dict[str, tuple[int, int]] = {}
    rows = []
    for b in batches:
        for method in plan_methods(b, topologies, tiled, has_openclip, sigmoid):
            if deadline is not None and time.monotonic() > deadline:
                rows.append({"b": b, "method": method, "skipped": "skipped (time budget spent)"})
                continue
            need = _estimate(method, b, dim, measured)
            # 10% headroom: the estimate leaves out the process itself and the allocator's slack.
            if budget is not None and need is not None and need > 0.9 * budget:
                rows.append({"b": b, "method": method, "skipped": f"skipped (needs ~{need / 2**30:.1f} GiB)"})
                log(f"  b={b:6d} {method:24s} skipped (needs ~{need / 2**30:.1f} GiB, {budget / 2**30:.1f} GiB free)")
                continue
            floor_done = any(r["b"] == b and r["method"] == "floor" and "time" in r for r in rows)
            params = dict(method=method, b=b, d=dim, repeats=repeats, device=device, tile_size=tile_size,
                          paired=floor_done, budget_seconds=budget_seconds, target_spread=target_spread, dtype=dtype)
            # On the CPU the child is also stopped at the budget, before the kernel's OOM killer
            # picks a victim (it is listed as failed).
            out = run_child("loss", params, limit_bytes=budget if torch.device(device).type == "cpu" else None)
            if not out.ok:
                rows.append({"b": b, "method": method, "skipped": f"failed ({out.error})"})
                log(f"  b={b:6d} {method:24s} failed: {out.error}")
                continue
            res = out.result
            if res["peak"] > 0:
                measured[method] = (b, res["peak"])
            rows.append({"b": b, "method": method, "dtype": dtype, **res})
            ratio = f"  x floor {_floor_ratio(res, None)}" if "ratio_low" in res else ""
            log(f"  b={b:6d} {method:24s} {res['time'] * 1e3:10.1f} ms {res['peak'] / 2**20:10.1f} MiB{ratio}")
    return rows


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def _floor_ratio(row: dict, floor: dict | None) -> str:
    """× floor: the median of the alternating rounds in the row's own process with its
    interquartile range (and ``unstable`` when that stayed wide), else the ratio of medians."""
    if "ratio_low" in row:
        text = f"{row['floor_ratio']:.2f} [{row['ratio_low']:.2f}, {row['ratio_high']:.2f}]"
        return text if row.get("stable", True) else f"{text} unstable"
    if "floor_ratio" in row:
        return f"{row['floor_ratio']:.2f}"
    return _ratio(row["time"], floor and floor["time"])


def identical_paths_agree(rows: list[dict], a: str = "sphere", b: str = "oblique-inner") -> list[str]:
    """For each batch where both were measured: whether two methods that run the same code path
    (one GEMM on flattened points) agree within the range of their rounds (min to max: they
    ran in two child processes, whose memory placement alone moves a GEMM by a few percent),
    as they must if the benchmark tells the truth."""
    lines = []
    for batch in sorted({r["b"] for r in rows}):
        at = {r["method"]: r for r in rows if r["b"] == batch and "ratio_low" in r}
        if a in at and b in at:
            ra, rb = at[a], at[b]
            lo_a, hi_a = ra.get("ratio_min", ra["ratio_low"]), ra.get("ratio_max", ra["ratio_high"])
            lo_b, hi_b = rb.get("ratio_min", rb["ratio_low"]), rb.get("ratio_max", rb["ratio_high"])
            overlap = lo_a <= hi_b and lo_b <= hi_a
            verdict = "agree within their ranges" if overlap else "DISAGREE beyond their ranges (the machine was too noisy)"
            lines.append(f"b={batch}: {a} {ra['floor_ratio']:.2f} (rounds {lo_a:.2f}-{hi_a:.2f}) and {b} "
                         f"{rb['floor_ratio']:.2f} (rounds {lo_b:.2f}-{hi_b:.2f}), the same code path: {verdict}")
    return lines


def format_table(rows: list[dict]) -> str:
    """Markdown table: time and memory with ratios to the floor, to OpenCLIP and tiled/plain."""
    lines = [
        "| b | method | time (ms) | × floor | × OpenCLIP | peak MiB | mem × OpenCLIP | tiled/plain time | tiled/plain mem |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in sorted({r["b"] for r in rows}):
        at = {r["method"]: r for r in rows if r["b"] == b}
        done = {m: r for m, r in at.items() if "time" in r}
        floor, oc = done.get("floor"), done.get("openclip")
        for method, r in at.items():
            if "time" not in r:
                lines.append(f"| {b} | {method} | {r['skipped']} | | | | | | |")
                continue
            plain = done.get(method[: -len(TILED)]) if method.endswith(TILED) else None
            cells = [
                f"{r['time'] * 1e3:.1f}",
                _floor_ratio(r, floor),
                _ratio(r["time"], oc and oc["time"]),
                f"{r['peak'] / 2**20:.1f}",
                _ratio(r["peak"], oc and oc["peak"]),
                _ratio(r["time"], plain and plain["time"]),
                _ratio(r["peak"], plain and plain["peak"]),
            ]
            lines.append(f"| {b} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
