"""Many models at once on CUDA (aiaas_fast.ensemble_cuda: batched products in CUDA graphs)
against a loop of plain PyTorch models: same initial weights and same batches give the same
losses and weights, with uneven rows per model, partial batches and models sitting steps out.

On the CPU the engine runs with its graph capture replaced by eager calls (the engine's
logic: buffers, masks, orders, Adam, the warm-up restore); on a GPU, for real."""
import pytest
import torch

import aiaas_fast
from aiaas_fast.ensemble import ensemble_engine
from aiaas_fast.ensemble_cuda import CudaEnsembleEngine
from helpers import torch_steps

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class EagerReplay(CudaEnsembleEngine):
    """The engine with its capture swapped for a replay that runs the body eagerly."""

    def _capture(self, body):
        body()  # the warm-up that capture does, which must not train
        out = body()  # the captured call's output buffer, refilled by each replay
        holder = {"out": out}

        def replay():
            holder["out"].copy_(body())
        return replay, out


def engine_on(ens, device, **hyper):
    if device == "cpu":
        return EagerReplay(list(ens.weights), list(ens.biases), **{"lr": 1e-2, **hyper})
    core, _ = ensemble_engine(ens, lr=hyper.pop("lr", 1e-2))
    if hyper:
        core.set_hyperparameters(**{**core.hyper, **hyper})
    return core


def uneven_rows(n, counts, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(n, (c,), generator=g) for c in counts]  # with repeats, as a bootstrap sample


def loop_reference(ens, X, Y, rows, epochs, batch, orders=None, opt=torch.optim.Adam, **hyper):
    """Per model: plain PyTorch over its rows in order (or per epoch, orders[epoch][k]); returns
    (per-epoch mean losses (epochs, K), the trained members)."""
    refs = [ens.member(k) for k in range(ens.num_models)]
    opts = [opt(r.parameters(), **{"lr": 1e-2, **hyper}) for r in refs]
    out = torch.zeros(epochs, ens.num_models, dtype=torch.float64)
    for k, (ref, o) in enumerate(zip(refs, opts)):
        for e in range(epochs):
            r = rows[k] if orders is None else orders[e][k]
            per_batch = [(X[r[i:i + batch]], Y[r[i:i + batch]]) for i in range(0, len(r), batch)]
            step_losses = torch_steps(ref, per_batch, o)
            out[e, k] = sum(v * len(b[0]) for v, b in zip(step_losses, per_batch)) / len(r)
    return out, refs


def assert_members_match(ens, refs, atol):
    for k, ref in enumerate(refs):
        for (name, p), q in zip(ens.member(k).named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=atol, msg=f"model {k}, {name}")


def check_uneven_rows_against_a_loop(device, atol, rtol=1e-5):
    K, widths = 6, [5, 13, 7, 3]
    torch.manual_seed(0)
    ens = aiaas_fast.Ensemble(K, widths[0], widths[1:-1], widths[-1], device=device)
    X, Y = torch.randn(90, 5, device=device), torch.randn(90, 3, device=device)
    rows = [r.to(device) for r in uneven_rows(90, (30, 31, 17, 45, 8, 30))]
    expected, refs = loop_reference(ens, X, Y, rows, epochs=2, batch=8)
    core = engine_on(ens, device)
    offsets = torch.tensor([0] + [len(r) for r in rows]).cumsum(0)
    losses = core.run(X, Y, epochs=2, batch_size=8, shuffle=False, sample_index=torch.cat(rows).cpu(),
                      sample_offsets=offsets)
    torch.testing.assert_close(losses, expected, rtol=rtol, atol=1e-7)
    assert_members_match(ens, refs, atol)
    # Per-model step counts: a model with fewer rows sat the later steps out.
    assert torch.equal(core.steps.cpu(), torch.tensor([8.0, 8, 6, 12, 2, 8]))


def test_uneven_rows_match_a_loop_of_pytorch_models():
    check_uneven_rows_against_a_loop("cpu", atol=2e-6)


