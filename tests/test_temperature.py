import math

import pytest
import torch

from topoclip import LogitScale


def test_init_value_and_log_parametrisation():
    s = LogitScale(init=1 / 0.07)
    assert s.value == pytest.approx(1 / 0.07, rel=1e-6)
    assert float(s.log_scale.detach()) == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    assert isinstance(s.log_scale, torch.nn.Parameter)


def test_fixed_scale_is_a_buffer_without_gradient():
    s = LogitScale(init=1.0, learnable=False)
    assert list(s.parameters()) == []
    assert "log_scale" in dict(s.named_buffers())
    assert not s().requires_grad


def test_gradient_is_multiplicative():
    s = LogitScale(init=2.0)
    (3.0 * s()).backward()
    # d(3 e^w)/dw = 3 e^w = 6
    assert float(s.log_scale.grad) == pytest.approx(6.0)


def test_max_clamps_forward_and_clamp_pulls_parameter_back():
    s = LogitScale(init=50.0, max=100.0)
    with torch.no_grad():
        s.log_scale.fill_(math.log(500.0))
    assert s.value == pytest.approx(100.0)
    s.clamp_()
    assert float(s.log_scale.detach()) == pytest.approx(math.log(100.0))
    assert LogitScale(init=5.0, max=None).value == pytest.approx(5.0)


@pytest.mark.parametrize("kw", [dict(init=0.0), dict(init=-1.0), dict(init=float("nan")), dict(init=200.0, max=100.0), dict(max=0.0)])
def test_bad_values_raise(kw):
    with pytest.raises(ValueError, match="LogitScale"):
        LogitScale(**kw)


def test_state_dict_round_trip():
    a = LogitScale(init=3.95, max=6.25)
    b = LogitScale(init=1.0, max=6.25)
    b.load_state_dict(a.state_dict())
    assert b.value == pytest.approx(3.95)
