"""aiaas_fast.optim.Adam / AdamW against torch.optim: trajectories, param groups,
schedulers and state_dict round trips in both directions."""
import itertools

import pytest
import torch

from aiaas_fast.optim import Adam, AdamW

FLAGS = [dict(amsgrad=a, maximize=m, weight_decay=wd) for a, m, wd in itertools.product([False, True], [False, True], [0.0, 0.05])]


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(7, 5, generator=g).requires_grad_(), torch.randn(7, generator=g).requires_grad_(),
            torch.randn(1, 7, generator=g).requires_grad_(), torch.randn((), generator=g).requires_grad_()]


def set_grads(params, step):
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


def trajectory(opt_cls, params, steps, scheduler=None, **kw):
    opt = opt_cls(params, **kw)
    sched = scheduler(opt) if scheduler else None
    for s in range(steps):
        set_grads(params, s)
        opt.step()
        if sched:
            sched.step()
    return opt


@pytest.mark.parametrize("flags", FLAGS, ids=str)
@pytest.mark.parametrize("pair", [(Adam, torch.optim.Adam), (AdamW, torch.optim.AdamW)], ids=["Adam", "AdamW"])
def test_same_trajectory_as_torch(pair, flags):
    ours_cls, torch_cls = pair
    ours, ref = make_params(), make_params()
    sched = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    o = trajectory(ours_cls, ours, 6, scheduler=sched, lr=0.01, **flags)
    r = trajectory(torch_cls, ref, 6, scheduler=sched, lr=0.01, **flags)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert o.param_groups[0]["lr"] == r.param_groups[0]["lr"] == 0.01 * 0.5**3


def test_adam_with_decoupled_weight_decay_flag_is_adamw():
    ours, ref = make_params(), make_params()
    trajectory(Adam, ours, 4, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)
    trajectory(torch.optim.AdamW, ref, 4, lr=0.01, weight_decay=0.1)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_param_groups_and_zero_grad():
    ours, ref = make_params(), make_params()
    groups = lambda ps: [{"params": ps[:2], "lr": 0.02}, {"params": ps[2:], "lr": 0.001, "amsgrad": True}]
    o, r = Adam(groups(ours)), torch.optim.Adam(groups(ref))
    for s in range(3):
        set_grads(ours, s)
        set_grads(ref, s)
        ours[3].grad = ref[3].grad = None  # a parameter without a gradient is skipped
        o.step()
        r.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert "max_exp_avg_sq" in o.state[ours[2]] and ours[3] not in o.state
    o.zero_grad()
    assert all(p.grad is None for p in ours)


@pytest.mark.parametrize("direction", ["torch->ours", "ours->torch"])
def test_state_dict_round_trip_resumes_the_same_trajectory(direction):
    first, second = (torch.optim.Adam, Adam) if direction == "torch->ours" else (Adam, torch.optim.Adam)
    a = make_params()
    opt_a = trajectory(first, a, 3, lr=0.01, amsgrad=True)
    ckpt = opt_a.state_dict()
    b = [p.detach().clone().requires_grad_() for p in a]
    opt_b = second(b, lr=0.01, amsgrad=True)
    opt_b.load_state_dict(ckpt)
    uninterrupted = make_params()
    opt_u = trajectory(torch.optim.Adam, uninterrupted, 3, lr=0.01, amsgrad=True)
    for s in range(3, 6):
        set_grads(b, s)
        set_grads(uninterrupted, s)
        opt_b.step()
        opt_u.step()
    for p, q in zip(b, uninterrupted):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert opt_b.state_dict()["state"][0]["step"].item() == 6


def test_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="Invalid learning rate"):
        Adam(make_params(), lr=-1.0)
    with pytest.raises(RuntimeError, match="differentiable=True is not supported"):
        Adam(make_params(), differentiable=True)
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    p.grad = torch.randn(3, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="does not support complex"):
        Adam([p]).step()


def test_one_native_call_per_device_dtype_bucket(monkeypatch):
    import aiaas_fast.ops

    calls = []
    real = aiaas_fast.ops.adam_
    monkeypatch.setattr(aiaas_fast.ops, "adam_", lambda *a, **k: (calls.append(len(a[0])), real(*a, **k)))
    params = make_params() + [torch.randn(3, dtype=torch.float64, requires_grad=True)]
    opt = Adam(params)
    set_grads(params, 0)
    opt.step()
    assert sorted(calls) == [1, 4]  # float32 bucket of 4 tensors, float64 bucket of 1


