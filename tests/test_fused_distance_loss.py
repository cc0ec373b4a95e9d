"""The fused blocked loss of the Euclidean, oblique-geodesic and Lorentz topologies (their kernels in
geometry, the sweep in losses.contrastive) against the unfused composition of the similarity
matrix, the exact positives and the symmetric cross-entropy: values and gradients, coincident,
duplicate and antipodal points, many row blocks, and the memory it keeps for backward."""

import pytest
import torch

import topoclip
import topoclip.geometry as geometry
import topoclip.losses.contrastive as contrastive
from topoclip.geometry import GeodesicKernel
from topoclip.losses.contrastive import exact_positives, symmetric_cross_entropy

pytestmark = pytest.mark.usefixtures("one_thread")

TOPOLOGIES = [("euclidean", {}), ("oblique-geodesic", {"m": 4}), ("lorentz", {})]


def _unfused(topo, u, v, scale):
    diag = torch.arange(u.shape[0])
    return symmetric_cross_entropy(exact_positives(topo, topo.scaled_similarity(u, v, scale), u, v, scale, diag, diag))


def _hard_points(topo, b, dtype, seed=0, coincident_negative=False):
    g = torch.Generator().manual_seed(seed)
    u = topo.project(torch.randn(b, topo.dim, generator=g, dtype=dtype))
    v = topo.project(torch.randn(b, topo.dim, generator=g, dtype=dtype))
    u[3] = u[5]            # duplicate images
    if coincident_negative:
        v[4] = u[3]        # a negative that coincides with an image
    v[6] = u[6]            # a positive pair that coincides (scored by the exact paired form)
    u[7] = topo.project(-u[8]) if topo.blockwise else -u[8]  # antipodal blocks
    return u.requires_grad_(), v.requires_grad_()


@pytest.mark.parametrize("name, options", TOPOLOGIES)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_the_fused_loss_equals_the_unfused_one_with_its_gradients(monkeypatch, name, options, dtype, tol):
    topo = topoclip.topology(name, dim=16, **options)
    assert topo.blocked_kernel is not None
    monkeypatch.setattr(contrastive, "_BLOCK_ELEMENTS", 5 * 37)  # many blocks, a ragged last one
    monkeypatch.setattr(GeodesicKernel, "block_elements", 5 * 37)
    monkeypatch.setattr(geometry, "_GEODESIC_COLUMNS", 16)  # and the geodesic's column chunks, a ragged last one
    u, v = _hard_points(topo, 37, dtype)
    log_scale = torch.tensor(2.3, dtype=dtype, requires_grad=True)
    fused = topoclip.ContrastiveLoss(topo)(u, v, log_scale.exp())
    want = _unfused(topo, u, v, log_scale.exp())
    got_grads = torch.autograd.grad(fused, (u, v, log_scale))
    want_grads = torch.autograd.grad(want, (u, v, log_scale))
    assert float(fused) == pytest.approx(float(want), rel=tol, abs=tol)
    for got, ref in zip(got_grads, want_grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, ref, rtol=tol * 10, atol=tol * 10)


@pytest.mark.parametrize("name, options", TOPOLOGIES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_a_negative_that_coincides_with_an_image_keeps_everything_finite(name, options, dtype):
    # From a GEMM, a coincident pair's distance is rounding (~sqrt(eps)), its direction noise
    # in any implementation: what must hold is a finite loss and finite gradients.
    topo = topoclip.topology(name, dim=16, **options)
    u, v = _hard_points(topo, 37, torch.float32, coincident_negative=True)
    u, v = u.detach().to(dtype).requires_grad_(), v.detach().to(dtype).requires_grad_()
    scale = torch.tensor(50.0, requires_grad=True)
    loss = topoclip.ContrastiveLoss(topo)(u, v, scale)
    assert torch.isfinite(loss) and loss.dtype != torch.bfloat16
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(loss, (u, v, scale)))


@pytest.mark.parametrize("name, options", TOPOLOGIES)
def test_gradcheck_in_float64_through_the_fused_path(name, options):
    topo = topoclip.topology(name, dim=8, **({"m": 2} if options else {}))
    g = torch.Generator().manual_seed(3)
    u = topo.project(torch.randn(5, 8, generator=g, dtype=torch.float64)).requires_grad_()
    v = topo.project(torch.randn(5, 8, generator=g, dtype=torch.float64)).requires_grad_()
    log_scale = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, v, s: topoclip.ContrastiveLoss(topo)(u, v, s.exp()), (u, v, log_scale))


@pytest.mark.parametrize("name, options", TOPOLOGIES)
def test_the_fused_path_keeps_one_b_by_b_matrix_for_backward(name, options):
    """What autograd keeps between forward and backward: the logits and O(b d), not the
    similarity, distance or cosine matrices the unfused composition holds."""
    topo = topoclip.topology(name, dim=16, **options)
    b = 64
    u, v = _hard_points(topo, b, torch.float32)

    def saved_elements(loss_of):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            loss_of(u, v, torch.tensor(5.0))
        return sum(sizes)

    fused = saved_elements(topoclip.ContrastiveLoss(topo))
    unfused = saved_elements(lambda u, v, s: _unfused(topo, u, v, s))
    assert fused <= b * b + 16 * b * 16, fused
    assert unfused >= 2 * b * b  # the composition keeps at least two


