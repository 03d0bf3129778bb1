"""The compiled training engine against plain PyTorch: same initial weights and same batches
give the same losses, gradients and weights, on every kernel path, for odd widths and a last
partial batch; its runs, callbacks, optimizer sharing and errors."""
import copy
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import aiaas_fast
from aiaas_fast.engine import Engine, UnsupportedModel, mlp_layers, unsupported_reason
from aiaas_fast.ensemble import ensemble_engine
from helpers import sequential, torch_steps

PATHS = ["small", "blas", "auto"]


def batches(n, batch, in_f, out_f, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, in_f, generator=g), torch.randn(batch, out_f, generator=g)) for _ in range(n)]


def assert_same_weights(a, b, atol=2e-6):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-5, atol=atol, msg=f"parameter {name}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("widths,batch", [([10, 20, 1], 64), ([13, 37, 5, 3], 67), ([7, 3], 1), ([5, 129, 17, 2], 33)])
def test_steps_match_pytorch(path, widths, batch):
    model = sequential(widths)
    ref = copy.deepcopy(model)
    engine = Engine(model, lr=1e-2, path=path)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    data = batches(6, batch, widths[0], widths[-1])
    losses = [engine.step(x, y) for x, y in data]
    ref_losses = torch_steps(ref, data, opt)
    assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    assert_same_weights(model, ref)


@pytest.mark.parametrize("path", ["small", "blas"])
def test_gradients_match_autograd(path):
    widths = [9, 31, 18, 4]
    model = sequential(widths)
    ref = copy.deepcopy(model)
    engine = Engine(model, path=path)
    (x, y), = batches(1, 50, 9, 4)
    engine.step(x, y)
    nn.functional.mse_loss(ref(x), y).backward()
    for g, p in zip(engine.last_gradients(), ref.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)


def test_wide_small_kernels_split_across_threads_match_pytorch():
    # 64 x 300 x 112 multiply-adds per layer: past the size at which a small-kernel layer
    # splits its batch (forward, input gradient) and outputs (weight gradient) across threads.
    model = sequential([64, 300, 1])
    ref = copy.deepcopy(model)
    engine = Engine(model, path="small")
    data = batches(3, 100, 64, 1)
    assert [engine.step(x, y) for x, y in data] == pytest.approx(torch_steps(ref, data, torch.optim.Adam(ref.parameters())), rel=1e-5)
    assert_same_weights(model, ref)


@pytest.mark.parametrize("path", ["blas", "auto"])
def test_wide_layers_with_elementwise_passes_and_adam_split_across_threads(path):
    # 300 x 256 activations and a 300 x 256 weight: past the 64K elements at which the bias,
    # ReLU-mask and bias-gradient passes and Adam split across threads.
    model = sequential([256, 300, 1])
    ref = copy.deepcopy(model)
    engine = Engine(model, path=path)
    data = batches(3, 250, 256, 1)
    assert [engine.step(x, y) for x, y in data] == pytest.approx(torch_steps(ref, data, torch.optim.Adam(ref.parameters())), rel=1e-5)
    # A few of the 77K weights have gradients near Adam's eps, where the step (about lr)
    # amplifies float32 summation-order differences: allow 1% of lr there.
    assert_same_weights(model, ref, atol=1e-5)


@pytest.mark.parametrize("path", ["small", "blas"])
def test_final_relu_and_layers_without_bias(path):
    for kw in (dict(final_relu=True), dict(bias=False)):
        model = sequential([6, 11, 3], **kw)
        ref = copy.deepcopy(model)
        engine = Engine(model, path=path)
        data = batches(4, 21, 6, 3)
        assert [engine.step(x, y) for x, y in data] == pytest.approx(
            torch_steps(ref, data, torch.optim.Adam(ref.parameters())), rel=1e-5, abs=1e-7)
        assert_same_weights(model, ref)


# The engine trains a batch of more than 1024 rows in chunks of 1024 (csrc/engine/mlp_engine.cpp,
# kChunkCols), adding the weight gradients over them: 2500 rows are two full chunks and a part.
CHUNKED_BATCH = 2500


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("final_relu", [False, True])
def test_a_batch_of_several_chunks_matches_pytorch(path, final_relu):
    # "auto" on AVX2: the first layer (40 x 64 weights) on the BLAS, the others on the hand kernels
    model = sequential([40, 64, 9, 2], final_relu=final_relu)
    ref = copy.deepcopy(model)
    engine = Engine(model, lr=1e-2, path=path)
    data = batches(4, CHUNKED_BATCH, 40, 2)
    losses = [engine.step(x, y) for x, y in data[:3]]
    assert losses == pytest.approx(torch_steps(ref, data[:3], torch.optim.Adam(ref.parameters(), lr=1e-2)), rel=1e-5)
    assert_same_weights(model, ref)
    # A step's gradients are summed over all three chunks, not the last chunk's alone.
    x, y = data[3]
    engine.step(x, y)
    ref.zero_grad()
    nn.functional.mse_loss(ref(x), y).backward()
    for g, p in zip(engine.last_gradients(), ref.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("path", ["small", "blas"])
def test_run_with_batches_of_several_chunks_and_a_short_last_batch(path):
    model = sequential([6, 17, 1])
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(5)
    n, batch = 5300, 2100  # batches of 2100, 2100 and 1100 rows: chunks of 1024 and the rest
    X, Y = torch.randn(n, 6, generator=g), torch.randn(n, 1, generator=g)
    rows = torch.randperm(n, generator=g)
    losses = Engine(model, lr=1e-2, path=path).run(X, Y, epochs=2, batch_size=batch, shuffle=False, rows=rows)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    expected = []
    for _ in range(2):
        per_batch = [(X[rows[i:i + batch]], Y[rows[i:i + batch]]) for i in range(0, n, batch)]
        step_losses = torch_steps(ref, per_batch, opt)
        expected.append(sum(loss * len(b[0]) for loss, b in zip(step_losses, per_batch)) / n)
    assert losses.tolist() == pytest.approx(expected, rel=1e-5)
    assert_same_weights(model, ref)


def test_many_models_on_a_shared_batch_of_several_chunks_train_as_each_would_alone():
    # A shared batch is gathered once for all models only when it is one chunk: each model
    # must see every chunk, so each trains to the same bits as an engine of its own.
    # One thread: there the models run one after another in one workspace.
    K, widths, threads = 3, [5, 12, 2], torch.get_num_threads()
    for n in sorted({1, threads}):
        torch.manual_seed(0)
        ens = aiaas_fast.Ensemble(K, widths[0], widths[1:-1], widths[-1])
        alone = [ens.member(k) for k in range(K)]
        core, _ = ensemble_engine(ens, lr=1e-2)
        engines = [Engine(m, lr=1e-2) for m in alone]
        try:
            torch.set_num_threads(n)
            for x, y in batches(2, CHUNKED_BATCH, 5, 2):
                losses = core.step(x, y)
                assert losses.tolist() == [e.step(x, y) for e in engines], n
        finally:
            torch.set_num_threads(threads)
        for k, m in enumerate(alone):
            assert all(torch.equal(p, q) for p, q in zip(ens.member(k).parameters(), m.parameters())), (n, k)


@pytest.mark.parametrize("path", ["small", "blas"])
def test_a_batch_of_several_chunks_gives_the_same_bits_on_any_number_of_threads(path):
    # The threads take the chunks' lanes as they free up (one to three lanes per thread here).
    results, threads = [], torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            model = sequential([40, 64, 64, 1])
            engine = Engine(model, lr=1e-2, path=path)
            losses = [engine.step(x, y) for x, y in batches(2, CHUNKED_BATCH, 40, 1)]
            results.append((losses, [p.detach().clone() for p in model.parameters()]))
    finally:
        torch.set_num_threads(threads)
    for losses, params in results[1:]:
        assert losses == results[0][0]
        assert all(torch.equal(p, q) for p, q in zip(params, results[0][1]))


def test_converted_and_aiaas_models_are_supported():
    model = sequential([4, 8, 8, 1])
    converted = aiaas_fast.convert(copy.deepcopy(model))
    assert [(lin.out_features, relu) for lin, relu in mlp_layers(converted)] == [(8, True), (8, True), (1, False)]
    mlp = aiaas_fast.nn.MLP(4, [8, 8], 1)
    assert [relu for _, relu in mlp_layers(mlp)] == [True, True, False]


@pytest.mark.parametrize("kind", ["adamw", "amsgrad", "l2", "maximize"])
def test_optimizer_variants_through_a_torch_optimizer(kind):
    model = sequential([5, 16, 2])
    ref = copy.deepcopy(model)
    make = {
        "adamw": lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.1),
        "amsgrad": lambda p: torch.optim.Adam(p, lr=3e-3, amsgrad=True),
        "l2": lambda p: torch.optim.Adam(p, lr=3e-3, weight_decay=0.05, betas=(0.8, 0.99), eps=1e-6),
        "maximize": lambda p: torch.optim.Adam(p, lr=1e-4, maximize=True),
    }[kind]
    opt = make(model.parameters())
    engine = Engine(model, opt)
    data = batches(5, 16, 5, 2)
    losses = [engine.step(x, y) for x, y in data]
    assert losses == pytest.approx(torch_steps(ref, data, make(ref.parameters())), rel=1e-5)
    assert_same_weights(model, ref)


