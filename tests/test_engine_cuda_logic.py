"""The CUDA training engine's logic (aiaas_fast.engine_cuda) on the CPU, with its graph
capture swapped for eager replays: the step and run bodies, the static buffers, the
warm-up's restore, the optimizer state it shares, the learning rate through a device
scalar, graph reuse and recapture, against plain PyTorch. The fused path runs the fused
MLP kernel in Triton's interpreter. On a GPU the same engine runs for real, captured, in
tests/test_engine_cuda.py."""
import copy

import pytest
import torch

from aiaas_fast._tf32 import cuda_matmul_allows_tf32
from aiaas_fast.engine import Engine, UnsupportedModel, _optimizer_hyper, mlp_layers
from aiaas_fast.engine_cuda import CudaGraphEngine
from helpers import needs_triton_interpreter, sequential, torch_steps, triton_interpreter_reason

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine runs the engine for real "
                                "(tests/test_engine_cuda.py)")


class EagerReplay(CudaGraphEngine):
    """The engine with its capture swapped for a replay that runs the body eagerly, and, as a
    graph's replay, leaves its results in the captured call's tensors (loss, gradients)."""

    captures = 0

    def _capture(self, body):
        type(self).captures += 1
        body()
        body()  # the two warm-up calls of a capture, which must not train
        out = body()  # the captured call's output buffer, refilled by each replay
        held = [out] + list(self._captured_grads)

        def replay():
            fresh = [body()] + list(self._captured_grads)
            for h, f in zip(held, fresh):
                if h.data_ptr() != f.data_ptr():
                    h.copy_(f)
        return replay, out


def engine_for(model, path, optimizer=None, lr=1e-2):
    """The CUDA engine's logic for ``model`` on the CPU, with its own Adam state or
    ``optimizer``'s (made the form the engine updates, as Engine does)."""
    params = [p for lin, _ in mlp_layers(model) for p in (lin.weight, lin.bias) if p is not None]
    if optimizer is None:
        state = [Engine._fresh_state(p, False) for p in params]
        hyper = dict(lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
                     decoupled_weight_decay=False)
    else:
        shell = Engine.__new__(Engine)
        shell.optimizer = optimizer
        hyper = _optimizer_hyper(optimizer, params)
        state = [shell._optimizer_state(p, hyper["amsgrad"]) for p in params]
    return EagerReplay(mlp_layers(model), params, state, hyper, path=path)


@pytest.fixture(params=["fused", "graph"])
def path(request):
    if request.param == "fused" and triton_interpreter_reason() is not None:
        pytest.skip(str(triton_interpreter_reason()))
    return request.param


def batches(n, batch, in_f, out_f):
    return [(torch.randn(batch, in_f), torch.randn(batch, out_f)) for _ in range(n)]


def assert_params_close(model, ref, atol=1e-5):
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=atol, msg=f"parameter {name}")


@pytest.mark.parametrize("widths,batch", [([10, 20, 1], 64), ([13, 37, 5, 3], 67), ([20, 40, 1], 130)])
def test_steps_match_pytorch(path, widths, batch):
    model = sequential(widths)
    ref = copy.deepcopy(model)
    engine = engine_for(model, path)
    assert engine.path == path
    data = batches(4, batch, widths[0], widths[-1])
    losses = [engine.step(x, y) for x, y in data]
    assert losses == pytest.approx(torch_steps(ref, data, torch.optim.Adam(ref.parameters(), lr=1e-2)), rel=1e-5)
    assert_params_close(model, ref)


def test_run_with_a_partial_batch_and_a_shared_optimizer_then_a_step_and_predict(path):
    # The buffers, warm-up restore, partial batches, loss accounting and step write-back.
    model = sequential([7, 19, 2])
    ref = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    engine = engine_for(model, path, opt)
    X, Y = torch.randn(103, 7), torch.randn(103, 2)
    rows = torch.randperm(103)
    losses = engine.run(X, Y, epochs=2, batch_size=20, seed=0, shuffle=False, rows=rows)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    expected = []
    for _ in range(2):
        per_batch = [(X[rows[i:i + 20]], Y[rows[i:i + 20]]) for i in range(0, 103, 20)]
        step_losses = torch_steps(ref, per_batch, ref_opt)
        expected.append(sum(v * len(b[0]) for v, b in zip(step_losses, per_batch)) / 103)
    assert losses.tolist() == pytest.approx(expected, rel=1e-5)
    assert_params_close(model, ref)
    assert all(float(opt.state[p]["step"]) == 12 for p in model.parameters())  # written back to the optimizer
    x, y = X[:9], Y[:9]
    assert engine.step(x, y) == pytest.approx(torch_steps(ref, [(x, y)], ref_opt)[0], rel=1e-5)
    assert_params_close(model, ref)
    with torch.no_grad():
        torch.testing.assert_close(engine.predict(X), model(X), rtol=1e-5, atol=1e-6)


