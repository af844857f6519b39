"""Learning-rate schedules and the optimizer's decoupled weight decay (pipeline.trainer)."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.recipes import recipe
from pipeline.trainer import build_optimizer, lr_factor


def _cfg(**kw):
    return recipe("tiny", train_data=("unused",), **kw)


def test_cosine_warms_up_linearly_then_decays_to_zero():
    cfg = _cfg(steps=100, schedule="cosine", warmup_frac=0.1)
    f = [lr_factor(cfg, s) for s in range(cfg.steps)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(b > a for a, b in zip(f[:9], f[1:10]))                      # warm-up rises
    assert all(b <= a for a, b in zip(f[10:], f[11:]))                     # then never rises
    assert f[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert f[-1] < 1e-3


def test_rsqrt_decays_as_inverse_sqrt_then_cools_down_linearly():
    cfg = _cfg(steps=100, schedule="rsqrt", warmup_frac=0.1, cooldown_frac=0.2)
    assert lr_factor(cfg, 9) == pytest.approx(1.0)
    assert lr_factor(cfg, 39) == pytest.approx(math.sqrt(10 / 40))
    assert lr_factor(cfg, 80) == pytest.approx(math.sqrt(10 / 81) * 20 / 20)
    assert lr_factor(cfg, 90) == pytest.approx(math.sqrt(10 / 91) * 10 / 20)
    assert lr_factor(cfg, 99) == pytest.approx(math.sqrt(10 / 100) * 1 / 20)


@pytest.mark.parametrize("lr", [1e-3, 5e-4])
def test_weight_decay_is_decoupled_from_the_peak_lr(lr):
    """big_vision semantics: with a zero gradient a decayed weight shrinks by exactly 1 - wd * m(t),
    whatever the peak lr; gains and biases are never decayed."""
    cfg = _cfg(steps=20, lr=lr, weight_decay=1e-2, warmup_frac=0.5)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt, sched = build_optimizer(cfg, model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(3):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        sched.step()
        m = lr_factor(cfg, step)
        before["0.weight"] *= 1 - cfg.weight_decay * m
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], rtol=1e-6, atol=0, msg=lambda m, n=n: f"{n}: {m}")