def test_optimizer_state_is_shared_and_a_checkpoint_resumes_either_way():
    model = sequential([3, 12, 1])
    ref = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    engine = Engine(model, opt)
    data = batches(6, 10, 3, 1)
    for x, y in data[:3]:
        engine.step(x, y)
    assert all(float(opt.state[p]["step"]) == 3 for p in model.parameters())
    saved = copy.deepcopy(opt.state_dict())
    torch_steps(model, data[3:], opt)  # the op-by-op path continues from the engine's state
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    torch_steps(ref, data, ref_opt)
    assert_same_weights(model, ref)
    assert saved["state"][0]["step"].item() == 3


@pytest.mark.parametrize("change", ["load_state_dict", "clear", "assign a moment", "amsgrad checkpoint"])
@pytest.mark.parametrize("call", ["step", "run"])
def test_optimizer_state_replaced_after_the_engine_is_built_is_followed(change, call):
    # load_state_dict and state.clear() put new state objects into the optimizer: the engine
    # held the old ones and went on updating them (wrong weights, a stale step count saved).
    model = sequential([3, 12, 1])
    ref = copy.deepcopy(model)
    opt, ref_opt = torch.optim.Adam(model.parameters(), lr=1e-2), torch.optim.Adam(ref.parameters(), lr=1e-2)
    engine = Engine(model, opt)
    data = batches(5, 10, 3, 1)
    engine.step(*data[0])
    torch_steps(ref, data[:1], ref_opt)
    saved = copy.deepcopy(opt.state_dict())
    engine.step(*data[1])
    torch_steps(ref, data[1:2], ref_opt)
    for o in (opt, ref_opt):
        state = copy.deepcopy(saved)  # each its own: load_state_dict keeps the tensors it is given
        if change == "load_state_dict":
            o.load_state_dict(state)
        elif change == "clear":
            o.state.clear()
        elif change == "assign a moment":
            w = o.param_groups[0]["params"][0]
            o.state[w]["exp_avg"] = torch.zeros_like(w)
        else:  # as from an AMSGrad run: the groups' amsgrad changes with the state
            state["param_groups"][0]["amsgrad"] = True
            for v in state["state"].values():
                v["max_exp_avg_sq"] = v["exp_avg_sq"].clone() * 2
            o.load_state_dict(state)
    if call == "step":
        for x, y in data[2:]:
            engine.step(x, y)
    else:
        x, y = torch.cat([x for x, _ in data[2:]]), torch.cat([y for _, y in data[2:]])
        engine.run(x, y, epochs=1, batch_size=10, shuffle=False)
    torch_steps(ref, data[2:], ref_opt)
    assert_same_weights(model, ref)
    steps = [float(s["step"]) for s in opt.state_dict()["state"].values()]
    assert steps == [float(s["step"]) for s in ref_opt.state_dict()["state"].values()], steps


def test_learning_rate_changes_are_picked_up():
    model = sequential([3, 8, 1])
    ref = copy.deepcopy(model)
    opt, ref_opt = torch.optim.Adam(model.parameters(), lr=1e-2), torch.optim.Adam(ref.parameters(), lr=1e-2)
    sched, ref_sched = (torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (opt, ref_opt))
    engine = Engine(model, opt)
    for x, y in batches(4, 8, 3, 1):
        engine.step(x, y)
        sched.step()
        torch_steps(ref, [(x, y)], ref_opt)
        ref_sched.step()
    assert_same_weights(model, ref)


@pytest.mark.parametrize("path", ["small", "blas"])
def test_run_without_shuffle_equals_steps_on_the_same_batches(path):
    model = sequential([7, 19, 2])
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    X, Y = torch.randn(103, 7, generator=g), torch.randn(103, 2, generator=g)
    rows = torch.randperm(103, generator=g)
    losses = Engine(model, lr=1e-2, path=path).run(X, Y, epochs=2, batch_size=20, shuffle=False, rows=rows)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    expected = []
    for _ in range(2):
        per_batch = [(X[rows[i:i + 20]], Y[rows[i:i + 20]]) for i in range(0, 103, 20)]  # last batch of 3
        step_losses = torch_steps(ref, per_batch, opt)
        expected.append(sum(loss * len(b[0]) for loss, b in zip(step_losses, per_batch)) / 103)
    assert losses.tolist() == pytest.approx(expected, rel=1e-5)
    assert_same_weights(model, ref)


