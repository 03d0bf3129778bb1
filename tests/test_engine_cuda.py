"""The engine on CUDA (a captured CUDA graph per batch size) against plain PyTorch on the GPU:
same initial weights and batches give the same losses and weights. Skipped without a GPU."""
import copy

import pytest
import torch

import aiaas_fast
from aiaas_fast.engine import Engine
from helpers import sequential, torch_steps

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.usefixtures("ieee_float32"),  # the reference must not use TF32 where the kernels do not
              pytest.mark.gpu]


PATHS = {"fused": "cuda-fused-mlp", "graph": "cuda-graph"}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("widths,batch", [([10, 20, 1], 64), ([13, 37, 5, 3], 67), ([64, 64, 64, 64, 64, 1], 512),
                                          ([20, 128, 128, 1], 1000)])
def test_graph_steps_match_pytorch(widths, batch, path):
    model = sequential(widths, device="cuda")
    ref = copy.deepcopy(model)
    engine = Engine(model, lr=1e-2, path=path)
    assert engine.layer_paths(batch) == [PATHS[path]] * (len(widths) - 1)
    g = torch.Generator(device="cuda").manual_seed(1)
    data = [(torch.randn(batch, widths[0], device="cuda", generator=g), torch.randn(batch, widths[-1], device="cuda", generator=g))
            for _ in range(5)]
    losses = [engine.step(x, y) for x, y in data]
    assert losses == pytest.approx(torch_steps(ref, data, torch.optim.Adam(ref.parameters(), lr=1e-2)), rel=1e-4, abs=1e-6)
    # Adam divides by sqrt(v): where a gradient is near zero, float32 rounding differences
    # between summation orders grow towards lr per step. The fused kernel on the CPU
    # (interpreted) against torch: 2e-5 at 64x4 hidden, batch 512, after 5 steps of lr=1e-2.
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", list(PATHS))
def test_graph_run_with_a_partial_batch_and_a_shared_optimizer(path):
    model = sequential([7, 19, 2], device="cuda")
    ref = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    X, Y = torch.randn(103, 7, device="cuda"), torch.randn(103, 2, device="cuda")
    rows = torch.randperm(103)
    losses = Engine(model, opt, path=path).run(X, Y, epochs=2, batch_size=20, shuffle=False, rows=rows)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    expected = []
    for _ in range(2):
        batches = [(X[rows[i:i + 20].cuda()], Y[rows[i:i + 20].cuda()]) for i in range(0, 103, 20)]
        step_losses = torch_steps(ref, batches, ref_opt)
        expected.append(sum(v * len(b[0]) for v, b in zip(step_losses, batches)) / 103)
    assert losses.tolist() == pytest.approx(expected, rel=1e-4)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert all(float(opt.state[p]["step"]) == 12 for p in model.parameters())


@pytest.mark.parametrize("path", list(PATHS))
def test_a_scheduler_changing_the_rate_every_step_keeps_the_graph(path):
    model = sequential([6, 24, 2], device="cuda")
    ref = copy.deepcopy(model)
    opt, ref_opt = (torch.optim.Adam(m.parameters(), lr=1e-2) for m in (model, ref))
    sched, ref_sched = (torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.7) for o in (opt, ref_opt))
    engine = Engine(model, opt, path=path)
    data = [(torch.randn(32, 6, device="cuda"), torch.randn(32, 2, device="cuda")) for _ in range(5)]
    losses, expected = [], []
    for x, y in data:
        losses.append(engine.step(x, y))
        sched.step()
        expected += torch_steps(ref, [(x, y)], ref_opt)
        ref_sched.step()
        if len(losses) == 1:
            graph = engine._core._graphs[32]
    assert engine._core._graphs[32] is graph  # one capture for all five rates
    assert losses == pytest.approx(expected, rel=1e-4, abs=1e-6)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4)


def test_fit_on_cuda_uses_the_graph_engine_only_when_asked():
    x, y = torch.randn(300, 4), torch.randn(300, 1)
    torch.manual_seed(0)
    m = aiaas_fast.nn.MLP(4, [16], 1).cuda()
    assert aiaas_fast.fit(m, x, y, epochs=1, progress=False).engine == "ops"
    a, b = copy.deepcopy(m), copy.deepcopy(m)
    ha = aiaas_fast.fit(a, x, y, epochs=3, engine="compiled", progress=False)
    hb = aiaas_fast.fit(b, x, y, epochs=3, engine="ops", progress=False)
    assert ha.engine == "compiled" and ha["train_loss"] == pytest.approx(hb["train_loss"], rel=1e-4)
    assert ha.engine_note == "a CUDA graph of the fused MLP kernel"