def test_same_batches_as_the_cpu_engine():
    # Without shuffling, the C++ engine and this one see the same batches: same results.
    K = 4
    torch.manual_seed(1)
    a = aiaas_fast.Ensemble(K, 3, [9], 2)
    b = aiaas_fast.Ensemble.from_models([a.member(k) for k in range(K)])
    X, Y = torch.randn(40, 3), torch.randn(40, 2)
    rows = uneven_rows(40, (12, 40, 5, 21))
    kw = dict(epochs=3, batch_size=8, shuffle=False, sample_index=torch.cat(rows),
              sample_offsets=torch.tensor([0] + [len(r) for r in rows]).cumsum(0))
    cpu_core, cpu_state = ensemble_engine(a, lr=1e-2)
    core = engine_on(b, "cpu")
    torch.testing.assert_close(core.run(X, Y, **kw), cpu_core.run(X, Y, **kw), rtol=1e-5, atol=1e-7)
    for p, q in zip(b.parameters(), a.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=2e-6)
    assert torch.equal(core.steps, cpu_state[0][2])


def test_shuffled_runs_use_each_models_rows_and_stop_and_reuse_the_graph():
    K = 3
    torch.manual_seed(2)
    ens = aiaas_fast.Ensemble(K, 4, [6], 1)
    X, Y = torch.randn(50, 4), torch.randn(50, 1)
    rows = uneven_rows(50, (20, 9, 33), seed=5)
    kw = dict(batch_size=8, seed=7, sample_index=torch.cat(rows),
              sample_offsets=torch.tensor([0] + [len(r) for r in rows]).cumsum(0))
    core = engine_on(ens, "cpu")
    # The orders the run will draw: from a generator seeded the same, epoch by epoch.
    table, counts = core._rows(50, kw["sample_index"], kw["sample_offsets"])
    gen = torch.Generator().manual_seed(7)
    orders = []
    for _ in range(2):
        o = core.epoch_orders(table, counts, gen)
        orders.append([o[k, :len(rows[k])] for k in range(K)])
        for k in range(K):  # a permutation of the model's own rows
            assert torch.equal(orders[-1][k].sort().values, rows[k].sort().values)
    assert not torch.equal(orders[0][0], orders[1][0])  # a new order each epoch
    expected, refs = loop_reference(ens, X, Y, rows, epochs=2, batch=8, orders=orders)
    losses = core.run(X, Y, epochs=2, **kw)
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-7)
    assert_members_match(ens, refs, atol=2e-6)
    graph = core._run_entry
    # Same data again: the graph is reused; the callback sees NaN-free partial means and stops.
    seen = []

    def stop_after_two(epoch, step, steps, end, so_far):
        seen.append((epoch, step, steps, end))
        assert len(so_far) == K and all(v == v for v in so_far)
        return step == 2
    stopped = core.run(X, Y, epochs=3, callback_every=1, callback=stop_after_two, **kw)
    assert core._run_entry is graph and seen == [(0, 1, 5, False), (0, 2, 5, False)] and stopped.shape == (1, K)
    # A new learning rate is a write to a device scalar: the same graph, steps at the new rate.
    before = [p.detach().clone() for p in ens.parameters()]
    core.set_hyperparameters(**dict(core.hyper, lr=0.0))
    core.run(X, Y, epochs=1, **kw)
    assert core._run_entry is graph and all(torch.equal(p, q) for p, q in zip(ens.parameters(), before))
    core.set_hyperparameters(**dict(core.hyper, lr=5e-3, beta2=0.99))
    core.run(X, Y, epochs=1, **kw)
    assert core._run_entry is not graph  # betas are baked into the captured launches: a new graph


@pytest.mark.parametrize("hyper,opt", [
    (dict(weight_decay=0.1), torch.optim.Adam),
    (dict(weight_decay=0.1, decoupled_weight_decay=True), torch.optim.AdamW),
    (dict(maximize=True), torch.optim.Adam),
])
def test_step_with_shared_and_per_model_batches_and_each_adam_variant(hyper, opt):
    K = 4
    torch.manual_seed(3)
    ens = aiaas_fast.Ensemble(K, 3, [7, 5], 2)
    refs = [ens.member(k) for k in range(K)]
    core = engine_on(ens, "cpu", **hyper)
    x, y = torch.randn(12, 3), torch.randn(12, 2)
    xk, yk = torch.randn(K, 12, 3), torch.randn(K, 12, 2)
    l1, l2 = core.step(x, y), core.step(xk, yk)
    ref_hyper = {k: v for k, v in hyper.items() if k != "decoupled_weight_decay"}
    for k, ref in enumerate(refs):
        r1, r2 = torch_steps(ref, [(x, y), (xk[k], yk[k])], opt(ref.parameters(), lr=1e-2, **ref_hyper))
        assert (l1[k].item(), l2[k].item()) == pytest.approx((r1, r2), rel=1e-5)
    assert_members_match(ens, refs, atol=2e-6)
    assert l1.dtype == torch.float64 and l1.shape == (K,)


