"""Contrastive loss: forward+backward time and peak memory, side by side in one run.

For each batch size b (d = 512 by default) it measures, each in a fresh child process so
that peak memory is not polluted by earlier runs:

  floor      three plain b x b x d matrix products (the GEMMs any exact loss needs:
             u v^T forward, G v and G^T u backward)
  openclip   open_clip.loss.ClipLoss on unit-normalised features (if installed)
  <topology> topoclip.ContrastiveLoss for each topology

and prints time and peak memory as ratios to the floor and to OpenCLIP. Peak memory is the
growth of the process's peak resident set over the inputs (CPU), or
torch.cuda.max_memory_allocated on a GPU.

    python bench/loss.py --batch 1024 2048 4096 8192 --dim 512
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

TOPOLOGIES = {
    "sphere": dict(dim=None),
    "euclidean": dict(dim=None),
    "oblique-inner": dict(dim=None, m=8),
    "oblique-geodesic": dict(dim=None, m=8),
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _make_step(method: str, b: int, d: int, device: torch.device):
    """Return (step_fn, tensors_to_keep) for one method."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, d, generator=g).to(device)
    y = torch.randn(b, d, generator=g).to(device)
    if method == "floor":
        a = x.clone().requires_grad_(False)
        c = y.clone()

        def step():
            s = a @ c.T
            s @ c
            s.T @ a

        return step

    import topoclip

    if method == "openclip":
        from open_clip.loss import ClipLoss

        loss_fn = ClipLoss()
        u = torch.nn.functional.normalize(x, dim=-1).requires_grad_(True)
        v = torch.nn.functional.normalize(y, dim=-1).requires_grad_(True)
        log_scale = torch.tensor(2.659, device=device, requires_grad=True)

        def step():
            loss_fn(u, v, log_scale.exp()).backward()

        return step

    kw = {k: (d if val is None else val) for k, val in TOPOLOGIES[method].items()}
    topo = topoclip.topology(method, **kw)
    u = topo.project(x).detach().requires_grad_(True)
    v = topo.project(y).detach().requires_grad_(True)
    loss_fn = topoclip.ContrastiveLoss(topo)
    log_scale = torch.tensor(2.659, device=device, requires_grad=True)

    def step():
        loss_fn(u, v, log_scale.exp()).backward()

    return step


def _child(method: str, b: int, d: int, reps: int, device: str) -> dict:
    dev = torch.device(device)
    step = _make_step(method, b, d, dev)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    step()  # warm-up (allocator, thread pool)
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes()) - base
    return {"time": statistics.median(times), "peak": max(peak, 0)}


def run(batches, dim, reps, methods, device) -> list[dict]:
    rows = []
    for b in batches:
        for method in methods:
            cmd = [sys.executable, __file__, "--child", method, str(b), str(dim), str(reps), device]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"  {method} b={b} failed: {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            res = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"b": b, "method": method, **res})
            print(f"  b={b:6d} {method:17s} {res['time']*1e3:9.1f} ms  {res['peak']/2**20:9.1f} MiB", file=sys.stderr)
    return rows


def table(rows) -> str:
    lines = [
        "| b | method | time (ms) | × floor | × OpenCLIP | peak MiB | mem × OpenCLIP |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for b in sorted({r["b"] for r in rows}):
        at = {r["method"]: r for r in rows if r["b"] == b}
        floor, oc = at.get("floor"), at.get("openclip")
        for method, r in at.items():
            tf = f"{r['time'] / floor['time']:.2f}" if floor else "-"
            to = f"{r['time'] / oc['time']:.2f}" if oc else "-"
            mo = f"{r['peak'] / oc['peak']:.2f}" if oc and oc["peak"] else "-"
            lines.append(
                f"| {b} | {method} | {r['time']*1e3:.1f} | {tf} | {to} | {r['peak']/2**20:.0f} | {mo} |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        method, b, d, reps, device = sys.argv[2:7]
        print(json.dumps(_child(method, int(b), int(d), int(reps), device)))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=["floor", "openclip", *TOPOLOGIES])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, d={args.dim}", file=sys.stderr)
    rows = run(args.batch, args.dim, args.reps, args.methods, args.device)
    print(table(rows))


if __name__ == "__main__":
    main()