def test_auto_takes_the_fused_kernel_where_it_fits_and_the_graph_of_ops_beyond():
    assert Engine(sequential([10, 20, 1], device="cuda")).layer_paths(64) == ["cuda-fused-mlp"] * 2
    assert Engine(sequential([10, 200, 1], device="cuda")).layer_paths(64) == ["cuda-graph"] * 2
    with pytest.raises(aiaas_fast.engine.UnsupportedModel, match="up to 128"):
        Engine(sequential([10, 200, 1], device="cuda"), path="fused")
    with pytest.raises(ValueError, match="path on CUDA"):
        Engine(sequential([10, 20, 1], device="cuda"), path="small")


def test_fused_engine_predict_matches_the_model():
    model = sequential([9, 33, 3], final_relu=True, device="cuda")
    engine = Engine(model)
    x = torch.randn(1000, 9, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(engine.predict(x), model(x), rtol=1e-5, atol=1e-6)


def test_a_parameter_whose_storage_moved_is_refused_before_a_replay():
    model = sequential([4, 16, 1], device="cuda")
    engine = Engine(model)
    x, y = torch.randn(8, 4, device="cuda"), torch.randn(8, 1, device="cuda")
    engine.step(x, y)
    model[0].weight.data = torch.randn(16, 4, device="cuda")
    with pytest.raises(RuntimeError, match="storage was replaced"):
        engine.step(x, y)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("path", list(PATHS))
def test_a_model_on_the_second_gpu_trains_there(path):
    torch.cuda.set_device(0)
    model = sequential([6, 24, 1], device="cuda:1")
    ref = copy.deepcopy(model)
    engine = Engine(model, lr=1e-2, path=path)
    x, y = torch.randn(40, 6, device="cuda:1"), torch.randn(40, 1, device="cuda:1")
    loss = engine.step(x, y)
    assert loss == pytest.approx(torch_steps(ref, [(x, y)], torch.optim.Adam(ref.parameters(), lr=1e-2))[0], rel=1e-4)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", list(PATHS))
def test_runs_with_data_on_the_cpu_reuse_their_graphs(path):
    # Data from the CPU goes into a buffer kept between calls: a second run() of the same
    # shape replays the graphs (their address is the graphs'), on the new values.
    model = sequential([6, 24, 1], device="cuda")
    twin = copy.deepcopy(model)
    a, b = Engine(model, lr=1e-2, path=path), Engine(twin, lr=1e-2, path=path)
    for call in range(2):
        X, Y = torch.randn(50, 6), torch.randn(50, 1)
        from_cpu = a.run(X, Y, epochs=1, batch_size=16, seed=call)
        if call == 0:
            entry = a._core._run_entry
        assert a._core._run_entry is entry
        assert from_cpu.tolist() == b.run(X.cuda(), Y.cuda(), epochs=1, batch_size=16, seed=call).tolist()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


@pytest.mark.parametrize("path", list(PATHS))
def test_a_change_of_torchs_tf32_setting_captures_again(path):
    # A graph keeps the float32 product precision it was captured with.
    engine = Engine(sequential([4, 8, 1], device="cuda"), lr=1e-2, path=path)
    x, y = torch.randn(16, 4, device="cuda"), torch.randn(16, 1, device="cuda")
    engine.step(x, y)
    first = engine._core._graphs[16]
    torch.backends.cuda.matmul.allow_tf32 = True  # the ieee_float32 fixture restores it
    engine.step(x, y)
    assert engine._core._graphs[16] is not first


@pytest.mark.parametrize("path", list(PATHS))
def test_last_gradients_are_the_last_replays(path):
    model = sequential([7, 21, 3], device="cuda")
    ref = copy.deepcopy(model)
    engine = Engine(model, lr=0.0, path=path)  # lr 0: the reference keeps the engine's weights
    for batch in (16, 9, 16):  # two graphs; the last step's gradients from the one it replayed
        x, y = torch.randn(batch, 7, device="cuda"), torch.randn(batch, 3, device="cuda")
        engine.step(x, y)
    torch.nn.functional.mse_loss(ref(x), y).backward()
    for g, p in zip(engine.last_gradients(), ref.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)