def test_a_learned_curvature_trains_through_the_fused_hyperbolic_loss():
    from topoclip.geometry import Lorentz

    log_c = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    g = torch.Generator().manual_seed(4)
    u = Lorentz(6).project(0.5 * torch.randn(9, 6, generator=g, dtype=torch.float64)).requires_grad_()
    v = Lorentz(6).project(0.5 * torch.randn(9, 6, generator=g, dtype=torch.float64)).requires_grad_()
    log_scale = torch.tensor(1.1, dtype=torch.float64, requires_grad=True)

    def loss(u, v, s, c):
        return topoclip.ContrastiveLoss(Lorentz(6, curvature=lambda: c.exp()))(u, v, s.exp())

    assert torch.autograd.gradcheck(loss, (u, v, log_scale, log_c))
    topo = Lorentz(6, curvature=lambda: log_c.exp())
    fused = torch.autograd.grad(loss(u, v, log_scale, log_c), log_c)[0]
    want = torch.autograd.grad(_unfused(topo, u, v, log_scale.exp()), log_c)[0]
    assert float(fused) == pytest.approx(float(want), rel=1e-12) and float(fused) != 0.0


# (the sum includes the coincident positive's all-pairs logit, whose GEMM form is rounding:
# acosh(1 + z) at z ~ 1e-16 is ~1e-8, summed in two orders, so 1e-9 rather than eps in fp64)
@pytest.mark.parametrize("name, options", TOPOLOGIES)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.float32, 1e-6)])
def test_the_fused_sigmoid_loss_equals_its_formula_with_gradients(monkeypatch, name, options, dtype, tol):
    import torch.nn.functional as F

    from topoclip.losses.sigmoid import sigmoid_loss

    monkeypatch.setattr(contrastive, "_BLOCK_ELEMENTS", 5 * 37)
    monkeypatch.setattr(geometry, "_GEODESIC_COLUMNS", 16)
    topo = topoclip.topology(name, dim=16, **options)
    u, v = _hard_points(topo, 37, dtype)
    log_scale = torch.tensor(1.2, dtype=dtype, requires_grad=True)
    bias = torch.tensor(-4.0, dtype=dtype, requires_grad=True)
    got = sigmoid_loss(topo, u, v, log_scale.exp(), bias)
    logits = topo.scaled_similarity(u, v, log_scale.exp()) + bias  # SigLIP's formula, unfused
    want = (F.softplus(logits).sum() - (log_scale.exp() * topo.paired_similarity(u, v) + bias).sum()) / 37
    assert float(got) == pytest.approx(float(want), rel=tol)
    for a, b in zip(torch.autograd.grad(got, (u, v, log_scale, bias)), torch.autograd.grad(want, (u, v, log_scale, bias))):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=tol * 10, atol=tol * 10)


def test_the_fused_sigmoid_loss_gradchecks_with_a_learned_curvature():
    from topoclip.geometry import Lorentz
    from topoclip.losses.sigmoid import sigmoid_loss

    g = torch.Generator().manual_seed(5)
    u = Lorentz(4).project(0.5 * torch.randn(5, 4, generator=g, dtype=torch.float64)).requires_grad_()
    v = Lorentz(4).project(0.5 * torch.randn(5, 4, generator=g, dtype=torch.float64)).requires_grad_()
    args = (u, v, torch.tensor(0.5, dtype=torch.float64, requires_grad=True),
            torch.tensor(-1.0, dtype=torch.float64, requires_grad=True), torch.tensor(0.3, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(
        lambda u, v, s, b, c: sigmoid_loss(Lorentz(4, curvature=lambda: c.exp()), u, v, s.exp(), b), args)


@pytest.mark.parametrize("name, options", TOPOLOGIES)
def test_the_fused_sigmoid_loss_without_gradients_and_backward_twice(monkeypatch, name, options):
    # With gradients wanted, the sweep forms them with the sum; without, only the sum.
    from topoclip.losses.sigmoid import sigmoid_loss

    monkeypatch.setattr(contrastive, "_BLOCK_ELEMENTS", 5 * 37)
    monkeypatch.setattr(geometry, "_GEODESIC_COLUMNS", 16)
    topo = topoclip.topology(name, dim=16, **options)
    u, v = _hard_points(topo, 37, torch.float64)
    scale, bias = torch.tensor(3.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        value = sigmoid_loss(topo, u, v, scale, bias)
    loss = sigmoid_loss(topo, u, v, scale, bias)
    assert float(loss) == pytest.approx(float(value), rel=1e-14)
    (3.0 * loss).backward(retain_graph=True)
    once = [u.grad.clone(), v.grad.clone(), bias.grad.clone()]
    loss.backward()  # the saved gradients, scaled by the incoming one, accumulate
    for a, b in zip((u.grad, v.grad, bias.grad), once):
        torch.testing.assert_close(a, b * (4.0 / 3.0), rtol=1e-12, atol=1e-12)
    only_bias = sigmoid_loss(topo, u.detach(), v.detach(), scale, bias)
    assert torch.autograd.grad(only_bias, bias)[0] == pytest.approx(float(once[2]) / 3.0, rel=1e-12)
