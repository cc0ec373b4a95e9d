"""The Numba-compiled element-wise passes (topoclip.fused_cpu) against the eager PyTorch
formulas they replace, and the blocked geodesic losses with them on and off."""

import math
import threading

import pytest
import torch

import topoclip
import topoclip.geometry as geometry
import topoclip.losses.contrastive as contrastive
from topoclip import fused_cpu
from topoclip.geometry import _SIN_FLOOR, GeodesicKernel, _theta_over_sin_of_cos
from topoclip.losses import SigmoidLoss

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("numba")


def _cosines(dtype, shape=(37, 53)):
    g = torch.Generator().manual_seed(0)
    c = (torch.rand(shape, generator=g, dtype=torch.float64) * 2.2 - 1.1).to(dtype)
    edge = torch.tensor([-1.0, 1.0, 0.0, -1.0 + 1e-7, 1.0 - 1e-7, 1.5, -1.5, 0.5, -0.5], dtype=dtype)
    c.view(-1)[: edge.numel()] = edge  # the poles, just inside them, beyond them (clamped), the branch point
    return c


def test_the_kernels_are_there_for_contiguous_float_cpu_tensors():
    a = torch.zeros(3, 4)
    assert fused_cpu.usable(a, torch.zeros(3, 4))
    assert not fused_cpu.usable(a, torch.zeros(3, 4, dtype=torch.float64))  # mixed dtypes
    assert not fused_cpu.usable(torch.zeros(4, 3).T)  # not contiguous
    assert not fused_cpu.usable(a.to(torch.bfloat16))
    with fused_cpu.disabled():
        assert not fused_cpu.usable(a)
    assert fused_cpu.usable(a)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.float64, 1e-14)])
def test_theta_squared_in_each_mode_matches_arccos(dtype, tol):
    c1, c2 = _cosines(dtype), _cosines(dtype).flip(0).contiguous()
    theta1 = torch.arccos(c1.double().clamp(-1, 1))
    theta2 = torch.arccos(c2.double().clamp(-1, 1))
    acc = torch.full_like(c1, 7.0)
    fused_cpu.theta_squared(c1, acc, fused_cpu.FIRST)
    torch.testing.assert_close(acc.double(), theta1 ** 2, rtol=tol, atol=tol * 10)
    fused_cpu.theta_squared(c2, acc, fused_cpu.ADD)
    torch.testing.assert_close(acc.double(), theta1 ** 2 + theta2 ** 2, rtol=tol, atol=tol * 10)
    fused_cpu.theta_squared(c1, acc, fused_cpu.LAST, scale=3.0)
    want = -3.0 * torch.sqrt(2 * theta1 ** 2 + theta2 ** 2)
    torch.testing.assert_close(acc.double(), want, rtol=tol, atol=tol * 10)
    assert torch.equal(c1, _cosines(dtype))  # the cosines are read, not overwritten


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.float64, 1e-13)])
def test_the_weighted_theta_over_sin_matches_the_eager_formula(dtype, tol):
    c = _cosines(dtype)
    w = torch.randn(c.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    out = torch.empty_like(c)
    fused_cpu.weighted_theta_over_sin(c, w, out, _SIN_FLOOR)
    want = _theta_over_sin_of_cos(c.double().clamp(-1, 1), out=torch.empty_like(c, dtype=torch.float64)) * w.double()
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    # the independent closed form away from the floors: theta / sin(theta)
    theta = torch.linspace(0.01, math.pi - 0.01, 101, dtype=torch.float64)
    cos = torch.cos(theta).to(dtype).reshape(1, -1).contiguous()
    got = torch.empty_like(cos)
    fused_cpu.weighted_theta_over_sin(cos, torch.ones_like(cos), got, _SIN_FLOOR)
    torch.testing.assert_close(got.double().flatten(), theta / torch.sin(theta), rtol=tol * 50, atol=0)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("sigmoid", [False, True])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_the_geodesic_losses_are_the_same_with_the_kernels_on_and_off(monkeypatch, sigmoid, dtype, tol):
    # several row blocks and column chunks, ragged ones last
    monkeypatch.setattr(contrastive, "_BLOCK_ELEMENTS", 4 * 29)
    monkeypatch.setattr(GeodesicKernel, "block_elements", 4 * 29)
    monkeypatch.setattr(geometry, "_GEODESIC_COLUMNS", 8)
    topo = topoclip.topology("oblique-geodesic", dim=24, m=3)
    g = torch.Generator().manual_seed(2)
    u = topo.project(torch.randn(29, 24, generator=g, dtype=dtype))
    v = topo.project(torch.randn(29, 24, generator=g, dtype=dtype))
    u[4] = topo.project(-v[9])  # an antipodal pair: the sine's floor
    u[5] = v[6]                 # a coincident negative: theta = 0
    u, v = u.requires_grad_(), v.requires_grad_()
    scale = torch.tensor(9.0, dtype=dtype, requires_grad=True)
    loss_fn = SigmoidLoss(topo) if sigmoid else topoclip.ContrastiveLoss(topo)
    args = (u, v, scale, torch.tensor(-3.0, dtype=dtype)) if sigmoid else (u, v, scale)
    results = []
    for enabled in (True, False):
        previous = fused_cpu.set_enabled(enabled)
        try:
            loss = loss_fn(*args)
            results.append((loss.detach(), *torch.autograd.grad(loss, (u, v, scale))))
        finally:
            fused_cpu.set_enabled(previous)
    for got, want in zip(*results):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_the_fused_geodesic_gradchecks_in_float64():
    topo = topoclip.topology("oblique-geodesic", dim=12, m=3)
    g = torch.Generator().manual_seed(3)
    u = topo.project(torch.randn(7, 12, generator=g, dtype=torch.float64)).requires_grad_()
    v = topo.project(torch.randn(7, 12, generator=g, dtype=torch.float64)).requires_grad_()
    log_scale = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    assert fused_cpu.usable(u.detach())
    assert torch.autograd.gradcheck(lambda a, b, s: topoclip.ContrastiveLoss(topo)(a, b, s.exp()), (u, v, log_scale))


def test_two_threads_computing_losses_at_once_each_get_the_right_value():
    # One topology (one kernel, its scratch buffers) shared by two threads; Numba's default
    # thread pool would also abort the process on concurrent parallel launches.
    topo = topoclip.topology("oblique-geodesic", dim=32, m=4)
    g = torch.Generator().manual_seed(4)
    u, v = topo.project(torch.randn(64, 32, generator=g)), topo.project(torch.randn(64, 32, generator=g))
    want = float(topoclip.ContrastiveLoss(topo)(u, v, torch.tensor(5.0)))
    results, errors = [], []

    def work():
        try:
            for _ in range(20):
                results.append(float(topoclip.ContrastiveLoss(topo)(u, v, torch.tensor(5.0))))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 40 and all(r == want for r in results)