def test_run_shuffles_by_seed_deterministically():
    X, Y = torch.randn(200, 4), torch.randn(200, 1)
    results = []
    for seed in (5, 5, 6):
        model = sequential([4, 8, 1])
        losses = Engine(model).run(X, Y, epochs=3, batch_size=16, seed=seed)
        results.append((losses, [p.detach().clone() for p in model.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    assert not torch.equal(results[0][0], results[2][0])


def test_run_calls_back_and_stops():
    X, Y = torch.randn(100, 4), torch.randn(100, 1)
    calls = []

    def cb(epoch, step, steps, end, loss):
        calls.append((epoch, step, steps, end))
        return epoch == 1 and end

    losses = Engine(sequential([4, 8, 1])).run(X, Y, epochs=5, batch_size=10, callback=cb, callback_every=4)
    assert len(losses) == 2
    assert calls == [(0, 4, 10, False), (0, 8, 10, False), (0, 10, 10, True), (1, 4, 10, False), (1, 8, 10, False), (1, 10, 10, True)]

    def boom(*args):
        raise KeyError("from the callback")

    with pytest.raises(KeyError, match="from the callback"):
        Engine(sequential([4, 8, 1])).run(X, Y, epochs=2, batch_size=10, callback=boom)


def test_run_releases_the_gil():
    X, Y = torch.randn(20000, 16), torch.randn(20000, 1)
    engine = Engine(sequential([16, 64, 64, 1]))
    ticks, done = [0], threading.Event()

    def count():
        while not done.is_set():
            ticks[0] += 1
            time.sleep(0.001)

    t = threading.Thread(target=count)
    t.start()
    t0 = time.perf_counter()
    engine.run(X, Y, epochs=20, batch_size=64)  # a few hundred ms
    elapsed = time.perf_counter() - t0
    done.set()
    t.join()
    # The other thread ticked while C++ trained (with the GIL held it would not tick at all).
    assert ticks[0] >= min(10, elapsed / 0.01), (ticks[0], elapsed)


def test_predict_matches_the_module():
    model = sequential([6, 40, 9, 3])
    X = torch.randn(1500, 6)  # more rows than one predict chunk
    torch.testing.assert_close(Engine(model).predict(X), model(X).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["small", "blas"])
def test_predict_in_pieces_matches_the_module_with_the_same_bits_on_any_number_of_threads(path):
    # More rows than one piece (256) run in pieces the threads take as they free up: the
    # result must not depend on which thread ran which piece, nor miss a short last piece.
    model = sequential([40, 64, 48, 3])
    engine = Engine(model, path=path)
    results, threads = {}, torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            for rows in (257, 1500, 5000):
                x = torch.randn(rows, 40, generator=torch.Generator().manual_seed(rows))
                got = engine.predict(x)
                torch.testing.assert_close(got, model(x).detach(), rtol=1e-5, atol=1e-5)
                results.setdefault(rows, []).append(got)
    finally:
        torch.set_num_threads(threads)
    for rows, got in results.items():
        assert all(torch.equal(g, got[0]) for g in got[1:]), rows


def test_unsupported_models_are_named():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 1)

        def forward(self, x):
            return self.fc(x)

    cases = [
        (Net(), "whose forward\\(\\) it cannot see"),
        (nn.Sequential(nn.Linear(2, 3), nn.Dropout(), nn.Linear(3, 1)), "1: Dropout is not a layer"),
        (nn.Sequential(nn.ReLU(), nn.Linear(2, 1)), "0: a ReLU that does not follow"),
        (sequential([2, 3, 1]).double(), "float32; the model is torch.float64"),
    ]
    cases.append((sequential([2, 3, 1]).to("meta"), "runs on the CPU or CUDA; the model is on meta"))
    frozen = sequential([2, 3, 1])
    frozen[0].weight.requires_grad_(False)
    cases.append((frozen, "frozen parameter"))
    for model, message in cases:
        with pytest.raises(UnsupportedModel, match=message):
            Engine(model)
    assert "SGD" in unsupported_reason(sequential([2, 1]), torch.optim.SGD(sequential([2, 1]).parameters(), lr=0.1))
    assert "L1Loss" in unsupported_reason(sequential([2, 1]), loss_fn=nn.L1Loss())
    m = sequential([2, 1])
    assert "not exactly the model's" in unsupported_reason(m, torch.optim.Adam(sequential([2, 1]).parameters()))


def _models_the_engine_would_train_wrongly():
    """Models that look like MLPs but whose forward() is not the plain chain of layers: the
    engine would train another function than the one the model computes."""
    class Scaled(nn.Sequential):
        def forward(self, x):
            return super().forward(x) * 10.0

    class Clamped(nn.Linear):
        def forward(self, x):
            return super().forward(x).clamp(-1, 1)

    hooked = sequential([3, 4, 1])
    hooked[0].register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    shared_layer = nn.Linear(4, 4)
    shared_weight = sequential([4, 4, 4, 1])
    shared_weight[2].weight = shared_weight[0].weight
    pruned = sequential([3, 4, 1])
    prune.l1_unstructured(pruned[0], "weight", amount=0.5)
    return [
        (Scaled(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)), "Scaled overrides Sequential.forward"),
        (nn.Sequential(Clamped(3, 4), nn.ReLU(), nn.Linear(4, 1)), "0: Clamped overrides Linear.forward"),
        (hooked, "0 has forward pre hooks"),
        (nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 4)), nn.ReLU(), nn.Linear(4, 1)),
         "0 has parametrizations"),
        (nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(3, 4)), nn.Linear(4, 1)),
         "0 has parametrizations"),
        (pruned, "0 has forward pre hooks"),
        (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), shared_layer, nn.ReLU(), shared_layer, nn.ReLU(), nn.Linear(4, 1)),
         "4: the layer 2 used a second time"),
        (shared_weight, "2.weight is the same tensor as 0.weight"),
    ]


def test_models_whose_forward_the_engine_would_not_reproduce_are_refused():
    for model, message in _models_the_engine_would_train_wrongly():
        with pytest.raises(UnsupportedModel, match=message):
            Engine(model)
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: o)
    try:
        assert "global module hooks" in unsupported_reason(sequential([2, 1]))
    finally:
        handle.remove()
    assert unsupported_reason(sequential([2, 1])) is None


def test_fit_auto_falls_back_for_them_and_trains_what_the_model_computes():
    x, y, _ = fit_data(120)
    for model, message in _models_the_engine_would_train_wrongly()[:2]:
        ref = copy.deepcopy(model)
        h = aiaas_fast.fit(model, x, y, epochs=2, batch_size=32, progress=False)
        assert h.engine == "ops" and message.split(":")[-1].strip() in h.engine_note
        h_ref = aiaas_fast.fit(ref, x, y, epochs=2, batch_size=32, progress=False, engine="ops")
        assert h["train_loss"] == h_ref["train_loss"]


def test_settings_given_beside_an_optimizer_are_refused_not_ignored():
    model = sequential([3, 4, 1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="lr, amsgrad given with an optimizer"):
        Engine(model, opt, lr=1e-3, amsgrad=False)  # the defaults' values too: the user said them
    with pytest.raises(ValueError, match="betas given with an optimizer"):
        Engine(model, opt, betas=(0.9, 0.99))
    assert Engine(model, opt)._hyper["lr"] == 1e-2
    assert Engine(sequential([3, 4, 1]))._hyper == dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                                                        amsgrad=False, maximize=False, decoupled_weight_decay=False)