def test_cached_buckets_follow_changes_in_which_params_have_grads_and_loaded_state():
    ours, ref = make_params(), make_params()
    o, r = Adam(ours, lr=0.01), torch.optim.Adam(ref, lr=0.01)
    for s in range(6):
        set_grads(ours, s)
        set_grads(ref, s)
        if s % 3 == 1:  # a step where one parameter has no gradient
            ours[1].grad = ref[1].grad = None
        if s == 4:  # a reload replaces the state tensors: the cache must not keep the old ones
            o.load_state_dict(o.state_dict())
        o.step()
        r.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change", ["clear", "pop one", "replace exp_avg", "replace step", "new state object"])
def test_cached_buckets_follow_state_changed_by_hand(change):
    # Resetting the optimizer's state by hand (state.clear(), a moment tensor replaced) is
    # seen at the next step, as torch.optim.Adam sees it; the cache would update old tensors.
    ours, ref = make_params(), make_params()
    o, r = Adam(ours, lr=0.01), torch.optim.Adam(ref, lr=0.01)
    for s in range(5):
        set_grads(ours, s)
        set_grads(ref, s)
        if s == 3:
            for opt, params in ((o, ours), (r, ref)):
                if change == "clear":
                    opt.state.clear()
                elif change == "pop one":
                    opt.state.pop(params[0])
                elif change == "replace exp_avg":
                    opt.state[params[1]]["exp_avg"] = torch.zeros_like(params[1])
                elif change == "replace step":
                    opt.state[params[2]]["step"] = torch.tensor(0.0)
                else:
                    opt.state[params[3]] = {k: v.clone() for k, v in opt.state[params[3]].items()}
        o.step()
        r.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert sorted(map(str, o.state_dict()["state"].items())) == sorted(map(str, r.state_dict()["state"].items()))


def test_a_sparse_gradient_after_dense_steps_is_refused_clearly():
    p = torch.nn.Parameter(torch.randn(4, 3))
    o = Adam([p])
    p.grad = torch.randn(4, 3)
    o.step()
    p.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        o.step()


def test_a_group_added_later_is_checked_as_the_constructor_checks():
    o = Adam(make_params()[:2])
    with pytest.raises(RuntimeError, match="capturable=True is not supported"):
        o.add_param_group({"params": make_params()[2:], "capturable": True})
    assert len(o.param_groups) == 1  # refused, not added


@pytest.mark.parametrize("fused", [None, True], ids=["default", "fused=True"])
def test_grad_scaler_unscales_and_skips_an_overflowing_step(fused):
    # fused=True is accepted for torch compatibility; it must not make GradScaler hand the
    # step scaled gradients (torch's fused kernel unscales them itself, ours does not).
    def run(cls):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        opt = cls(model.parameters(), lr=1e-2, fused=fused)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        x, y = torch.randn(16, 4), torch.randn(16, 1)
        for i in range(5):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean() * (float("inf") if i == 2 else 1.0)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return model, scaler.get_scale()

    ours, our_scale = run(Adam)
    ref, ref_scale = run(lambda *a, fused=None, **k: torch.optim.Adam(*a, **k))  # torch's unfused step as oracle
    assert our_scale == ref_scale
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_maximize_and_amsgrad_are_read_per_param_group():
    # Each group's own flags, as torch.optim.Adam reads them (not the constructor's defaults).
    ours, ref = make_params(), make_params()
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "maximize": True, "amsgrad": True, "lr": 0.02}]
    trajectory(lambda ps, **kw: Adam(groups(ps), **kw), ours, 3, lr=0.01)
    trajectory(lambda ps, **kw: torch.optim.Adam(groups(ps), **kw), ref, 3, lr=0.01)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_amsgrad_switched_in_a_group_between_steps_is_followed():
    # A flag changed between steps applies from the next step on, in both directions; the
    # cached buckets must not keep the old flag's tensor lists. Switched on, ours starts
    # max_exp_avg_sq at zeros (torch.optim.Adam creates it only at a parameter's first step and
    # fails with a KeyError: its state gets those zeros by hand); switched off, both keep it.
    ours, ref = make_params(), make_params()
    o, r = Adam(ours, lr=0.01), torch.optim.Adam(ref, lr=0.01)
    for s in range(6):
        if s in (2, 4):
            o.param_groups[0]["amsgrad"] = r.param_groups[0]["amsgrad"] = s == 2
        if s == 2:
            for q in ref:
                r.state[q]["max_exp_avg_sq"] = torch.zeros_like(q)
        set_grads(ours, s)
        set_grads(ref, s)
        o.step()
        r.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(o.state[p]["max_exp_avg_sq"], r.state[q]["max_exp_avg_sq"], rtol=1e-5, atol=1e-9)