def test_warm_up_does_not_train_and_predict_matches_forward():
    torch.manual_seed(4)
    ens = aiaas_fast.Ensemble(5, 3, [8], 2)
    before = [p.detach().clone() for p in ens.parameters()]
    core = engine_on(ens, "cpu")
    assert core.run(torch.randn(30, 3), torch.randn(30, 2), epochs=0, batch_size=8).shape == (0, 5)
    assert all(torch.equal(p, q) for p, q in zip(ens.parameters(), before))
    assert core.steps.abs().sum() == 0 and core.exp_avg.abs().sum() == 0
    x = torch.randn(21, 3)
    torch.testing.assert_close(core.predict(x), ens(x))


def test_bad_input_gets_a_clear_error():
    ens = aiaas_fast.Ensemble(3, 4, [5], 1)
    core = engine_on(ens, "cpu")
    x, y = torch.randn(10, 4), torch.randn(10, 1)
    with pytest.raises(RuntimeError, match="holds 2 models in dim 0 .* but the engine trains 3"):
        core.step(torch.randn(2, 10, 4), y)
    with pytest.raises(RuntimeError, match="x has 5 columns .* but the model takes 4"):
        core.run(torch.randn(10, 5), y, epochs=1, batch_size=4)
    with pytest.raises(RuntimeError, match="must be float32, got torch.float64"):
        core.run(x.double(), y, epochs=1, batch_size=4)
    with pytest.raises(RuntimeError, match="x has 10 rows but y has 9"):
        core.run(x, y[:9], epochs=1, batch_size=4)
    with pytest.raises(RuntimeError, match="model 1 has no rows"):
        core.run(x, y, epochs=1, batch_size=4, sample_index=torch.tensor([0, 1]), sample_offsets=torch.tensor([0, 1, 1, 2]))
    with pytest.raises(RuntimeError, match="sample_index holds row 10 for model 2, but x has 10 rows"):
        core.run(x, y, epochs=1, batch_size=4, sample_index=torch.tensor([0, 1, 10]),
                 sample_offsets=torch.tensor([0, 1, 2, 3]))
    with pytest.raises(RuntimeError, match="batch_size must be an int >= 1"):
        core.run(x, y, epochs=1, batch_size=0)
    with pytest.raises(ValueError, match="amsgrad is not supported"):
        core.set_hyperparameters(**dict(core.hyper, amsgrad=True))
    with pytest.raises(ValueError, match="invalid lr=-1"):
        core.set_hyperparameters(**dict(core.hyper, lr=-1))


def test_fit_many_through_this_engine(monkeypatch):
    # fit_many's device plumbing (rows, callback, validation, patience, predict) with this
    # engine in place of the C++ one, on the CPU: the same code path as on a GPU.
    import aiaas_fast.ensemble as ensemble_mod

    used = []

    def this_engine(ens, *, lr=1e-3, weight_decay=0.0, path="auto"):
        used.append(ens)
        core = EagerReplay(list(ens.weights), list(ens.biases), lr=lr, weight_decay=weight_decay)
        return core, core.state
    monkeypatch.setattr(ensemble_mod, "ensemble_engine", this_engine)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 3, generator=g) * torch.tensor([1.0, 5.0, 0.2]) + 2
    unit = torch.arange(600) % 3
    y = (x[:, :1] * (unit[:, None] + 1.0) + (x[:, 1:2] / 5).sin() * 3) * 10 + 50 * unit[:, None]
    torch.manual_seed(0)
    ens = aiaas_fast.Ensemble(3, 3, [24], 1)
    h = aiaas_fast.fit_many(ens, x, y, groups=unit.tolist(), epochs=40, batch_size=16, lr=1e-2, val_split=0.2,
                            patience=5, progress=False)
    assert used == [ens] and h.rows == [160, 160, 160] and h.val_loss.shape[1] == 3
    pred = aiaas_fast.predict_many(ens, x, groups=unit.tolist())
    for k in range(3):
        rows = unit == k
        assert (pred[rows] - y[rows]).pow(2).mean().sqrt() < 0.5 * y[rows].std()
    best_val = torch.stack([h.val_loss[b, k] for k, b in enumerate(h.best_epoch)])
    torch.testing.assert_close(best_val, h.val_loss.min(0).values)