def test_optimizer_changes_after_the_engine_is_built_are_followed_or_refused():
    model = sequential([3, 8, 1])
    ref = copy.deepcopy(model)
    opt, ref_opt = torch.optim.Adam(model.parameters(), lr=1e-2), torch.optim.Adam(ref.parameters(), lr=1e-2)
    engine = Engine(model, opt)
    data = batches(6, 8, 3, 1)
    for i, (x, y) in enumerate(data):
        for o in (opt, ref_opt):  # each change the engine has to see, one step each
            g = o.param_groups[0]
            if i == 1:
                g["betas"] = (0.9, 0.9)
            elif i == 2:
                g["eps"] = 1e-3
            elif i == 3:
                g["maximize"] = True
            elif i == 4:
                g["maximize"], g["weight_decay"] = False, 0.1
        engine.step(x, y)
        torch_steps(ref, [(x, y)], ref_opt)
        assert_same_weights(model, ref)
    opt.param_groups[0]["amsgrad"] = True
    with pytest.raises(RuntimeError, match="amsgrad was changed"):
        engine.step(*data[0])
    opt.param_groups[0]["amsgrad"] = False
    engine.step(*data[0])
    # One lr per group (a LambdaLR with a lambda per group) is not something the engine runs.
    model = sequential([3, 8, 1])
    opt = torch.optim.Adam([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=1e-2)
    engine = Engine(model, opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda e: 1.0, lambda e: 0.5 ** e])
    engine.step(*data[0])
    sched.step()
    with pytest.raises(UnsupportedModel, match="parameter groups have different hyperparameters"):
        engine.step(*data[1])


def test_optimizers_whose_step_does_more_are_refused():
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    # The engine does the update itself: a step() override or a step hook would be skipped.
    class Clamped(torch.optim.Adam):
        def step(self, closure=None):
            loss = super().step(closure)
            with torch.no_grad():
                for g in self.param_groups:
                    for p in g["params"]:
                        p.clamp_(-0.05, 0.05)
            return loss

    model = sequential([3, 8, 1])
    with pytest.raises(UnsupportedModel, match="Clamped overrides step"):
        Engine(model, Clamped(model.parameters()))
    opt = torch.optim.Adam(model.parameters())
    engine = Engine(model, opt)
    handle = opt.register_step_post_hook(lambda o, args, kwargs: None)
    with pytest.raises(UnsupportedModel, match="step hooks"):
        engine.step(*batches(1, 8, 3, 1)[0])
    assert "step hooks" in unsupported_reason(model, opt)
    handle.remove()
    handle = register_optimizer_step_pre_hook(lambda o, args, kwargs: None)
    try:
        assert "step hooks" in unsupported_reason(model, opt)
    finally:
        handle.remove()
    assert unsupported_reason(model, opt) is None and unsupported_reason(model, aiaas_fast.optim.AdamW(model.parameters())) is None
    x, y, _ = fit_data(120)
    h = aiaas_fast.fit(model, x, y, epochs=2, batch_size=32, progress=False, optimizer=Clamped(model.parameters(), lr=0.1))
    assert h.engine == "ops" and "overrides step" in h.engine_note
    assert max(p.abs().max().item() for p in model.parameters()) <= 0.05 + 1e-7  # float32 of 0.05


def test_a_step_replaced_on_the_optimizer_is_refused_but_a_scheduler_is_not():
    model = sequential([3, 8, 1])
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # wraps opt.step on the instance
    assert unsupported_reason(model, opt) is None
    engine = Engine(model, opt)
    engine.step(*batches(1, 8, 3, 1)[0])
    sched.step()

    plain_step = opt.step

    def clamped_step(closure=None):
        loss = plain_step(closure)
        with torch.no_grad():
            for p in model.parameters():
                p.clamp_(-0.05, 0.05)
        return loss

    opt.step = clamped_step
    assert "optimizer.step was replaced" in unsupported_reason(model, opt)
    with pytest.raises(UnsupportedModel, match="optimizer.step was replaced"):
        engine.step(*batches(1, 8, 3, 1)[0])  # replaced after the engine was built
    x, y, _ = fit_data(120)
    h = aiaas_fast.fit(model, x, y, epochs=2, batch_size=32, progress=False, optimizer=opt)
    assert h.engine == "ops" and "optimizer.step was replaced" in h.engine_note
    assert max(p.abs().max().item() for p in model.parameters()) <= 0.05 + 1e-7
    opt.step = plain_step  # the scheduler's wrapper again: accepted
    assert unsupported_reason(model, opt) is None
    opt.step = torch.compile(plain_step)  # the same step, compiled
    assert unsupported_reason(model, opt) is None
    opt.step = torch.optim.Adam.step.__get__(opt)  # the bound method
    assert unsupported_reason(model, opt) is None
    del opt.step  # the class's own step
    assert unsupported_reason(model, opt) is None


def test_run_refuses_fractional_rows_and_bad_seeds():
    model = sequential([3, 4, 1])
    engine = Engine(model)
    (x, y), = batches(1, 10, 3, 1)
    with pytest.raises(ValueError, match="rows must be integer row indices, got torch.float32"):
        engine.run(x, y, epochs=1, rows=torch.tensor([0.5, 1.7]))
    with pytest.raises(ValueError, match="seed must be an int in \\[0, 2\\^64\\), got -1"):
        engine.run(x, y, epochs=1, seed=-1)
    assert engine.run(x, y, epochs=1, rows=[3, 1, 2]).shape == (1,)
    assert engine.run(x, y, epochs=1, seed=np.int64(3)).shape == (1,)  # NumPy ints are ints


def test_bad_data_is_a_clear_error():
    engine = Engine(sequential([4, 8, 2]))
    with pytest.raises(RuntimeError, match="x has 5 columns .* but the model takes 4"):
        engine.step(torch.randn(3, 5), torch.randn(3, 2))
    with pytest.raises(RuntimeError, match="y has 1 columns .* but the model gives 2"):
        engine.step(torch.randn(3, 4), torch.randn(3, 1))
    with pytest.raises(RuntimeError, match="x has 3 rows but y has 4"):
        engine.step(torch.randn(3, 4), torch.randn(4, 2))
    with pytest.raises(RuntimeError, match="x must be float32, got Double"):
        engine.step(torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 2))
    with pytest.raises(RuntimeError, match="batch_size must be >= 1"):
        engine.run(torch.randn(3, 4), torch.randn(3, 2), epochs=1, batch_size=0)
    with pytest.raises(RuntimeError, match="sample_index holds row 7 for model 0, but x has 3 rows"):
        engine.run(torch.randn(3, 4), torch.randn(3, 2), epochs=1, rows=torch.tensor([0, 7]))
    with pytest.raises(RuntimeError, match="x has no rows"):
        engine.run(torch.randn(0, 4), torch.randn(0, 2), epochs=1)


def test_a_non_contiguous_batch_is_read_correctly():
    model = sequential([4, 8, 2])
    ref = copy.deepcopy(model)
    x = torch.randn(8, 10)[:, 1:9:2]
    y = torch.randn(2, 8).t()
    assert Engine(model).step(x, y) == pytest.approx(torch_steps(ref, [(x, y)], torch.optim.Adam(ref.parameters()))[0], rel=1e-6)


