"""Linear probe: separable data, optimum against the analytic gradient, determinism, l2 sweep, model level."""
import importlib.util

import numpy as np
import pytest
import torch

import topoclip
from topoclip.eval.linear_probe import extract_features, fit_logistic_regression, probe_accuracy, run_linear_probe
from topoclip.models import ImageTowerConfig, ModelConfig, TextTowerConfig, build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def clusters(n_per_class=40, num_classes=3, dim=5, spread=1.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    centers = 4.0 * torch.randn(num_classes, dim, generator=g, dtype=dtype)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = centers[labels] + spread * torch.randn(len(labels), dim, generator=g, dtype=dtype)
    return x, labels


def test_separable_data_is_classified_perfectly():
    x, y = clusters(spread=0.3)
    x_test, y_test = clusters(spread=0.3, seed=0)  # same centres (same seed), fresh noise below
    x_test = x_test + 0.05 * torch.randn(x_test.shape, generator=torch.Generator().manual_seed(9))
    probe = fit_logistic_regression(x, y, l2=1e-3)
    assert probe_accuracy(probe, x, y) == 1.0
    assert probe_accuracy(probe, x_test, y_test) == 1.0
    assert probe.weight.shape == (3, 5) and probe.bias.shape == (3,)


def numpy_objective_and_gradient(probe, x, y, l2):
    """The documented objective and its analytic gradient, written independently in numpy."""
    x = x.double().numpy()
    y = y.numpy()
    z = (x - x.mean(0)) / x.std(0)
    w, b = probe.weight.double().numpy(), probe.bias.double().numpy()
    logits = z @ w.T + b
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(w.shape[0])[y]
    loss = -np.mean(np.log(p[np.arange(len(y)), y])) + 0.5 * l2 * (w**2).sum()
    grad_w = (p - onehot).T @ z / len(y) + l2 * w
    grad_b = (p - onehot).mean(0)
    return loss, grad_w, grad_b, p


@pytest.mark.parametrize("l2", [1e-2, 1e-4])
def test_solution_is_the_optimum_of_the_documented_objective(l2):
    x, y = clusters(spread=3.0, dim=4, seed=2, dtype=torch.float64)  # overlapping: finite optimum
    probe = fit_logistic_regression(x, y, l2=l2, tolerance=1e-9)
    loss, grad_w, grad_b, _ = numpy_objective_and_gradient(probe, x, y, l2)
    assert probe.loss == pytest.approx(loss, rel=1e-10)
    assert np.abs(grad_w).max() < 1e-7 and np.abs(grad_b).max() < 1e-7
    # And it is a minimum, not just a stationary point: perturbing raises the loss.
    for sign in (1, -1):
        moved = fit_logistic_regression(x, y, l2=l2, tolerance=1e-9)
        moved.weight += sign * 1e-2
        assert numpy_objective_and_gradient(moved, x, y, l2)[0] > loss


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn not installed")
def test_probabilities_match_sklearn():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x, y = clusters(spread=3.0, dim=4, seed=2, dtype=torch.float64)
    l2 = 1e-2
    probe = fit_logistic_regression(x, y, l2=l2, tolerance=1e-9)
    z = StandardScaler().fit_transform(x.numpy())
    reference = LogisticRegression(C=1 / (l2 * len(y)), tol=1e-10, max_iter=10000).fit(z, y.numpy())
    ours = torch.softmax(probe.logits(x), 1).numpy()
    np.testing.assert_allclose(ours, reference.predict_proba(z), atol=1e-5)


def test_deterministic_and_l2_shrinks_weights():
    x, y = clusters(spread=2.0, seed=4)
    a = fit_logistic_regression(x, y, l2=1e-3)
    b = fit_logistic_regression(x, y, l2=1e-3)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    strong = fit_logistic_regression(x, y, l2=1.0)
    assert strong.weight.norm() < a.weight.norm()


def test_constant_features_and_float32_stay_finite():
    x, y = clusters(spread=0.5, seed=5)
    x = torch.cat([x, torch.full((len(y), 2), 7.0)], 1)  # two zero-variance columns
    probe = fit_logistic_regression(x, y, l2=1e-3)
    assert torch.isfinite(probe.weight).all() and probe.weight.dtype == torch.float32
    assert probe_accuracy(probe, x, y) == 1.0


def test_bad_inputs():
    x, y = clusters()
    with pytest.raises(ValueError, match="train labels"):
        fit_logistic_regression(x, y[:-1])
    with pytest.raises(ValueError, match="NaN"):
        fit_logistic_regression(x.clone().fill_(float("nan")), y)
    with pytest.raises(ValueError, match="l2"):
        fit_logistic_regression(x, y, l2=-1.0)
    with pytest.raises(ValueError, match="num_classes"):
        fit_logistic_regression(x, y, num_classes=2)
    with pytest.raises(ValueError, match="features must have shape"):
        fit_logistic_regression(x[0], y)


# --------------------------------------------------------------------------- model level
class Images(torch.utils.data.Dataset):
    """Noisy images whose class is a brighter colour channel (linear in any ViT's patch embedding)."""

    name, classnames, templates = "colours", ["red", "green", "blue"], ["{}"]

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 3
        self.images = 0.5 * torch.randn(n, 3, 16, 16, generator=g)
        self.images[torch.arange(n), self.labels] += 1.0

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def tiny_model(num_tokens):
    torch.manual_seed(0)
    cfg = ModelConfig(
        num_tokens=num_tokens,
        image=ImageTowerConfig(img_size=16, patch_size=4, depth=1, width=32, heads=2),
        text=TextTowerConfig(width=16, depth=1, heads=2, context_length=8),
    )
    return build_model(cfg, topoclip.topology("oblique-inner", n=4, m=2), vocab_size=20)


def test_linear_probe_on_a_multi_token_model():
    model = tiny_model(num_tokens=2).train()
    train, test = Images(60, seed=1), Images(30, seed=2)
    result = run_linear_probe(model, train, test, l2=1e-3, batch_size=32)
    assert model.training  # train/eval flags restored
    assert result["num_features"] == 2 * 32  # both [CLS] tokens, before the projection head
    assert result["n_train"] == 60 and result["n_test"] == 30 and result["l2"] == 1e-3
    # Independent: fit on the features computed directly from the tower.
    model.eval()
    with torch.no_grad():
        features = model.image(train.images).flatten(1)  # [b, k, width] -> [b, k*width]
        test_features = model.image(test.images).flatten(1)
    x, y = extract_features(model, train, batch_size=7)
    torch.testing.assert_close(x, features)
    assert torch.equal(y, train.labels)
    probe = fit_logistic_regression(features, train.labels, 1e-3, num_classes=3)
    assert result["top1"] == pytest.approx(probe_accuracy(probe, test_features, test.labels))
    assert result["top1"] > 0.9


class FeatureModel(torch.nn.Module):
    """A 'model' whose image features are its inputs: lets a test choose the features."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def image_features(self, images):
        return images


class Features(torch.utils.data.Dataset):
    """x1 = s + noise, x2 = noise (s = +-1 is the class): x1 - x2 separates perfectly, but a
    heavily penalised probe (weights ~ class-mean differences) reads x1 alone: ~63% accuracy."""

    classnames = ["neg", "pos"]

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 2
        noise = 3.0 * torch.randn(n, generator=g)
        self.x = torch.stack([2.0 * self.labels - 1 + noise, noise], 1)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.x[i], int(self.labels[i])


def test_l2_sweep_picks_the_value_that_generalises():
    model, train, test = FeatureModel(), Features(200, seed=1), Features(200, seed=2)
    heavy = run_linear_probe(model, train, test, l2=100.0)
    light = run_linear_probe(model, train, test, l2=1e-3)
    assert heavy["top1"] < 0.8 and light["top1"] > 0.95
    result = run_linear_probe(model, train, test, l2=[100.0, 1e-3])
    assert result == light
    assert run_linear_probe(model, train, test, l2=[100.0, 1e-3]) == result  # deterministic
    with pytest.raises(ValueError, match="val_fraction"):
        run_linear_probe(model, train, test, l2=[1.0, 2.0], val_fraction=0.0)
    with pytest.raises(ValueError, match="image_features"):
        run_linear_probe(torch.nn.Linear(2, 2), train, test)
