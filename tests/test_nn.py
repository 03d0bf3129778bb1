"""aiaas_fast.nn modules and aiaas_fast.convert against torch.nn."""
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aiaas_fast
from aiaas_fast.nn import MLP, Linear, LinearReLU, MSELoss
from helpers import DTYPES, assert_close, rand

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_linear_relu_has_nn_linear_init_and_state_dict():
    torch.manual_seed(1)
    ref = nn.Linear(17, 5)
    torch.manual_seed(1)
    ours = LinearReLU(17, 5)
    assert list(ours.state_dict()) == ["weight", "bias"]
    for k in ("weight", "bias"):
        assert torch.equal(ours.state_dict()[k], ref.state_dict()[k])
    x = rand(3, 4, 17)
    assert_close(ours(x), F.relu(ref(x)), torch.float32)
    back = nn.Linear(17, 5)
    back.load_state_dict(ours.state_dict())  # and back again
    assert torch.equal(back.weight, ours.weight)
    assert LinearReLU(3, 2, bias=False).bias is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_modules_take_device_and_dtype(dtype):
    m = MLP(6, [5, 3], 2, dtype=dtype)
    assert all(p.dtype == dtype for p in m.parameters())
    x = rand(4, 6, dtype=dtype)
    l0, l1, l2 = m.layers
    ref = F.linear(F.relu(F.linear(F.relu(F.linear(x.double(), l0.weight.double(), l0.bias.double())),
                                   l1.weight.double(), l1.bias.double())), l2.weight.double(), l2.bias.double())
    assert_close(m(x), ref, dtype)


def test_mlp_layout_and_bad_widths():
    m = MLP(10, 20, 1)
    assert [type(l) for l in m.layers] == [LinearReLU, Linear]
    assert list(m.state_dict()) == ["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"]
    with pytest.raises(ValueError, match="MLP: every width must be a positive int, got 0"):
        MLP(10, [20, 0], 1)
    with pytest.raises(ValueError, match="MLP: every width must be a positive int, got True"):
        MLP(4, True, 1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_loss_module_matches_nn(reduction):
    x, t = rand(9, 2, requires_grad=True), rand(9, 2)
    loss = MSELoss(reduction)(x, t)
    x2 = x.detach().clone().requires_grad_()
    ref = nn.MSELoss(reduction=reduction)(x2, t)
    assert_close(loss, ref, torch.float32)
    loss.sum().backward()
    ref.sum().backward()
    assert_close(x.grad, x2.grad, torch.float32)


def seed_network():
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 1))


def test_convert_seed_network_same_outputs_gradients_and_keys():
    ref = seed_network()
    ours = aiaas_fast.convert(ref)
    assert ours is not ref and type(ref[0]) is nn.Linear  # the original is untouched
    assert type(ours[0]) is LinearReLU and type(ours[1]) is nn.Identity
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert ours.aiaas_fast_conversions == ["0+1: Linear(10, 20) + ReLU -> LinearReLU + Identity"]
    x, y = rand(64, 10), rand(64, 1)
    out, ref_out = ours(x), ref(x)
    assert_close(out, ref_out, torch.float32)
    F.mse_loss(out, y).backward()
    F.mse_loss(ref_out, y).backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, torch.float32, msg=name)