CHECK_ENGINE = """
import copy, torch, aiaas_fast
from aiaas_fast.engine import Engine
assert aiaas_fast.build_info()['cpu_isa'] == '{isa}'
for path in ('small', 'blas'):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(11, 37), torch.nn.ReLU(), torch.nn.Linear(37, 3))
    r = copy.deepcopy(m)
    e, o = Engine(m, lr=1e-2, path=path), torch.optim.Adam(r.parameters(), lr=1e-2)
    for _ in range(3):
        x, y = torch.randn(45, 11), torch.randn(45, 3)
        l = e.step(x, y)
        o.zero_grad(); lr = torch.nn.functional.mse_loss(r(x), y); lr.backward(); o.step()
        assert abs(l - lr.item()) < 1e-5 * abs(lr.item()) + 1e-6, (path, l, lr.item())
    for p, q in zip(m.parameters(), r.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-6)
# the switch to the BLAS measured for this copy: more than 96 x 128 weights on AVX-512, 64 x 96 else
wide = {{'avx512': ['small', 'small', 'blas', 'small'], 'avx2': ['small', 'blas', 'blas', 'small']}}
paths = Engine(torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 96), torch.nn.Linear(96, 192),
                                   torch.nn.Linear(192, 1))).layer_paths(64)
assert paths == wide.get('{isa}', wide['avx2']), paths
# a batch of several chunks (each lane on one thread): more than 64 x 64 weights on AVX-512, 32 x 64 else
chunked = {{'avx512': ['small', 'small', 'blas', 'small'], 'avx2': ['small', 'blas', 'blas', 'small']}}
paths = Engine(torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 96),
                                   torch.nn.Linear(96, 1))).layer_paths(4096)
assert paths == chunked.get('{isa}', chunked['avx2']), paths
print('ok')
"""


@pytest.mark.parametrize("isa", aiaas_fast.build_info()["cpu_isas"])
def test_every_compiled_engine_kernel_set_is_correct(isa):
    env = {**os.environ, "AIAAS_FAST_CPU_ISA": isa}
    r = subprocess.run([sys.executable, "-c", CHECK_ENGINE.format(isa=isa)], capture_output=True, text=True, env=env)
    if r.returncode != 0 and "does not support it" in r.stderr:
        pytest.skip(f"this CPU has no {isa}")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


# ---------------------------------------------------------------- many models at once
def test_ensemble_forward_and_members_agree():
    ens = aiaas_fast.Ensemble(5, 6, [9, 4], 2)
    x = torch.randn(11, 6)
    out = ens(x)
    assert out.shape == (5, 11, 2)
    for k in range(5):
        torch.testing.assert_close(out[k], ens.member(k)(x), rtol=1e-5, atol=1e-6)
    again = aiaas_fast.Ensemble.from_models([ens.member(k) for k in range(5)])
    torch.testing.assert_close(again(x), out)


