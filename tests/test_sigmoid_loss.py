"""The sigmoid loss on every topology: against a plain formula, OpenCLIP's SigLipLoss on the
sphere (loss and gradients), tiled = plain, float64 gradcheck, 2 gloo processes = 1 process."""

import math
import os

import pytest
import torch

import topoclip
from topoclip.losses import SIGLIP_INIT, SigmoidLoss, sigmoid_loss

pytestmark = pytest.mark.usefixtures("one_thread")

TOPOLOGIES = [("sphere", {}), ("euclidean", {}), ("oblique-inner", {"m": 4}), ("oblique-geodesic", {"m": 4}), ("lorentz", {})]


def _topo(name, options, dim=16):
    return topoclip.topology(name, dim=dim, **options)


def _points(topo, b, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return topo.project(torch.randn(b, topo.dim, generator=g, dtype=dtype))


def _reference(topo, u, v, scale, bias) -> float:
    """-sum_ij log sigmoid(z_ij L_ij) / b in plain Python, the similarity from topoclip."""
    sims = topo.similarity(u.double(), v.double()).tolist()
    total = 0.0
    for i, row in enumerate(sims):
        for j, s in enumerate(row):
            z = 1.0 if i == j else -1.0
            total += math.log1p(math.exp(-z * (scale * s + bias)))
    return total / len(sims)


@pytest.mark.parametrize("name, options", TOPOLOGIES)
def test_the_loss_is_the_pairwise_sigmoid_formula(name, options):
    topo = _topo(name, options)
    u, v = _points(topo, 7, 0), _points(topo, 7, 1)
    for scale, bias in ((10.0, -10.0), (3.0, 0.5)):
        got = float(sigmoid_loss(topo, u, v, scale, bias))
        assert got == pytest.approx(_reference(topo, u, v, scale, bias), rel=1e-5)


def test_equals_openclip_siglip_loss_on_the_sphere_with_gradients():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    topo = _topo("sphere", {}, dim=32)
    ours = [_points(topo, 12, 2).requires_grad_(), _points(topo, 12, 3).requires_grad_(),
            torch.tensor(SIGLIP_INIT["scale"], requires_grad=True), torch.tensor(SIGLIP_INIT["bias"], requires_grad=True)]
    theirs = [t.detach().clone().requires_grad_() for t in ours]
    loss = SigmoidLoss(topo)(*ours)
    want = open_clip_loss.SigLipLoss()(*theirs)
    loss.backward()
    want.backward()
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name, options", TOPOLOGIES)
def test_tiled_equals_plain_in_loss_and_gradients(name, options):
    topo = _topo(name, options)
    plain = [_points(topo, 23, 4).requires_grad_(), _points(topo, 23, 5).requires_grad_(),
             torch.tensor(4.0, requires_grad=True), torch.tensor(-2.0, requires_grad=True)]
    tiled = [t.detach().clone().requires_grad_() for t in plain]
    a = sigmoid_loss(topo, *plain)
    b = SigmoidLoss(topo, tile_threshold=0, tile_size=5)(*tiled)  # 5 tiles, the last one short
    a.backward()
    b.backward()
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    for x, y in zip(plain, tiled):
        torch.testing.assert_close(x.grad, y.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name, options", [TOPOLOGIES[0], TOPOLOGIES[1], TOPOLOGIES[3], TOPOLOGIES[4]])
def test_tiled_gradcheck_in_float64(name, options):
    topo = _topo(name, options, dim=8)
    u, v = _points(topo, 5, 6, torch.float64).requires_grad_(), _points(topo, 5, 7, torch.float64).requires_grad_()
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *x: sigmoid_loss(topo, *x, tile=2), (u, v, scale, bias))


def test_finite_for_identical_antipodal_and_huge_scale():
    topo = _topo("oblique-geodesic", {"m": 4})
    u = _points(topo, 6, 8).requires_grad_()
    for v in (u.detach().clone(), -u.detach().clone()):
        loss = sigmoid_loss(topo, u, v, 100.0, -10.0, tile=4)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(u.grad).all()


def _worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world)})
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        got = {}
        for name, options in TOPOLOGIES:
            topo = _topo(name, options)
            u_all, v_all = _points(topo, 12, 9), _points(topo, 12, 10)
            rows = slice(rank * 6, (rank + 1) * 6)
            u, v = u_all[rows].clone().requires_grad_(), v_all[rows].clone().requires_grad_()
            scale, bias = torch.tensor(5.0, requires_grad=True), torch.tensor(-3.0, requires_grad=True)
            for tiled in (False, True):
                loss = SigmoidLoss(topo, tile_threshold=0 if tiled else None, tile_size=5)(u, v, scale, bias)
                loss.backward()
                got[(name, tiled)] = [float(loss), u.grad.clone(), v.grad.clone(), scale.grad.clone(), bias.grad.clone()]
                for t in (u, v, scale, bias):
                    t.grad = None
        torch.save(got, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, options in TOPOLOGIES:
        topo = _topo(name, options)
        u, v = _points(topo, 12, 9).requires_grad_(), _points(topo, 12, 10).requires_grad_()
        scale, bias = torch.tensor(5.0, requires_grad=True), torch.tensor(-3.0, requires_grad=True)
        loss = SigmoidLoss(topo, tile_threshold=None)(u, v, scale, bias)
        loss.backward()
        for tiled in (False, True):
            parts = [r[(name, tiled)] for r in ranks]
            # DDP averages gradients over the ranks: the mean of the rank losses is the loss
            # of the whole batch, and each rank's gradient / 2 is its rows' share.
            assert 0.5 * (parts[0][0] + parts[1][0]) == pytest.approx(float(loss), rel=1e-6)
            torch.testing.assert_close(torch.cat([p[1] for p in parts]) / 2, u.grad, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(torch.cat([p[2] for p in parts]) / 2, v.grad, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close((parts[0][3] + parts[1][3]) / 2, scale.grad, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close((parts[0][4] + parts[1][4]) / 2, bias.grad, atol=1e-6, rtol=1e-5)