def test_convert_nested_inplace_and_losses():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Sequential(nn.Linear(8, 8), nn.ReLU()),
                                      nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
            self.loss = nn.MSELoss(reduction="sum")

    net = Net()
    weight = net.body[0].weight
    same = aiaas_fast.convert(net, inplace=True)
    assert same is net
    assert type(net.body[0]) is LinearReLU and net.body[0].weight is weight  # the same Parameter
    assert type(net.body[2][0]) is LinearReLU
    assert type(net.body[3]) is nn.Linear  # followed by Tanh: left alone
    assert type(net.loss) is MSELoss and net.loss.reduction == "sum"
    assert len(net.aiaas_fast_conversions) == 3
    assert aiaas_fast.convert(nn.Tanh()).aiaas_fast_conversions == []
    with pytest.raises(TypeError, match="expected an nn.Module"):
        aiaas_fast.convert("model")


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
def test_convert_leaves_modules_that_do_more_than_their_forward(caplog):
    # Swapping these would drop what they add: weight_norm's and spectral_norm's parameters,
    # pruning's mask, a user's hook. They stay, each with a warning that names why.
    from torch.nn.utils import prune

    calls = []
    hooked = nn.Linear(4, 4)
    hooked.register_forward_hook(lambda m, i, o: calls.append(1))
    pruned = nn.Linear(4, 4)
    prune.l1_unstructured(pruned, "weight", amount=0.5)
    loss = nn.MSELoss()
    loss.register_forward_pre_hook(lambda m, args: calls.append(2))
    cases = [(nn.utils.weight_norm(nn.Linear(4, 4)), "forward pre hooks"),
             (nn.utils.parametrizations.weight_norm(nn.Linear(4, 4)), "parametrizations"),
             (nn.utils.spectral_norm(nn.Linear(4, 4)), "forward pre hooks"),
             (pruned, "forward pre hooks"), (hooked, "forward hooks")]
    for layer, why in cases:
        model = nn.Sequential(layer, nn.ReLU(), nn.Linear(4, 1), loss).eval()  # spectral_norm: no power step
        x = torch.randn(3, 4)
        keys, expected = list(model[:3].state_dict()), model[:3](x)
        caplog.clear()
        with caplog.at_level("WARNING", logger="aiaas_fast"):
            out = aiaas_fast.convert(model, inplace=True)  # the old weight_norm cannot be deep-copied after a forward
        assert out[0].__class__ is layer.__class__ and out.aiaas_fast_conversions == []
        assert list(out[:3].state_dict()) == keys
        torch.testing.assert_close(out[:3](x), expected)
        assert f"0+1: Linear + ReLU left as they are: it has {why}" in caplog.text
        assert "3: MSELoss left as it is: it has forward pre hooks" in caplog.text
    calls.clear()
    aiaas_fast.convert(nn.Sequential(hooked, nn.ReLU()), inplace=True)(torch.randn(2, 4))
    assert calls == [1]  # the hook still fires
    with pytest.raises(RuntimeError, match="aiaas_fast.convert: the model cannot be copied .*inplace=True"):
        aiaas_fast.convert(nn.Sequential(cases[0][0], nn.ReLU()))