def test_ensemble_refuses_models_and_inputs_it_would_compute_wrongly():
    no_relu = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))
    relu_out = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1), nn.ReLU())
    no_bias = nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 1))
    for model, message in [(no_relu, "model 0 has ReLU after layers \\[\\]"),
                           (relu_out, "ReLU after layers \\[0, 1\\]"), (no_bias, "model 0 has a layer without bias")]:
        with pytest.raises(ValueError, match=message):
            aiaas_fast.Ensemble.from_models([model])
    ens = aiaas_fast.Ensemble(3, 4, 8, 1)
    for x, message in [(torch.randn(4), "must be \\(rows, 4\\) or \\(3, rows, 4\\), got shape \\[4\\]"),
                       (torch.randn(5, 6), "got shape \\[5, 6\\]"), (torch.randn(2, 5, 4), "got shape \\[2, 5, 4\\]"),
                       (torch.randn(5, 4, dtype=torch.float64), "x is torch.float64 on cpu, the ensemble torch.float32")]:
        with pytest.raises(ValueError, match=message):
            ens(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # x from an autocast layer: autocast decides
        assert ens(torch.randn(5, 4).bfloat16()).dtype == torch.bfloat16


def test_many_models_on_uneven_rows_give_the_same_bits_on_any_number_of_threads():
    # Enough work for the models to run on the threads, which take them as they free up (the
    # first models have most of the rows): each model's losses and weights must not depend on
    # the thread, or the number of threads, that ran it.
    K, widths = 24, [16, 64, 1]
    g = torch.Generator().manual_seed(4)
    X, Y = torch.randn(400, 16, generator=g), torch.randn(400, 1, generator=g)
    counts = [400 if k < 6 else 40 + 7 * k for k in range(K)]
    index = torch.cat([torch.randint(400, (n,), generator=g) for n in counts])
    offsets = torch.tensor([0] + counts).cumsum(0)
    results, threads = [], torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            torch.manual_seed(0)
            ens = aiaas_fast.Ensemble(K, widths[0], widths[1:-1], widths[-1])
            core, _ = ensemble_engine(ens, lr=1e-2)
            losses = core.run(X, Y, epochs=2, batch_size=32, seed=9, sample_index=index, sample_offsets=offsets)
            results.append((losses, [p.detach().clone() for p in ens.parameters()]))
    finally:
        torch.set_num_threads(threads)
    for losses, params in results[1:]:
        assert torch.equal(losses, results[0][0])
        assert all(torch.equal(p, q) for p, q in zip(params, results[0][1]))


@pytest.mark.parametrize("path", ["small", "blas"])
def test_many_models_each_on_its_own_rows_match_a_loop_of_pytorch_models(path):
    K, widths = 6, [5, 13, 3]
    torch.manual_seed(0)
    ens = aiaas_fast.Ensemble(K, widths[0], widths[1:-1], widths[-1])
    refs = [ens.member(k) for k in range(K)]
    g = torch.Generator().manual_seed(2)
    X, Y = torch.randn(90, 5, generator=g), torch.randn(90, 3, generator=g)
    rows = [torch.randint(90, (n,), generator=g) for n in (30, 31, 17, 45, 8, 30)]  # uneven, with repeats
    core, state = ensemble_engine(ens, lr=1e-2, path=path)
    offsets = torch.tensor([0] + [len(r) for r in rows]).cumsum(0)
    losses = core.run(X, Y, epochs=2, batch_size=8, shuffle=False, sample_index=torch.cat(rows), sample_offsets=offsets)
    assert losses.shape == (2, K)
    for k, ref in enumerate(refs):
        opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
        for epoch in range(2):
            per_batch = [(X[rows[k][i:i + 8]], Y[rows[k][i:i + 8]]) for i in range(0, len(rows[k]), 8)]
            step_losses = torch_steps(ref, per_batch, opt)
            mean = sum(loss * len(b[0]) for loss, b in zip(step_losses, per_batch)) / len(rows[k])
            assert losses[epoch, k].item() == pytest.approx(mean, rel=1e-5), (k, epoch)
        member = ens.member(k)
        assert_same_weights(member, ref)
    assert all(torch.equal(s[2], torch.tensor([8.0, 8, 6, 12, 2, 8])) for s in state)  # per-model step counts


def test_ensemble_step_with_shared_and_per_model_batches():
    K = 4
    ens = aiaas_fast.Ensemble(K, 3, [7], 1)
    refs = [ens.member(k) for k in range(K)]
    core, _ = ensemble_engine(ens, lr=1e-2)
    x, y = torch.randn(12, 3), torch.randn(12, 1)
    xk, yk = torch.randn(K, 12, 3), torch.randn(K, 12, 1)
    l1, l2 = core.step(x, y), core.step(xk, yk)
    for k, ref in enumerate(refs):
        opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
        r1, r2 = torch_steps(ref, [(x, y), (xk[k], yk[k])], opt)
        assert (l1[k].item(), l2[k].item()) == pytest.approx((r1, r2), rel=1e-5)
        assert_same_weights(ens.member(k), ref)
    with pytest.raises(RuntimeError, match="holds 3 models in dim 0 .* but the engine trains 4"):
        core.step(torch.randn(3, 12, 3), y)


def fit_data(n=900, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g) * torch.tensor([1.0, 5.0, 0.2]) + 2
    unit = torch.arange(n) % 3
    y = (x[:, :1] * (unit[:, None] + 1.0) + (x[:, 1:2] / 5).sin() * 3) * 10 + 50 * unit[:, None]
    return x, y, unit


def test_fit_many_deep_ensemble_learns_and_gives_a_spread():
    x, _, _ = fit_data()
    y = (x[:, :1] * 2 + (x[:, 1:2] / 5).sin() * 3) * 10 + 50  # a smooth function of the features alone
    ens = aiaas_fast.Ensemble(6, 3, [24], 1)
    h = aiaas_fast.fit_many(ens, x, y, epochs=15, batch_size=32, lr=3e-3, val_split=0.2, progress=False)
    assert h.train_loss.shape == (15, 6) and h.val_loss.shape == (15, 6)
    assert (h.train_loss[-1] < 0.5 * h.train_loss[0]).all()
    assert len(set(h.rows)) == 1 and h.rows[0] == 720
    pred = aiaas_fast.predict_many(ens, x)
    assert pred.members.shape == (6, 900, 1) and pred.mean.shape == (900, 1)
    assert (pred.std > 0).all()  # bootstrap samples and inits differ
    torch.testing.assert_close(pred.mean, pred.members.mean(0))
    assert h.val_rmse.shape == (6,) and (h.val_rmse < y.std()).all()


def test_fit_many_with_groups_trains_one_model_per_group():
    x, y, unit = fit_data()
    labels = [["north", "south", "west"][u] for u in unit.tolist()]
    ens = aiaas_fast.Ensemble(3, 3, [24], 1)
    h = aiaas_fast.fit_many(ens, x, y, groups=labels, epochs=20, batch_size=16, lr=3e-3, val_split=0.2, progress=False)
    assert h.group_values == ["north", "south", "west"] and h.rows == [240, 240, 240]
    pred = aiaas_fast.predict_many(ens, x, groups=labels)
    assert pred.shape == (900, 1)
    for k in range(3):  # each group's own model and scalers: errors far below the groups' spread
        rows = unit == k
        assert (pred[rows] - y[rows]).pow(2).mean().sqrt() < 0.5 * y[rows].std()
    with pytest.raises(ValueError, match="row 1 has group 'east', for which no model was trained"):
        aiaas_fast.predict_many(ens, x[:2], groups=["north", "east"])
    with pytest.raises(ValueError, match="pass groups="):
        aiaas_fast.predict_many(ens, x)
    with pytest.raises(ValueError, match="groups has 3 distinct values but the ensemble has 2 models"):
        aiaas_fast.fit_many(aiaas_fast.Ensemble(2, 3, [4], 1), x, y, groups=labels, progress=False)


def test_fit_many_patience_keeps_each_models_best_weights_and_stops():
    x, _, _ = fit_data(400)
    y = (x[:, :1] * 2 + (x[:, 1:2] / 5).sin() * 3) * 10 + 50
    torch.manual_seed(0)
    ens = aiaas_fast.Ensemble(4, 3, [16], 1)
    h = aiaas_fast.fit_many(ens, x, y, epochs=200, batch_size=16, lr=3e-2, val_split=0.25, patience=3, progress=False)
    assert h.stopped_early and len(h) < 200 and len(h.best_epoch) == 4
    assert all(len(h) - 1 - b >= 3 for b in h.best_epoch)  # every model had stalled for 3 epochs
    best_val = torch.stack([h.val_loss[b, k] for k, b in enumerate(h.best_epoch)])
    assert torch.equal(best_val, h.val_loss.min(0).values)
    # The kept weights are the best epoch's: the final scoring (val_rmse, in y's units, with the
    # weights left in the ensemble) is that epoch's validation loss, unstandardised.
    y_std = ens.aiaas_fast_scalers["y"].std[:, 0].double()
    torch.testing.assert_close(h.val_rmse, best_val.sqrt() * y_std, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="invalid patience=0"):
        aiaas_fast.fit_many(ens, x, y, patience=0)


def test_fit_many_is_deterministic_for_a_seed():
    x, y, _ = fit_data(300)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        ens = aiaas_fast.Ensemble(3, 3, [8], 1)
        runs.append(aiaas_fast.fit_many(ens, x, y, epochs=3, seed=4, progress=False).train_loss)
    assert torch.equal(runs[0], runs[1])


# ---------------------------------------------------------------- fit(engine=...)
def fit_model(seed=0):
    torch.manual_seed(seed)
    return aiaas_fast.nn.MLP(3, [16, 16], 1)


def test_fit_compiled_equals_op_by_op():
    x, y, _ = fit_data(500)
    a, b = fit_model(), fit_model()
    ha = aiaas_fast.fit(a, x, y, epochs=4, batch_size=32, engine="compiled", progress=False)
    hb = aiaas_fast.fit(b, x, y, epochs=4, batch_size=32, engine="ops", progress=False)
    assert (ha.engine, hb.engine) == ("compiled", "ops")
    assert ha["train_loss"] == pytest.approx(hb["train_loss"], rel=1e-5)
    assert ha["val_loss"] == pytest.approx(hb["val_loss"], rel=1e-5)
    assert_same_weights(a, b, atol=1e-5)


def test_fit_auto_uses_the_engine_and_falls_back_with_the_reason():
    x, y, _ = fit_data(200)
    h = aiaas_fast.fit(fit_model(), x, y, epochs=1, progress=False)
    assert h.engine == "compiled" and h.engine_note == "the C++ training engine"
    h = aiaas_fast.fit(fit_model(), x, y, epochs=1, progress=False, loss_fn=nn.L1Loss())
    assert h.engine == "ops" and "L1Loss" in h.engine_note
    with pytest.raises(ValueError, match="engine='compiled' cannot train this model: .*SGD"):
        m = fit_model()
        aiaas_fast.fit(m, x, y, epochs=1, engine="compiled", optimizer=torch.optim.SGD(m.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="engine must be 'auto', 'compiled' or 'ops'"):
        aiaas_fast.fit(fit_model(), x, y, engine="fast")


def test_fit_compiled_resumes_from_a_checkpoint_exactly(tmp_path):
    x, y, _ = fit_data(300)
    ckpt = str(tmp_path / "run.pt")
    whole = fit_model()
    h_whole = aiaas_fast.fit(whole, x, y, epochs=4, engine="compiled", progress=False)
    part = fit_model()
    aiaas_fast.fit(part, x, y, epochs=2, engine="compiled", checkpoint=ckpt, progress=False)
    h = aiaas_fast.fit(part, x, y, epochs=4, engine="compiled", checkpoint=ckpt, resume=True, progress=False)
    assert h["train_loss"] == h_whole["train_loss"]
    for p, q in zip(part.parameters(), whole.parameters()):
        assert torch.equal(p, q)


def test_auto_path_picks_hand_kernels_for_narrow_layers_and_blas_for_wide_ones():
    assert Engine(sequential([10, 20, 1])).layer_paths(64) == ["small", "small"]
    assert Engine(sequential([64, 256, 256, 1])).layer_paths(512) == ["blas", "blas", "small"]
    # A batch of several chunks, each lane on one thread, goes to the BLAS sooner (see also
    # test_every_compiled_engine_kernel_set_is_correct for every instruction set's points).
    assert Engine(sequential([40, 128, 8, 1])).layer_paths(4096) == ["blas", "small", "small"]
    assert Engine(sequential([40, 128, 8, 1])).layer_paths(1024) == ["small", "small", "small"]


def test_concurrent_calls_on_one_engine_are_serialised():
    # Two threads step the same engine with the GIL released: the calls must not share the
    # workspace at the same time, so the result equals 2 x 30 steps in some order.
    model = sequential([6, 32, 1])
    engine = Engine(model, lr=0.0)  # lr 0: the weights stay, so every step's loss is the same
    x, y = torch.randn(40, 6), torch.randn(40, 1)
    expected = engine.step(x, y)
    losses = []

    def work():
        for _ in range(30):
            losses.append(engine.step(x, y))

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(losses) == 60 and all(v == expected for v in losses)


def test_replaced_parameters_are_refused_not_trained_silently():
    model = sequential([3, 8, 1])
    engine = Engine(model)
    model.load_state_dict(sequential([3, 8, 1], seed=1).state_dict())  # in place: fine
    engine.run(torch.randn(10, 3), torch.randn(10, 1), epochs=1)
    model.load_state_dict(sequential([3, 8, 1], seed=2).state_dict(), assign=True)  # new tensors
    with pytest.raises(RuntimeError, match="parameter tensors were replaced"):
        engine.run(torch.randn(10, 3), torch.randn(10, 1), epochs=1)
    engine = Engine(model)
    model[0].weight.data = torch.randn(8, 3)  # same Parameter, new storage
    with pytest.raises(RuntimeError, match="storage was replaced"):
        engine.predict(torch.randn(10, 3))


@pytest.mark.parametrize("change,message", [
    (lambda m: m.load_state_dict(sequential([3, 8, 1], seed=2).state_dict(), assign=True), "were replaced"),
    (lambda m: m.__setitem__(0, nn.Linear(3, 8)), "were replaced"),
    (lambda m: m.append(nn.Linear(1, 1)), "were replaced"),
    (lambda m: m.__setitem__(1, nn.Tanh()), "Tanh is not a layer"),
    (lambda m: m[0].register_forward_hook(lambda mod, a, out: out * 2), "forward hooks"),
    (lambda m: nn.modules.module.register_module_forward_hook(lambda mod, a, out: out), "global module hooks"),
    (lambda m: m[2].bias.requires_grad_(False), "frozen parameter"),
    (lambda m: setattr(m[2], "bias", None), "were replaced"),
])
def test_model_changes_after_the_engine_is_built_are_seen_by_predict_and_run(change, message):
    # predict() and run() check the model cheaply (what mlp_layers looks at, unchanged), and
    # fully when anything changed: each change here must still be refused with its reason.
    model = sequential([3, 8, 1])
    engine = Engine(model)
    x, y = torch.randn(10, 3), torch.randn(10, 1)
    torch.testing.assert_close(engine.predict(x), model(x).detach())
    handle = change(model)
    try:
        for call in (lambda: engine.predict(x), lambda: engine.run(x, y, epochs=1)):
            with pytest.raises((RuntimeError, ValueError), match=message):
                call()
    finally:
        if hasattr(handle, "remove"):
            handle.remove()
    if hasattr(handle, "remove"):  # a hook removed again: the model is as built
        torch.testing.assert_close(engine.predict(x), model(x).detach())


def test_resized_or_reallocated_tensors_are_refused_at_every_call():
    # The kernels write through raw pointers sized at construction: a tensor resized since
    # would be written out of bounds (heap corruption before this check).
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    for change in (lambda m, o: setattr(m[0].weight, "data", torch.randn(2, 3)),
                   lambda m, o: setattr(m[2].bias, "data", torch.empty(0)),
                   lambda m, o: m[0].weight.set_(torch.randn(2, 3)),
                   lambda m, o: o.state[m[0].weight]["exp_avg"].resize_(4)):
        model = sequential([3, 8, 1])
        opt = torch.optim.Adam(model.parameters())
        engine = Engine(model, opt)
        engine.step(x, y)
        with torch.no_grad():
            change(model, opt)
        for call in (lambda: engine.step(x, y), lambda: engine._core.predict(x),
                     lambda: engine._core.run(x, y, epochs=1, batch_size=4)):
            with pytest.raises(RuntimeError, match="was resized or given other storage after the engine was built"):
                call()


def test_the_native_engine_refuses_tensors_that_share_memory():
    # Each would get two updates a step (a step counter shared by every parameter: steps 1-4).
    w, b = torch.randn(4, 3), torch.randn(4)
    zeros = lambda: [torch.zeros(4, 3), torch.zeros(4), torch.zeros(4, 4), torch.zeros(4)]
    steps = lambda: [torch.tensor(0.0) for _ in range(4)]
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
                 decoupled_weight_decay=False)
    w2 = torch.randn(4, 4)
    with pytest.raises(RuntimeError, match="share memory"):  # one weight for two layers
        aiaas_fast._C.MLPEngine([w, w2, w2], [b, None, None], [True, True, False],
                                [torch.zeros(4, 3), torch.zeros(4), torch.zeros(4, 4), torch.zeros(4, 4)],
                                [torch.zeros(4, 3), torch.zeros(4), torch.zeros(4, 4), torch.zeros(4, 4)], [],
                                [torch.tensor(0.0) for _ in range(4)], **hyper)
    w2 = torch.randn(4, 4)
    one_step = torch.tensor(0.0)
    with pytest.raises(RuntimeError, match="share memory"):
        aiaas_fast._C.MLPEngine([w, w2], [b, b.clone()], [True, False], zeros(), zeros(), [], [one_step] * 4, **hyper)
    state = zeros()
    state[0] = w  # a moment that is its parameter
    with pytest.raises(RuntimeError, match="exp_avgs\\[0\\] \\(layer 0 weight\\) share memory|layer 0 weight and exp_avgs"):
        aiaas_fast._C.MLPEngine([w, w2], [b, b.clone()], [True, False], state, zeros(), [], steps(), **hyper)
    aiaas_fast._C.MLPEngine([w, w2], [b, b.clone()], [True, False], zeros(), zeros(), [], steps(), **hyper)


def test_a_batch_larger_than_the_data_is_one_batch_of_all_rows():
    # The buffers follow the rows, not the number asked for (2**62 crashed; 1e8 ran out of memory).
    x, y, _ = fit_data(120)
    runs = []
    for batch in (96, 10**8, 2**62):
        model = sequential([x.shape[1], 8, 1])
        runs.append(aiaas_fast.fit(model, x, y, epochs=2, batch_size=batch, val_split=0.2, progress=False)["train_loss"])
    assert runs[0] == runs[1] == runs[2]  # 96 training rows: one batch each epoch


def test_a_run_stopped_by_an_exception_still_tells_autograd_the_weights_changed():
    model = sequential([3, 8, 1])
    engine = Engine(model)
    w = model[0].weight
    out = (w * w).sum()

    def stop(*args):
        raise ValueError("stop here")

    with pytest.raises(ValueError, match="stop here"):
        engine.run(torch.randn(32, 3), torch.randn(32, 1), epochs=2, batch_size=8, callback=stop, callback_every=1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_captured_graphs_keep_every_tensor_they_read_alive():
    # A CUDA graph keeps addresses, not tensors: every static tensor a captured body reads or
    # writes must live as long as its replay, or the next allocation takes its memory. The
    # recording is faked here by a graph that, like torch.cuda.CUDAGraph, holds no reference.
    import gc
    import weakref

    from aiaas_fast.engine_cuda import CudaGraphEngine
    from aiaas_fast.ensemble_cuda import CudaEnsembleEngine

    refs = []

    class NoReferenceGraph:
        def replay(self):
            pass

    def record(self, body):
        body()
        out = body()
        cells = [c.cell_contents for c in body.__closure__ or ()] + list(body.__defaults__ or ())
        refs.extend(weakref.ref(t) for t in cells if isinstance(t, torch.Tensor))
        return NoReferenceGraph(), out

    class Single(CudaGraphEngine):
        _record = record

    class Many(CudaEnsembleEngine):
        _record = record

    model = sequential([5, 12, 1])
    engine = Engine(model, lr=1e-2)
    core = Single(mlp_layers(model), list(model.parameters()), engine.state, engine._hyper, path="graph")
    core.run(torch.randn(50, 5), torch.randn(50, 1), epochs=1, batch_size=16, seed=0, shuffle=True)
    core.step(torch.randn(8, 5), torch.randn(8, 1))
    ens = aiaas_fast.Ensemble(3, 4, [8], 1)
    many = Many(list(ens.weights), list(ens.biases), lr=1e-2)
    many.step(torch.randn(6, 4), torch.randn(6, 1))
    many.run(torch.randn(20, 4), torch.randn(20, 1), epochs=1, batch_size=8)
    gc.collect()
    assert len(refs) > 10 and all(r() is not None for r in refs)


def test_run_shuffles_anew_every_epoch():
    # With lr = 0 the weights stay put, so each step's batch loss (from the epoch's running
    # mean the callback gets) tells which rows the batch holds: every epoch covers all rows
    # (the same epoch loss) but in another order than the epoch before.
    X, Y = torch.randn(120, 4), torch.randn(120, 1)
    running = {}
    engine = Engine(sequential([4, 8, 1]), lr=0.0)
    losses = engine.run(X, Y, epochs=3, batch_size=10, seed=2, callback_every=1,
                        callback=lambda e, s, n, end, loss: running.setdefault(e, []).append(loss) and False)
    assert losses.tolist() == pytest.approx([losses[0].item()] * 3, rel=1e-5)
    batch_losses = {e: [(s + 1) * m - s * prev for s, (m, prev) in enumerate(zip(r, [0.0] + r))]
                    for e, r in running.items()}
    assert sorted(batch_losses) == [0, 1, 2] and all(len(b) == 12 for b in batch_losses.values())
    for a, b in [(0, 1), (1, 2)]:
        assert batch_losses[a] != pytest.approx(batch_losses[b], rel=1e-3), f"epochs {a} and {b} in the same order"


def test_a_callback_stops_the_run_in_the_middle_of_an_epoch():
    # True from the callback at step 9 of 10 (the last one before the epoch's end): no further
    # step, no further callback, and the epoch's loss is over the rows seen; the weights are
    # those of 9 plain PyTorch steps.
    X, Y = torch.randn(100, 4), torch.randn(100, 1)
    model = sequential([4, 8, 1])
    ref = copy.deepcopy(model)
    calls = []
    losses = Engine(model, lr=1e-2).run(X, Y, epochs=3, batch_size=10, shuffle=False, callback_every=1,
                                        callback=lambda e, s, n, end, loss: calls.append((e, s)) or s == 9)
    assert calls == [(0, s) for s in range(1, 10)]
    expected = torch_steps(ref, [(X[i:i + 10], Y[i:i + 10]) for i in range(0, 90, 10)],
                           torch.optim.Adam(ref.parameters(), lr=1e-2))
    assert losses.tolist() == pytest.approx([sum(expected) / 9], rel=1e-5)
    assert_same_weights(model, ref)


def test_fit_many_bootstrap_gives_each_member_its_own_sample():
    # Members that start from the same weights and take one batch of all their rows per epoch
    # (the order within it does not matter beyond rounding) end up apart only through their
    # data: each bootstrap member trains on its own sample, without bootstrap all on the same rows.
    x, _, _ = fit_data(120)
    y = x[:, :1] * 2 + x[:, 1:2].sin()
    base = sequential([3, 8, 1])
    spread = {}
    for bootstrap in (True, False):
        ens = aiaas_fast.Ensemble.from_models([copy.deepcopy(base) for _ in range(4)])
        aiaas_fast.fit_many(ens, x, y, bootstrap=bootstrap, epochs=5, batch_size=1000, lr=1e-2, progress=False)
        w = ens.weights[0].detach()
        spread[bootstrap] = (w[1:] - w[0]).abs().amax(dim=(1, 2))
    assert (spread[False] < 1e-5).all(), spread[False]
    assert (spread[True] > 1e-3).all(), spread[True]


def test_predict_many_refuses_inputs_of_the_wrong_width():
    x, y, _ = fit_data(100)
    ens = aiaas_fast.Ensemble(3, 3, [8], 1)
    aiaas_fast.fit_many(ens, x, y, epochs=1, progress=False)
    for bad, width in ((x[:, :1], 1), (x[:, :2], 2), (x[:, 0], 1)):
        with pytest.raises(ValueError, match=f"predict_many: X has {width} column\\(s\\).*models take 3 feature"):
            aiaas_fast.predict_many(ens, bad)
    with pytest.raises(ValueError, match="for one row pass shape \\(1, 3\\)"):
        aiaas_fast.predict_many(ens, x[0])
    plain = aiaas_fast.Ensemble(3, 3, [8], 1)  # not fitted: no scalers, the same check
    with pytest.raises(ValueError, match="X has 2 column"):
        aiaas_fast.predict_many(plain, x[:, :2])


def test_predict_many_mean_and_spread_are_over_the_members():
    x, _, _ = fit_data(200)
    y = torch.cat([x[:, :1] * 2, x[:, 1:2].cos()], 1)
    ens = aiaas_fast.Ensemble(5, 3, [8], 2)
    aiaas_fast.fit_many(ens, x, y, epochs=2, progress=False)
    pred = aiaas_fast.predict_many(ens, x[:50])
    torch.testing.assert_close(pred.mean, pred.members.mean(0))
    torch.testing.assert_close(pred.std, pred.members.std(0, unbiased=False))  # the members' (population) spread