# ---------------------------------------------------------------- on a GPU
@cuda_only
@pytest.mark.gpu
@pytest.mark.usefixtures("ieee_float32")
def test_on_cuda_uneven_rows_match_a_loop_of_pytorch_models():
    # Tolerances as for the single-model CUDA engine (tests/test_engine_cuda.py): Adam divides
    # by sqrt(v), so rounding differences between cuBLAS's bmm and mm orders grow near zero gradients.
    check_uneven_rows_against_a_loop("cuda", atol=1e-4, rtol=1e-4)


@cuda_only
@pytest.mark.gpu
@pytest.mark.usefixtures("ieee_float32")
def test_on_cuda_shuffled_runs_are_deterministic_and_step_losses_are_the_models_losses():
    torch.manual_seed(5)
    ens = aiaas_fast.Ensemble(16, 10, [20], 1, device="cuda")
    twin = aiaas_fast.Ensemble.from_models([ens.member(k) for k in range(16)])
    X, Y = torch.randn(300, 10, device="cuda"), torch.randn(300, 1, device="cuda")
    a, _ = ensemble_engine(ens, lr=1e-2)
    b, _ = ensemble_engine(twin, lr=1e-2)
    assert torch.equal(a.run(X, Y, epochs=2, batch_size=64, seed=3), b.run(X, Y, epochs=2, batch_size=64, seed=3))
    assert all(torch.equal(p, q) for p, q in zip(ens.parameters(), twin.parameters()))  # same bits
    xk, yk = torch.randn(16, 33, 10, device="cuda"), torch.randn(16, 33, 1, device="cuda")
    with torch.no_grad():
        expected = ((ens(xk) - yk) ** 2).mean(dim=(1, 2)).double().cpu()  # before the step's update
    torch.testing.assert_close(a.step(xk, yk), expected, rtol=1e-5, atol=1e-7)


@cuda_only
@pytest.mark.gpu
def test_fit_many_on_cuda_with_groups():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(900, 3, generator=g) * torch.tensor([1.0, 5.0, 0.2]) + 2
    unit = torch.arange(900) % 3
    y = (x[:, :1] * (unit[:, None] + 1.0) + (x[:, 1:2] / 5).sin() * 3) * 10 + 50 * unit[:, None]
    ens = aiaas_fast.Ensemble(3, 3, [24], 1, device="cuda")
    h = aiaas_fast.fit_many(ens, x, y, groups=unit.tolist(), epochs=20, batch_size=16, lr=3e-3, val_split=0.2,
                            progress=False)
    assert "CUDA graphs" in h.engine_note and h.rows == [240, 240, 240]
    pred = aiaas_fast.predict_many(ens, x, groups=unit.tolist())
    for k in range(3):
        rows = unit == k
        assert (pred[rows] - y[rows]).pow(2).mean().sqrt() < 0.5 * y[rows].std()


@cuda_only
@pytest.mark.gpu
@pytest.mark.usefixtures("ieee_float32")
def test_on_cuda_runs_with_data_on_the_cpu_reuse_their_graph():
    # Data from the CPU goes into a buffer kept between calls: a second run() of the same
    # shape replays the graph (its address is the graph's), on the new values.
    torch.manual_seed(6)
    ens = aiaas_fast.Ensemble(4, 6, [12], 1, device="cuda")
    twin = aiaas_fast.Ensemble.from_models([ens.member(k) for k in range(4)])
    a, _ = ensemble_engine(ens, lr=1e-2)
    b, _ = ensemble_engine(twin, lr=1e-2)
    for call in range(2):
        X, Y = torch.randn(70, 6), torch.randn(70, 1)
        from_cpu = a.run(X, Y, epochs=1, batch_size=16, seed=call)
        if call == 0:
            entry = a._run_entry
        assert a._run_entry is entry
        torch.testing.assert_close(from_cpu, b.run(X.cuda(), Y.cuda(), epochs=1, batch_size=16, seed=call))
    assert all(torch.equal(p, q) for p, q in zip(ens.parameters(), twin.parameters()))