def test_convert_leaves_a_sequential_with_its_own_forward(caplog):
    # Its forward() may use a Linear's pre-activation: fused, seq[0] would return relu(linear).
    class Residual(nn.Sequential):
        def forward(self, x):
            h = self[0](x)
            return self[1](h) + h

    torch.manual_seed(0)
    model = nn.Sequential(Residual(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    x = torch.randn(5, 4)
    with caplog.at_level("WARNING", logger="aiaas_fast"):
        out = aiaas_fast.convert(model)
    torch.testing.assert_close(out(x), model(x))
    assert type(out[0][0]) is nn.Linear and type(out[1]) is aiaas_fast.nn.LinearReLU  # the plain Sequential is fused
    assert "0.0+0.1: Linear + ReLU left as they are: Residual overrides forward()" in caplog.text


def test_seed_example_gives_pytorch_losses():
    spec = importlib.util.spec_from_file_location("seed_network", os.path.join(ROOT, "examples", "seed_network.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    ours, ref = example.run(steps=100)
    assert len(ours) == len(ref) == 100
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(ref), rtol=1e-5, atol=1e-6)
    assert ours[-1] < ours[0]  # it trained


def test_mse_loss_module_arguments():
    assert MSELoss("sum").reduction == "sum" and MSELoss(reduction="none").reduction == "none"
    assert MSELoss().reduction == "mean"
    with pytest.warns(UserWarning):
        assert MSELoss(False).reduction == nn.MSELoss(False).reduction == "sum"  # torch's legacy order
    with pytest.raises(ValueError, match="reduction must be 'none', 'mean' or 'sum', got 'avg'"):
        MSELoss("avg")


def test_fx_symbolic_trace_records_the_fused_ops_as_calls():
    # FX-based tools (graph passes, FX quantization) trace converted models; the fused ops are
    # leaves of the graph, not traced into (the backend choice cannot take proxies).
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 1))
    model, loss = aiaas_fast.convert(plain), aiaas_fast.nn.MSELoss()
    x, y = torch.randn(4, 3), torch.randn(4, 1)
    for module, args in ((model, (x,)), (aiaas_fast.nn.MLP(3, [4, 4], 1), (x,)), (loss, (x[:, :1], y))):
        traced = torch.fx.symbolic_trace(module)
        called = [n.target.__name__ for n in traced.graph.nodes if n.op == "call_function"]
        assert called and set(called) <= {"linear_relu", "mse_loss", "linear"}  # aiaas_fast.nn.Linear: F.linear
        torch.testing.assert_close(traced(*args), module(*args))


def test_to_torch_gives_the_same_network_in_plain_torch_nn():
    # For deployment without aiaas_fast: no aiaas_fast class or operator left, same outputs.
    torch.manual_seed(0)
    x = torch.randn(6, 10)
    plain = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 1))
    back = aiaas_fast.to_torch(aiaas_fast.convert(plain))
    assert [type(m) for m in back] == [nn.Linear, nn.ReLU, nn.Linear]
    assert list(back.state_dict()) == list(plain.state_dict())
    torch.testing.assert_close(back(x), plain(x), rtol=0, atol=0)

    mlp = aiaas_fast.nn.MLP(10, [8, 8], 2)
    seq = aiaas_fast.to_torch(mlp)
    assert [type(m) for m in seq] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    torch.testing.assert_close(seq(x), mlp(x), rtol=0, atol=0)
    assert all(not type(m).__module__.startswith("aiaas_fast") for m in seq.modules())
    ops = {str(n.target) for n in torch.export.export(seq, (x,)).graph.nodes if n.op == "call_function"}
    assert not any("aiaas_fast" in op for op in ops), ops
    assert mlp.layers[0].weight is not seq[0].weight  # a copy unless inplace

    class Net(nn.Module):  # a LinearReLU outside a Sequential, an MSELoss
        def __init__(self):
            super().__init__()
            self.body, self.loss = aiaas_fast.nn.LinearReLU(10, 3), aiaas_fast.nn.MSELoss()

        def forward(self, x):
            return self.body(x)

    net = Net()
    out = aiaas_fast.to_torch(net)
    assert type(out.body) is nn.Sequential and type(out.loss) is nn.MSELoss
    torch.testing.assert_close(out(x), net(x), rtol=0, atol=0)
    with pytest.raises(TypeError, match="an Ensemble has no plain torch.nn equivalent"):
        aiaas_fast.to_torch(aiaas_fast.Ensemble(2, 3, [4], 1))


