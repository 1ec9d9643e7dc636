"""BertAdam and warmup_linear against updates computed by hand (LXMERT_FACTS.md §2)."""

from __future__ import annotations

import math

import pytest
import torch

from lxmert_bench.config import OptimConfig
from lxmert_bench.train.optim import BertAdam, WarmupLinearSchedule, build_optimizer, warmup_linear

FUSED = pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])


@FUSED
def test_first_update_has_no_bias_correction_and_decays_weights(fused):
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = BertAdam([p], lr=0.1, weight_decay=0.01, fused=fused)
    p.grad = torch.tensor([0.5, 0.25])
    opt.step()
    # m = 0.1 g, v = 0.001 g²; update = m / (sqrt(v) + eps) + wd * p
    expected = []
    for w, g in ((1.0, 0.5), (-2.0, 0.25)):
        m, v = 0.1 * g, 0.001 * g * g
        expected.append(w - 0.1 * (m / (math.sqrt(v) + 1e-6) + 0.01 * w))
    assert torch.allclose(p.detach(), torch.tensor(expected), atol=1e-7)
    # Without bias correction the first step is (1-b1)/sqrt(1-b2) = 3.16 lr; Adam would take ~lr.
    assert abs(p[0].item() - 1.0) == pytest.approx(0.1 * (0.1 / math.sqrt(0.001)) + 0.001, rel=1e-4)


@FUSED
def test_second_update_matches_hand_computation(fused):
    p = torch.nn.Parameter(torch.tensor([0.3]))
    opt = BertAdam([p], lr=0.01, weight_decay=0.0, fused=fused)
    m = v = 0.0
    w = 0.3
    for g in (1.0, -3.0):
        p.grad = torch.tensor([g])
        opt.step()
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        w -= 0.01 * m / (math.sqrt(v) + 1e-6)
    assert p.item() == pytest.approx(w, abs=1e-7)


def test_fused_and_foreach_paths_agree_over_many_steps():
    torch.manual_seed(0)
    shapes = [(7, 5), (5,), (3, 2, 4)]
    runs = {}
    for fused in (True, False):
        params = [torch.nn.Parameter(torch.linspace(-1, 1, math.prod(s)).reshape(s)) for s in shapes]
        opt = BertAdam(params, lr=1e-2, weight_decay=0.01, fused=fused)
        gen = torch.Generator().manual_seed(1)
        for _ in range(20):
            for q in params:
                q.grad = torch.randn(q.shape, generator=gen)
            opt.step()
        runs[fused] = [q.detach().clone() for q in params]
    for a, b in zip(runs[True], runs[False]):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
        assert not torch.equal(a, torch.linspace(-1, 1, a.numel()).reshape(a.shape))


def test_fused_refuses_mixed_dtypes():
    params = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2, dtype=torch.float64))]
    for q in params:
        q.grad = torch.ones_like(q)
    with pytest.raises(RuntimeError, match="fused"):
        BertAdam(params, fused=True).step()
    BertAdam(params).step()  # auto: the foreach path
    assert not torch.equal(params[1].detach(), torch.ones(2, dtype=torch.float64))


@FUSED
def test_params_without_grad_are_left_alone(fused):
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(3))
    opt = BertAdam([a, b], lr=0.1, weight_decay=0.5, fused=fused)
    a.grad = torch.ones(3)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(3)) and b not in opt.state
    assert not torch.equal(a.detach(), torch.ones(3))


def test_warmup_linear_shape():
    assert warmup_linear(0.0, 0.1) == 0.0
    assert warmup_linear(0.05, 0.1) == pytest.approx(0.5)
    assert warmup_linear(0.1, 0.1) == pytest.approx(1.0)
    assert warmup_linear(0.55, 0.1) == pytest.approx(0.5)
    assert warmup_linear(1.0, 0.1) == 0.0
    assert warmup_linear(1.5, 0.1) == 0.0
    assert warmup_linear(0.5, 0.0) == pytest.approx(0.5)  # no warm-up: pure decay


def test_schedule_sets_lr_per_update_and_round_trips():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = BertAdam([p], lr=1.0)
    sched = WarmupLinearSchedule(opt, base_lr=1e-3, t_total=20, warmup=0.1)
    lrs = [sched.step() for _ in range(20)]
    assert lrs[0] == pytest.approx(0.5e-3)  # update 1 of 20, warm-up over 2 updates
    assert lrs[1] == pytest.approx(1e-3)
    assert lrs[10] == pytest.approx(1e-3 * (1 - 11 / 20) / 0.9)
    assert lrs[-1] == 0.0
    assert opt.param_groups[0]["lr"] == 0.0
    again = WarmupLinearSchedule(opt, base_lr=1e-3, t_total=20, warmup=0.1)
    again.load_state_dict(sched.state_dict())
    assert again.updates == 20
    with pytest.raises(ValueError, match="t_total"):
        WarmupLinearSchedule(opt, 1e-3, 30, 0.1).load_state_dict(sched.state_dict())


def test_build_optimizer_switch():
    model = torch.nn.Linear(2, 2)
    opt, sched = build_optimizer(model.parameters(), OptimConfig(lr=1e-3), t_total=10)
    assert isinstance(opt, BertAdam) and len(opt.param_groups) == 1
    assert opt.param_groups[0]["weight_decay"] == 0.01
    opt, _ = build_optimizer(model.parameters(), OptimConfig(optimizer="adamw"), t_total=10)
    assert isinstance(opt, torch.optim.AdamW)
    with pytest.raises(ValueError, match="optim.optimizer"):
        build_optimizer(model.parameters(), OptimConfig(optimizer="sgd"), t_total=10)  # type: ignore[arg-type]


def test_bert_adam_never_imports_dynamo():
    """torch.optim.Optimizer's add_param_group / zero_grad / state_dict / load_state_dict import
    torch._dynamo on first call (1.4 s of every stage's start); BertAdam binds them unwrapped. A
    fresh interpreter: build, step, zero the grads, save and resume the state."""
    import subprocess
    import sys

    script = (
        "import sys, torch\n"
        "from lxmert_bench.train.optim import BertAdam\n"
        "m = torch.nn.Linear(3, 2)\n"
        "opt = BertAdam(m.parameters(), lr=0.1)\n"
        "m(torch.ones(1, 3)).sum().backward(); opt.step(); opt.zero_grad()\n"
        "assert all(p.grad is None for p in m.parameters())\n"
        "again = BertAdam(m.parameters(), lr=0.1); again.load_state_dict(opt.state_dict())\n"
        "assert torch.equal(again.state[m.weight]['exp_avg'], opt.state[m.weight]['exp_avg'])\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "False"
