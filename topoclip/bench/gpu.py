"""The GPU benchmark in one go (``topoclip bench gpu`` or ``bash bench/gpu.sh``): on a CUDA
machine, within about eight minutes, one Markdown file with

1. the loss table: every topology, plain and tiled, b = 8,192 to 131,072, d = 512, fp32 and
   bf16 features, time and peak CUDA memory, beside OpenCLIP's ClipLoss and SigLipLoss and
   the GEMM floor (published anchor: Inf-CL's loss needs 0.72 GB at b = 128k, OpenCLIP's
   33.6 GB);
2. one exact training step of a ViT-B/16-sized dual encoder at a global batch of 65,536 with
   the gradient cache and the tiled loss, bf16;
3. the training-step ratio against OpenCLIP's own step (same ViT-B-16 model, same batch);
4. with two GPUs, the loss under two nccl processes against one process.

Without a GPU it says so and writes nothing, unless ``tiny=True`` (``--tiny``): the same plan on
the CPU at toy sizes, which is how the tests check it. Every section stops at its share of the
time budget; what did not fit in time or memory is listed as skipped, not lost.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

__all__ = ["GpuPlan", "plan_for", "run_gpu_bench"]

NO_GPU = ("no CUDA device here: the GPU benchmark has nothing to measure. Run it on a GPU machine "
          "(`bash bench/gpu.sh`), or `topoclip bench gpu --tiny` to try the plan on the CPU at toy sizes.")

# A ViT-B/16-sized dual encoder in topoclip's own towers (image: 12 x 768 at 224 px, patch 16;
# text: 12 x 512), on the sphere of 512.
VIT_B16 = [
    "model.image.img_size=224", "data.shapes.image_size=224", "model.image.patch_size=16", "model.image.depth=12",
    "model.image.width=768", "model.image.heads=12", "model.text.depth=12", "model.text.width=512",
    "model.text.heads=8", "topology.name=sphere", "topology.dim=512",
]
TINY_TOWERS = ["model.image.depth=1", "model.image.width=32", "model.image.heads=2", "model.text.depth=1",
               "model.text.width=32", "model.text.heads=2"]


@dataclass
class GpuPlan:
    batches: list[int]  # in the order measured (the table sorts them): the anchors first
    topologies: tuple[str, ...] = ("sphere", "euclidean", "oblique-inner", "oblique-geodesic", "lorentz")
    dim: int = 512
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    step_batch: int = 65536
    step_chunk: int = 512
    step_overrides: list[str] = field(default_factory=lambda: list(VIT_B16))
    ratio_model: str = "ViT-B-16"
    ratio_batch: int = 256
    ddp_batch: int = 65536
    budget_seconds: float = 480.0
    device: str = "cuda"


def plan_for(tiny: bool) -> GpuPlan:
    if not tiny:
        return GpuPlan(batches=[8192, 131072, 65536, 32768, 16384])
    return GpuPlan(batches=[32], topologies=("sphere", "euclidean"), dim=16, step_batch=64, step_chunk=16, step_overrides=list(TINY_TOWERS),
                   ratio_model="topoclip-bench-tiny", ratio_batch=8, ddp_batch=64, budget_seconds=120.0, device="cpu")


def _loss_section(plan: GpuPlan, deadline: float, log) -> list[str]:
    from .loss import format_table, run_loss_bench

    lines = ["## 1. Loss: fwd+bwd time and peak memory", ""]
    for dtype in plan.dtypes:
        lines.append(f"### {dtype} features")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            lines += ["", "skipped: the time budget was spent", ""]
            continue
        # the sigmoid rows in fp32 only; each dtype gets its share of what is left
        share = time.monotonic() + remaining / (len(plan.dtypes) - plan.dtypes.index(dtype))
        rows = run_loss_bench(plan.batches, plan.dim, plan.topologies, tiled=True, repeats=3, device=plan.device,
                              sigmoid=dtype == "fp32", dtype=dtype, log=log, budget_seconds=2.0,
                              target_spread=0.15, deadline=share)
        lines += ["", format_table(rows), ""]
    lines.append("Anchor (Inf-CL, Cheng et al. 2024): its loss at b = 128k needs 0.72 GB, OpenCLIP's 33.6 GB.")
    return lines


def _step_section(plan: GpuPlan, log) -> list[str]:
    from .max_batch import trial

    precision = "bf16" if plan.device == "cuda" else "fp32"  # autocast bf16 is a GPU's
    lines = ["## 2. One exact training step at a global batch of "
             f"{plan.step_batch:,} (gradient cache, chunk {plan.step_chunk}, tiled loss, {precision})", ""]
    try:
        out = trial(plan.step_batch, plan.step_chunk, overrides=[*plan.step_overrides, f"train.precision={precision}"],
                    device=plan.device)
    except (RuntimeError, ValueError) as err:  # out of memory is a RuntimeError
        return lines + [f"failed: {str(err).splitlines()[0]}"]
    peak = f", peak {out['peak_cuda'] / 2**30:.2f} GiB" if "peak_cuda" in out else ""
    log(f"  step at {plan.step_batch}: {out['step_time']:.2f} s{peak}")
    return lines + [f"step {out['step_time']:.2f} s{peak}, loss {out['loss']:.3f} ({precision})"]


def _ratio_section(plan: GpuPlan, log) -> list[str]:
    from .train_step import format_result, run_train_step_bench

    lines = [f"## 3. Training step against OpenCLIP's own ({plan.ratio_model}, batch {plan.ratio_batch})", ""]
    try:
        res = run_train_step_bench(plan.ratio_batch, plan.ratio_model, steps=3, log=log, device=plan.device)
    except (RuntimeError, ValueError) as err:
        return lines + [f"failed: {str(err).splitlines()[0]}"]
    return lines + [format_result(res)]


def _ddp_worker(rank: int, world: int, batch: int, dim: int, device: str, port: int, queue) -> None:
    import torch.distributed as dist

    import topoclip

    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    dev = torch.device(f"cuda:{rank}") if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(dev)
    topo = topoclip.topology("sphere", dim=dim)
    g = torch.Generator().manual_seed(rank)
    u = topo.project(torch.randn(batch // world, dim, generator=g)).to(dev).requires_grad_()
    v = topo.project(torch.randn(batch // world, dim, generator=g)).to(dev).requires_grad_()
    loss_fn = topoclip.ContrastiveLoss(topo, local_loss=True)
    times = []
    for _ in range(4):
        dist.barrier()
        t0 = time.perf_counter()
        loss_fn(u, v, torch.tensor(14.3, device=dev)).backward()
        if device == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    if rank == 0:
        queue.put(sorted(times[1:])[1])
    dist.destroy_process_group()


def _ddp_section(plan: GpuPlan, log) -> list[str]:
    import socket

    import torch.multiprocessing as mp

    lines = [f"## 4. Two processes ({'nccl' if plan.device == 'cuda' else 'gloo'}), sphere loss, global batch "
             f"{plan.ddp_batch:,}", ""]
    if plan.device == "cuda" and torch.cuda.device_count() < 2:
        return lines + [f"skipped: {torch.cuda.device_count()} GPU here, two are needed"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_ddp_worker, args=(2, plan.ddp_batch, plan.dim, plan.device, port, queue), nprocs=2,
                       start_method="spawn")
    seconds = queue.get(timeout=60)
    log(f"  2 processes: {seconds:.3f} s a step")
    return lines + [f"median step {seconds * 1e3:.1f} ms (local loss, features gathered with gradients)"]


def run_gpu_bench(output: str | os.PathLike, tiny: bool = False, log: Callable[[str], None] | None = None) -> str | None:
    """Run the plan and write the Markdown file; returns its text, or None (and writes nothing)
    where there is no CUDA device and ``tiny`` is not set."""
    from .rounds import machine_line

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if not tiny and not torch.cuda.is_available():
        log(NO_GPU)
        return None
    plan = plan_for(tiny)
    started = time.monotonic()
    deadline = started + plan.budget_seconds * 0.6  # the loss table's share; the rest for the steps
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and plan.device == "cuda" else "none (tiny CPU run)"
    lines = ["# topoclip GPU benchmark", "", f"Machine: {machine_line()}; GPU: {gpu}", ""]
    for section in (lambda: _loss_section(plan, deadline, log), lambda: _step_section(plan, log),
                    lambda: _ratio_section(plan, log), lambda: _ddp_section(plan, log)):
        lines += [*section(), ""]
    lines.append(f"Total {time.monotonic() - started:.0f} s.")
    text = "\n".join(lines) + "\n"
    from topoclip.atomic import atomic_write_text

    atomic_write_text(Path(output), text)
    return text
