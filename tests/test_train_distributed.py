"""Two gloo processes with DDP + gathered local loss = one process with the same global batch."""

from __future__ import annotations

import os

import pytest
import torch

import topoclip
from topoclip.engine.distributed import DistInfo, init_distributed, rank_slice, wrap_model
from topoclip.models import ModelConfig, build_model

STEPS, GLOBAL_BATCH = 3, 8


def tiny_model(name="oblique-inner"):
    topo = topoclip.topology(name, n=8, m=4)
    cfg = ModelConfig.from_dict({
        "num_tokens": 1,
        "image": {"img_size": 16, "patch_size": 8, "depth": 1, "width": 32, "heads": 2},
        "text": {"width": 32, "depth": 1, "heads": 2, "context_length": 8},
    })
    torch.manual_seed(0)
    return build_model(cfg, topo, vocab_size=30)


def batches():
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        yield {
            "images": torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=g),
            "input_ids": torch.randint(1, 30, (GLOBAL_BATCH, 8), generator=g),
            "attention_mask": torch.ones(GLOBAL_BATCH, 8, dtype=torch.long),
        }


def train(info: DistInfo) -> dict[str, torch.Tensor]:
    model = tiny_model()
    ddp = wrap_model(model, info)
    loss_fn = topoclip.ContrastiveLoss(model.topology, local_loss=True)
    # SGD, not Adam: Adam divides by the gradient's own magnitude, so parameters whose true
    # gradient is 0 (the attention key bias) would turn rounding noise into full-size steps.
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rows = rank_slice(GLOBAL_BATCH, info)
    for batch in batches():
        local = {k: v[rows] for k, v in batch.items()}
        u, v = ddp(**local)
        loss = loss_fn(u, v, model.logit_scale())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: p.detach().clone() for k, p in model.state_dict().items()}


def _worker(rank, world, init_file, out_dir):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        info = init_distributed("cpu")
        state = train(info)
        if info.is_main:
            torch.save(state, os.path.join(out_dir, "ddp.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    got = torch.load(tmp_path / "ddp.pt")
    want = train(DistInfo())
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5, msg=k)
    moved = any(not torch.equal(want[k], v) for k, v in tiny_model().state_dict().items())
    assert moved  # the steps did change the weights


def test_rank_slice_needs_divisible_batch():
    assert rank_slice(8, DistInfo(rank=1, world_size=2)) == slice(4, 8)
    with pytest.raises(ValueError, match="divisible"):
        rank_slice(9, DistInfo(rank=0, world_size=2))


def test_init_without_environment_is_single_process(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.distributed, info.is_main) == (0, 1, False, True)