def test_to_torch_of_a_fitted_model_folds_or_warns_and_needs_no_aiaas_fast(tmp_path):
    import subprocess
    import sys

    torch.manual_seed(0)
    X = torch.randn(128, 3) * 50 + 300
    y = X[:, :1] * 2 + 5 + torch.randn(128, 1)
    model = aiaas_fast.nn.MLP(3, [8], 1)
    aiaas_fast.fit(model, X, y, epochs=2, progress=False)
    with pytest.warns(UserWarning, match="standardised data"):
        plain = aiaas_fast.to_torch(model)
    assert not hasattr(plain, "aiaas_fast_scalers")  # a pickle would need aiaas_fast.scaler
    folded = aiaas_fast.to_torch(model, fold_scalers=True)
    torch.testing.assert_close(folded(X), aiaas_fast.predict(model, X), rtol=1e-5, atol=1e-3)  # y in its units
    path = tmp_path / "plain.pt"
    torch.save(folded, path)
    code = (f"import sys; sys.modules['aiaas_fast'] = None; import torch; "
            f"m = torch.load({str(path)!r}, weights_only=False); print(m(torch.full((1, 3), 300.0)).shape)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "torch.Size([1, 1])" in r.stdout, r.stderr[-2000:]
    single = aiaas_fast.nn.MLP(3, [], 1)  # one Linear: both folds into the same layer
    aiaas_fast.fit(single, X, y, epochs=2, progress=False)
    torch.testing.assert_close(aiaas_fast.to_torch(single, fold_scalers=True)(X), aiaas_fast.predict(single, X),
                               rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="no scalers"):
        aiaas_fast.to_torch(aiaas_fast.nn.MLP(3, [8], 1), fold_scalers=True)


def test_convert_and_to_torch_keep_the_train_or_eval_mode():
    # The modules they put in (Identity, ReLU, MSELoss, a Sequential) take the mode of what
    # they replace: an eval-mode model stays wholly in eval mode, and a training one in training.
    for training in (False, True):
        seq = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1), nn.MSELoss()).train(training)
        converted = aiaas_fast.convert(seq)
        assert {m.training for m in converted.modules()} == {training}
        assert {m.training for m in aiaas_fast.to_torch(converted).modules()} == {training}
        assert {m.training for m in aiaas_fast.to_torch(aiaas_fast.nn.LinearReLU(3, 2).train(training)).modules()} == {training}
        assert aiaas_fast.to_torch(aiaas_fast.nn.MSELoss().train(training)).training is training
        assert aiaas_fast.convert(nn.MSELoss().train(training)).training is training


def test_to_torch_leaves_modules_that_do_more_than_their_forward():
    # As convert(): swapping a hooked layer would drop what its hook does.
    layer = aiaas_fast.nn.LinearReLU(4, 8)
    layer.register_forward_hook(lambda m, i, o: o * 0)
    model = nn.Sequential(layer, nn.Linear(8, 1))
    x = torch.randn(3, 4)
    with pytest.warns(UserWarning, match="left as it is: 0: it has forward hooks"):
        out = aiaas_fast.to_torch(model)
    torch.testing.assert_close(out(x), model(x))


def test_jit_script_is_refused_with_the_way_out_and_scripts_to_torch():
    import warnings
    model = MLP(3, [5], 2)
    x = torch.randn(4, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated in torch 2.13
        for m in (model, nn.Sequential(model), aiaas_fast.nn.MSELoss()):
            with pytest.raises(RuntimeError, match="script aiaas_fast.to_torch\\(model\\) instead"):
                torch.jit.script(m)
        scripted = torch.jit.script(aiaas_fast.to_torch(model))
    torch.testing.assert_close(scripted(x), model(x))


def test_a_traced_mlp_can_be_saved():
    # FX keeps the forward's annotations; string ones (from __future__ import annotations)
    # made the traced module unpicklable.
    import io

    traced = torch.fx.symbolic_trace(aiaas_fast.nn.MLP(3, [4], 1))
    torch.save(traced, io.BytesIO())


def test_to_torch_folds_the_scalers_of_several_targets():
    # Each output row of the last Linear is scaled by its own target's std (and shifted by its
    # mean); the fold's result maps raw x to y in each target's units, as predict does.
    torch.manual_seed(0)
    X = torch.randn(128, 3) * torch.tensor([50.0, 2.0, 0.1]) + 300
    y = torch.cat([X[:, :1] * 2 + 5, X[:, 1:2] * 1e3 - 7, X[:, 2:] * 1e-2], 1) + torch.randn(128, 3)
    model = aiaas_fast.nn.MLP(3, [8], 3)
    aiaas_fast.fit(model, X, y, epochs=2, progress=False)
    folded = aiaas_fast.to_torch(model, fold_scalers=True)
    expected = aiaas_fast.predict(model, X)
    with torch.no_grad():
        torch.testing.assert_close(folded(X), expected, rtol=1e-4, atol=1e-3 * float(y.std(0).max()))