def test_run_shuffles_stops_and_reuses_its_graphs(path):
    # run()'s graphs gather each batch by the epoch's order at a position counter and add up
    # the loss inside the graph; checked against torch steps over the same shuffled batches.
    model = sequential([5, 12, 1])
    ref = copy.deepcopy(model)
    engine = engine_for(model, path)
    X, Y = torch.randn(50, 5), torch.randn(50, 1)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(7)
    expected = []
    for _ in range(2):
        order = torch.randperm(50, generator=gen)
        per_batch = [(X[order[i:i + 16]], Y[order[i:i + 16]]) for i in range(0, 50, 16)]
        step_losses = torch_steps(ref, per_batch, ref_opt)
        expected.append(sum(v * len(b[0]) for v, b in zip(step_losses, per_batch)) / 50)
    first = engine.run(X, Y, epochs=2, batch_size=16, seed=7, shuffle=True)
    graphs = engine._run_entry
    assert first.tolist() == pytest.approx(expected, rel=1e-5)
    assert_params_close(model, ref)
    # A second call on the same data reuses the graphs; its callback stops it after one step.
    seen = []
    stopped = engine.run(X, Y, epochs=3, batch_size=16, seed=7, shuffle=True, callback_every=1,
                         callback=lambda e, s, n, end, loss: seen.append((e, s)) or True)
    assert engine._run_entry is graphs and seen == [(0, 1)] and len(stopped) == 1
    engine.set_hyperparameters(**dict(engine.hyper, lr=5e-3))
    assert engine._run_entry is graphs  # a new learning rate: the same graphs
    engine.set_hyperparameters(**dict(engine.hyper, beta2=0.99))
    engine.run(X, Y, epochs=1, batch_size=16, seed=7, shuffle=True)
    assert engine._run_entry is not graphs  # betas are baked into the captured launches: new graphs


def test_learning_rate_changes_keep_the_graphs(path):
    # A scheduler may change the learning rate every step: the graphs read it from a device
    # scalar, so a change is a write to it, not a new capture, and the steps follow it.
    model = sequential([5, 12, 1])
    ref = copy.deepcopy(model)
    engine = engine_for(model, path)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    losses, expected = [], []
    for i, (x, y) in enumerate(batches(4, 16, 5, 1)):
        lr = 1e-2 * 0.5 ** i
        engine.set_hyperparameters(**dict(engine.hyper, lr=lr))
        ref_opt.param_groups[0]["lr"] = lr
        losses.append(engine.step(x, y))
        expected += torch_steps(ref, [(x, y)], ref_opt)
        if i == 0:
            graph = engine._graphs[16]
    assert engine._graphs[16] is graph
    assert losses == pytest.approx(expected, rel=1e-5)
    assert_params_close(model, ref)
    # Rows out of range are refused before any graph runs (inside one, a device assert).
    with pytest.raises(RuntimeError, match="sample_index holds row 7 for model 0, but x has 3 rows"):
        engine.run(torch.randn(3, 5), torch.randn(3, 1), epochs=1, batch_size=2, seed=0, shuffle=False,
                   rows=torch.tensor([0, 7]))


@pytest.mark.parametrize("hyper", [dict(amsgrad=True), dict(weight_decay=0.1), dict(weight_decay=0.1, decoupled=True),
                                   dict(maximize=True)], ids=str)
def test_adam_variants_and_a_scheduler_every_step(path, hyper):
    hyper = dict(hyper)
    opt_cls = torch.optim.AdamW if hyper.pop("decoupled", False) else torch.optim.Adam
    model = sequential([6, 24, 2])
    ref = copy.deepcopy(model)
    opt, ref_opt = opt_cls(model.parameters(), lr=1e-2, **hyper), opt_cls(ref.parameters(), lr=1e-2, **hyper)
    sched, ref_sched = (torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.7) for o in (opt, ref_opt))
    engine = engine_for(model, path, opt)
    before = EagerReplay.captures
    losses, expected = [], []
    for batch in (32, 5, 32, 70, 5, 1):
        x, y = torch.randn(batch, 6), torch.randn(batch, 2)
        losses.append(engine.step(x, y))
        opt._opt_called = True  # as Engine tells a scheduler the optimizer stepped
        sched.step()
        engine.set_hyperparameters(**_optimizer_hyper(opt, engine.params))  # what Engine does every call
        expected += torch_steps(ref, [(x, y)], ref_opt)
        ref_sched.step()
    assert losses == pytest.approx(expected, rel=1e-5)
    assert_params_close(model, ref)
    assert EagerReplay.captures - before == 4  # one per batch size: a new rate is a write, not a capture


