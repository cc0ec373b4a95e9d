"""Contrastive loss: forward+backward time and peak memory, side by side in one run.

For each batch size b (d = 512 by default), each in a fresh child process (``child.py``) so
that peak memory is not polluted by earlier runs:

  floor             three plain b x b x d matrix products (the GEMMs any exact loss needs:
                    u v^T forward, G v and G^T u backward)
  openclip          open_clip.loss.ClipLoss on unit-normalised features (if installed)
  <topology>        topoclip.ContrastiveLoss, plain (never tiled)
  <topology> tiled  the exact tiled loss (with --tiled, and always from the tiling threshold on)

Time is the median of ``repeats`` fwd+bwd steps after one warm-up; × floor is the median
ratio of back-to-back (floor, method) steps inside the method's own child, so that drift of
the machine's speed between children does not enter it. Peak memory is the growth of the
child's peak resident set over its inputs (CPU), or torch.cuda.max_memory_allocated on a GPU,
read before the paired floor is built. A method whose b x b matrices would not fit in the
memory left is skipped.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from typing import Callable

import torch

from .child import available_memory_bytes, peak_rss_bytes, reset_peak_rss, rss_bytes, run_child

__all__ = ["TOPOLOGIES", "AUTO_TILE_BATCH", "measure", "plan_methods", "run_loss_bench", "format_table"]

TOPOLOGIES = ("sphere", "euclidean", "oblique-inner", "oblique-geodesic")
OBLIQUE_BLOCKS = 8          # Ob(d/8, 8): Ob(64, 8) at d = 512
AUTO_TILE_BATCH = 16384     # ContrastiveLoss's default tile_threshold: tiled rows from here on
TILED = " tiled"
# Bytes per b^2 a method keeps alive at its peak (fp32 b x b matrices x 4 bytes), used to skip
# a method before trying it. Rough upper guesses; once a method has been measured at a smaller
# b its own peak, scaled by b^2, replaces them.
_BYTES_PER_PAIR = {"floor": 4 * 2, "openclip": 4 * 10, "sphere": 4 * 6, "oblique-inner": 4 * 6,
                   "euclidean": 4 * 8, "oblique-geodesic": 4 * 8}


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


def _make_step(method: str, b: int, d: int, device: torch.device, tile_size: int) -> Callable[[], None]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, d, generator=g).to(device)
    y = torch.randn(b, d, generator=g).to(device)
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
    import topoclip

    name, tiled = (method[: -len(TILED)], True) if method.endswith(TILED) else (method, False)
    topo = _topology(name, d)
    u = topo.project(x).detach().requires_grad_(True)
    v = topo.project(y).detach().requires_grad_(True)
    loss_fn = topoclip.ContrastiveLoss(topo, tile_threshold=0 if tiled else None, tile_size=tile_size)

    def step():
        _clear_grads(u, v, log_scale)
        loss_fn(u, v, log_scale.exp()).backward()

    return step


def _timed(step: Callable[[], None], cuda: bool, dev: torch.device) -> float:
    if cuda:
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t0


def measure(method: str, b: int, d: int, repeats: int, device: str, tile_size: int = 1024,
            paired: bool = True) -> dict:
    """Median fwd+bwd seconds, peak memory growth (bytes) and the ratio to the three-GEMM floor
    of one method (run in a child).

    The ratio is the median of ``repeats`` back-to-back (floor, method) pairs in this very
    process: on a shared or throttled machine the speed drifts by tens of percent between
    child processes, which a ratio of two children's medians would carry straight into the
    table, while consecutive steps see the same machine. ``paired=False`` (the floor's b x b
    matrix would not fit) times the method alone.
    """
    dev = torch.device(device)
    # A tiny run first initialises what is paid once per process (thread pool, autograd engine,
    # lazy imports), so that the peak below is the method's own.
    _make_step(method, min(b, 64), d, dev, tile_size)()
    step = _make_step(method, b, d, dev, tile_size)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        reset_peak_rss()
        base = rss_bytes()
    step()  # warm-up (allocator, thread pool)
    times = [_timed(step, cuda, dev)]
    # The peak is read before the floor's own matrices exist in this process.
    peak = (torch.cuda.max_memory_allocated(dev) if cuda else peak_rss_bytes()) - base
    result = {"peak": max(peak, 0)}
    if method == "floor" or not paired:
        times += [_timed(step, cuda, dev) for _ in range(repeats - 1)]
        return {"time": statistics.median(times), **result, **({"floor_ratio": 1.0} if method == "floor" else {})}
    floor = _make_step("floor", b, d, dev, tile_size)
    floor()
    ratios = []
    for i in range(repeats):
        t_floor = _timed(floor, cuda, dev)
        if i:  # the first method time is the one taken with the peak
            times.append(_timed(step, cuda, dev))
        ratios.append(times[-1] / t_floor)
    return {"time": statistics.median(times), **result, "floor_ratio": statistics.median(ratios)}


def plan_methods(b: int, topologies, tiled: bool, openclip: bool = True) -> list[str]:
    """The methods measured at batch b: floor, OpenCLIP, each topology plain and maybe tiled."""
    methods = ["floor"] + (["openclip"] if openclip else []) + list(topologies)
    if tiled or b >= AUTO_TILE_BATCH:
        methods += [t + TILED for t in topologies]
    return methods


def _estimate(method: str, b: int, d: int, measured: dict[str, tuple[int, int]]) -> int | None:
    """Bytes the method needs at batch b, or None for the tiled loss (O(b d + tile^2))."""
    if method.endswith(TILED):
        return None
    if method in measured:
        b0, peak0 = measured[method]
        return int(peak0 * (b / b0) ** 2)
    return _BYTES_PER_PAIR.get(method, 4 * 8) * b * b + 4 * 4 * b * d


def _memory_budget(device: str) -> int | None:
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return available_memory_bytes()


def run_loss_bench(batches, dim: int = 512, topologies=TOPOLOGIES, tiled: bool = False, repeats: int = 3,
                   device: str = "cpu", tile_size: int = 1024, memory_gib: float | None = None,
                   openclip: bool = True, log: Callable[[str], None] | None = None) -> list[dict]:
    """Measure every (method, b); returns rows {b, method, time, peak} or {b, method, skipped}."""
    for t in topologies:
        if t not in TOPOLOGIES:
            raise ValueError(f"--topologies: unknown topology {t!r} (choose from {', '.join(TOPOLOGIES)})")
    if any(b < 1 for b in batches) or dim < 1 or repeats < 1:
        raise ValueError("--batch, --dim and --repeats must be >= 1")
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    has_openclip = openclip and importlib.util.find_spec("open_clip") is not None
    if openclip and not has_openclip:
        log("open_clip is not installed: no OpenCLIP rows")
    budget = int(memory_gib * 2**30) if memory_gib is not None else _memory_budget(device)
    measured: dict[str, tuple[int, int]] = {}
    rows = []
    for b in sorted(batches):
        for method in plan_methods(b, topologies, tiled, has_openclip):
            need = _estimate(method, b, dim, measured)
            # 10% headroom: the estimate leaves out the process itself and the allocator's slack.
            if budget is not None and need is not None and need > 0.9 * budget:
                rows.append({"b": b, "method": method, "skipped": f"skipped (needs ~{need / 2**30:.1f} GiB)"})
                log(f"  b={b:6d} {method:24s} skipped (needs ~{need / 2**30:.1f} GiB, {budget / 2**30:.1f} GiB free)")
                continue
            floor_done = any(r["b"] == b and r["method"] == "floor" and "time" in r for r in rows)
            params = dict(method=method, b=b, d=dim, repeats=repeats, device=device, tile_size=tile_size,
                          paired=floor_done)
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
            rows.append({"b": b, "method": method, **res})
            log(f"  b={b:6d} {method:24s} {res['time'] * 1e3:10.1f} ms {res['peak'] / 2**20:10.1f} MiB")
    return rows


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def _floor_ratio(row: dict, floor: dict | None) -> str:
    """× floor: the ratio paired in the row's own process where measured, else of the medians."""
    if "floor_ratio" in row:
        return f"{row['floor_ratio']:.2f}"
    return _ratio(row["time"], floor and floor["time"])


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