def test_last_gradients_are_the_last_steps(path):
    model = sequential([7, 21, 3])
    ref = copy.deepcopy(model)
    engine = engine_for(model, path, lr=0.0)  # lr 0: the reference keeps the engine's weights
    for batch in (16, 9, 16):  # two graphs; the last step's gradients from the one it replayed
        x, y = torch.randn(batch, 7), torch.randn(batch, 3)
        engine.step(x, y)
    torch.nn.functional.mse_loss(ref(x), y).backward()
    for g, p in zip(engine.last_gradients(), ref.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)


def test_predict_matches_the_model_for_a_column_major_input(path):
    model = sequential([9, 33, 3], final_relu=True)
    engine = engine_for(model, path)
    x = torch.randn(9, 100).t()  # a column-major view
    with torch.no_grad():
        torch.testing.assert_close(engine.predict(x), model(x), rtol=1e-5, atol=1e-6)


def test_a_change_of_torchs_tf32_setting_captures_again(path):
    engine = engine_for(sequential([4, 8, 1]), path)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        before = EagerReplay.captures
        engine.step(x, y)
        engine.step(x, y)
        assert EagerReplay.captures - before == 1
        torch.backends.cuda.matmul.allow_tf32 = not old  # a graph keeps the precision it was captured with
        engine.step(x, y)
        assert EagerReplay.captures - before == 2
        engine.run(x, y, epochs=1, batch_size=8, seed=0, shuffle=False)
        engine.run(x, y, epochs=1, batch_size=8, seed=0, shuffle=False)
        assert EagerReplay.captures - before == 3  # run()'s graph: one batch size, once
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def test_tf32_setting_is_read_through_the_new_api():
    # Once a program sets torch.backends.cuda.matmul.fp32_precision, reading allow_tf32 raises
    # in torch >= 2.9: the kernels read the setting without it.
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch before 2.9 has no fp32_precision")
    old = matmul.fp32_precision, torch.backends.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert cuda_matmul_allows_tf32()
        matmul.fp32_precision = "ieee"
        assert not cuda_matmul_allows_tf32()
        matmul.fp32_precision = "none"  # not set for matmul: the global setting
        torch.backends.fp32_precision = "tf32"
        assert cuda_matmul_allows_tf32()
    finally:
        torch.backends.fp32_precision = old[1]
        matmul.fp32_precision = old[0]
    matmul.allow_tf32 = True  # the older setter, still read
    try:
        assert cuda_matmul_allows_tf32()
    finally:
        matmul.allow_tf32 = False
    assert not cuda_matmul_allows_tf32()


@needs_triton_interpreter
def test_the_fused_kernel_copies_an_input_it_cannot_address_in_32_bits():
    from aiaas_fast.triton.fused_mlp import _in_place_or_copied

    # 2^25 rows, column-major: column 127 starts past 2^31 elements in
    column_major = torch.empty_strided((2**25, 128), (1, 2**25), device="meta")
    assert _in_place_or_copied(column_major).is_contiguous()
    # a row stride that the last row of a tile (16 rows at the least) times past 2^31
    wide_rows = torch.empty_strided((100, 8), (2**28, 1), device="meta")
    assert _in_place_or_copied(wide_rows).stride() == (8, 1)
    for fine in (torch.empty(2**25, 128, device="meta"), torch.empty_strided((2**20, 128), (1, 2**20), device="meta"),
                 torch.empty_strided((1, 8), (2**40, 1), device="meta")):  # one row: its stride is never used
        assert _in_place_or_copied(fine) is fine


@needs_triton_interpreter
def test_paths_are_checked():
    for widths, path, error, match in (([3, 4, 1], "small", ValueError, "path on CUDA"),
                                       ([3, 200, 1], "fused", UnsupportedModel, "widths up to 128")):
        model = sequential(widths)
        with pytest.raises(error, match=match):
            engine_for(model, path)
    assert engine_for(sequential([3, 200, 1]), "auto").path == "graph"
