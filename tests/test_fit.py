"""aiaas_fast.fit: training, metrics, determinism, early stopping, checkpoints and resume."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import aiaas_fast
from aiaas_fast.nn import MLP


def data(n=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g) * torch.tensor([1.0, 10.0, 0.1, 5.0]) + 3.0
    y = torch.stack([x[:, 0] * 2 + x[:, 1] * 0.1, (x[:, 2] * 10).sin()], 1) * 50 + 100
    return x, y


def model(seed=0):
    torch.manual_seed(seed)
    return MLP(4, [16, 16], 2)


def test_fit_learns_and_reports_metrics_in_target_units():
    x, y = data()
    m = model()
    h = aiaas_fast.fit(m, x, y, epochs=30, batch_size=32, lr=3e-3, seed=1)
    assert len(h) == 30 and set(h.epochs[0]) >= {"train_loss", "val_loss", "val_rmse", "val_mae", "val_r2", "samples_per_s"}
    assert h["train_loss"][-1] < 0.5 * h["train_loss"][0]
    assert h["val_r2"][-1] > 0.5
    pred = aiaas_fast.predict(m, x)  # scalers kept with the model: predictions in y's units
    assert pred.shape == y.shape
    rmse = (pred - y).pow(2).mean().sqrt().item()
    assert rmse < y.std().item()
    val_rows = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[:120]  # fit's split for seed 1
    ref = (pred[val_rows] - y[val_rows]).pow(2).mean().sqrt().item()
    assert h["val_rmse"][-1] == pytest.approx(ref, rel=1e-4)


def test_numpy_and_dataloader_inputs_train_the_same_as_tensors():
    x, y = data(200)
    h1 = aiaas_fast.fit(model(), x, y, epochs=3, seed=2)
    h2 = aiaas_fast.fit(model(), x.numpy(), y.numpy(), epochs=3, seed=2)
    h3 = aiaas_fast.fit(model(), DataLoader(TensorDataset(x, y), batch_size=50), epochs=3, seed=2)
    assert h1["train_loss"] == h2["train_loss"] == h3["train_loss"]


def test_deterministic_for_a_seed():
    x, y = data(300)
    runs = [aiaas_fast.fit(model(), x, y, epochs=4, seed=5) for _ in range(2)]
    assert runs[0]["train_loss"] == runs[1]["train_loss"] and runs[0]["val_rmse"] == runs[1]["val_rmse"]
    other = aiaas_fast.fit(model(), x, y, epochs=4, seed=6)
    assert other["train_loss"] != runs[0]["train_loss"]


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path):
    x, y = data(300)
    straight = model()
    h_straight = aiaas_fast.fit(straight, x, y, epochs=6, seed=3)
    ckpt = str(tmp_path / "run.pt")
    resumed = model()
    aiaas_fast.fit(resumed, x, y, epochs=3, seed=3, checkpoint=ckpt)  # "interrupted" after 3 epochs
    fresh = model(seed=99)  # a new process would start from other weights: the checkpoint restores them
    h_resumed = aiaas_fast.fit(fresh, x, y, epochs=6, seed=3, checkpoint=ckpt, resume=True)
    assert h_resumed["train_loss"] == h_straight["train_loss"]
    for a, b in zip(fresh.state_dict().values(), straight.state_dict().values()):
        assert torch.equal(a, b)


def test_early_stopping_keeps_the_best_weights():
    x, y = data(200)
    y = torch.randn_like(y)  # nothing to learn: validation loss stops improving quickly
    m = model()
    h = aiaas_fast.fit(m, x, y, epochs=200, lr=1e-2, patience=3, seed=0)
    assert h.stopped_early and len(h) < 200
    assert h.best_epoch == len(h) - 4
    assert min(h["val_loss"]) == h["val_loss"][h.best_epoch]
    # The weights kept are the best epoch's: evaluating them gives that epoch's validation loss.
    val_rows = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:40]
    sc = m.aiaas_fast_scalers
    with torch.no_grad():
        val_loss = torch.nn.functional.mse_loss(m(sc["x"].transform(x[val_rows])), sc["y"].transform(y[val_rows]))
    assert val_loss.item() == pytest.approx(h["val_loss"][h.best_epoch], rel=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    (dict(epochs=0), "invalid epochs=0"),
    (dict(batch_size=-1), "invalid batch_size=-1"),
    (dict(lr=float("nan")), "invalid lr=nan"),
    (dict(val_split=1.0), "invalid val_split=1.0"),
    (dict(batch_size=True), "invalid batch_size=True"),
    (dict(min_delta=float("nan")), "invalid min_delta=nan"),
    (dict(seed=None), "invalid seed=None"),
    (dict(seed=-1), "invalid seed=-1"),
    (dict(resume=True), "resume=True needs checkpoint="),
])
def test_bad_hyperparameters(kwargs, message):
    x, y = data(50)
    with pytest.raises(ValueError, match=message):
        aiaas_fast.fit(model(), x, y, **kwargs)


def test_numpy_integers_are_counts():
    x, y = data(60)
    h = aiaas_fast.fit(model(), x, y, epochs=np.int64(2), batch_size=np.int32(16), progress=False)
    assert len(h) == 2


def test_bad_data_is_named():
    x, y = data(50)
    with pytest.raises(ValueError, match="X has 50 rows but y has 49"):
        aiaas_fast.fit(model(), x, y[:49])
    bad = x.clone()
    bad[7, 2] = float("nan")
    with pytest.raises(ValueError, match="X has a non-finite value \\(nan\\) at row 7, column 2"):
        aiaas_fast.fit(model(), bad, y)
    with pytest.raises(ValueError, match="must be numeric"):
        aiaas_fast.fit(model(), np.array([["a"]] * 50), y)
    with pytest.raises(ValueError, match="no rows"):
        aiaas_fast.fit(model(), x[:0], y[:0])

def test_predict_refuses_inputs_of_the_wrong_width():
    # The scalers would broadcast a 1-column X over the model's 4 columns: wrong numbers, no error.
    x, y = data(60)
    m = model()
    aiaas_fast.fit(m, x, y, epochs=1, progress=False)
    for bad, width in ((x[:, :1], 1), (x[:, :3], 3), (torch.cat([x, x[:, :1]], 1), 5), (x[:, 0], 1)):
        with pytest.raises(ValueError, match=f"aiaas_fast.predict: X has {width} column\\(s\\).*fitted on 4 feature"):
            aiaas_fast.predict(m, bad)
    with pytest.raises(ValueError, match="for one row pass shape \\(1, 4\\)"):
        aiaas_fast.predict(m, x[0])  # one row as a 1-D tensor reads as 4 rows of one column
    with pytest.raises(ValueError, match="for one row pass shape \\(1, 4\\)"):
        aiaas_fast.predict(m, x[0].numpy())
    torch.testing.assert_close(aiaas_fast.predict(m, x[0][None]), aiaas_fast.predict(m, x[:1]), rtol=0, atol=0)


def test_a_scaler_refuses_data_of_another_width():
    from aiaas_fast.scaler import Scaler
    sc = Scaler.fit(torch.randn(10, 3))
    for method in (sc.transform, sc.inverse):
        with pytest.raises(ValueError, match="the data has 1 column\\(s\\), shape \\[10, 1\\]; the scaler was fitted on 3"):
            method(torch.randn(10, 1))
    one = Scaler.fit(torch.randn(10, 1))  # one target's scaler over several outputs (quantiles): meant
    torch.testing.assert_close(one.inverse(torch.zeros(4, 3)), one.mean.float().expand(4, 3))


def test_an_optimizer_over_other_parameters_is_refused():
    # convert() returns a copy: an optimizer built before it holds the original's parameters
    # and fit would train nothing, silently.
    x, y = data(40)
    plain = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.Adam(plain.parameters())
    converted = aiaas_fast.convert(plain)
    for engine in ("auto", "ops"):
        with pytest.raises(ValueError, match="the optimizer holds none of the model's parameters"):
            aiaas_fast.fit(converted, x, y, epochs=1, optimizer=opt, engine=engine, progress=False)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        aiaas_fast.fit(converted, x, y, epochs=1, optimizer="adam", progress=False)
    # Part of the model in the optimizer (the rest fixed by leaving it out) is a choice: allowed.
    part = torch.optim.Adam(converted[0].parameters())
    before = converted[2].weight.clone()
    aiaas_fast.fit(converted, x, y, epochs=1, optimizer=part, progress=False)
    assert torch.equal(converted[2].weight, before)


def test_a_foreign_checkpoint_is_refused(tmp_path):
    x, y = data(50)
    path = str(tmp_path / "x.pt")
    torch.save({"something": 1}, path)
    with pytest.raises(ValueError, match="is not an aiaas_fast.fit checkpoint"):
        aiaas_fast.fit(model(), x, y, checkpoint=path, resume=True)


def test_fit_with_aiaas_fast_parts_equals_fit_with_plain_pytorch_parts():
    # The same loop, data order and initial weights: aiaas_fast's modules, loss and Adam
    # against torch.nn, nn.MSELoss and torch.optim.Adam.
    x, y = data(400)
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 2))
    fused = aiaas_fast.convert(plain)
    h_fused = aiaas_fast.fit(fused, x, y, epochs=5, lr=3e-3, seed=7)
    h_plain = aiaas_fast.fit(plain, x, y, epochs=5, seed=7, optimizer=torch.optim.Adam(plain.parameters(), lr=3e-3),
                             loss_fn=torch.nn.MSELoss())
    torch.testing.assert_close(torch.tensor(h_fused["train_loss"]), torch.tensor(h_plain["train_loss"]), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.tensor(h_fused["val_rmse"]), torch.tensor(h_plain["val_rmse"]), rtol=1e-4, atol=1e-6)


def test_progress_bar_shows_loss_and_samples_per_second(capsys):
    x, y = data(100)
    aiaas_fast.fit(model(), x, y, epochs=2, progress=True)
    err = capsys.readouterr().err
    assert "aiaas_fast.fit" in err and "loss=" in err and "samples_s=" in err
    aiaas_fast.fit(model(), x, y, epochs=2, progress=False)
    assert capsys.readouterr().err == ""  # quiet when asked (and by default outside a terminal)


def test_columns_far_from_zero_keep_their_variation():
    # A timestamp or totaliser column (1e9 + k): cast to float32 before standardising, its
    # steps of 1 vanish (float32 steps are 64 apart there). Standardised in float64 they stay.
    k = torch.arange(400, dtype=torch.float64)
    y = torch.sin(k / 20)[:, None]
    near, far = k[:, None], (k + 1e9)[:, None]
    r2 = []
    for x in (near, far):
        torch.manual_seed(0)
        m = MLP(1, [32, 32], 1)
        h = aiaas_fast.fit(m, x, y, epochs=60, batch_size=32, lr=3e-3, progress=False)
        r2.append(h["val_r2"][-1])
        # predict scales in float64 too: predictions in y's units, as good as fit's validation
        assert (aiaas_fast.predict(m, x).double() - y).pow(2).mean().sqrt() < 0.3
    assert r2[1] > 0.9 and abs(r2[0] - r2[1]) < 0.02, r2
    ens = aiaas_fast.Ensemble(2, 1, [32, 32], 1)
    hm = aiaas_fast.fit_many(ens, far, y, epochs=60, batch_size=32, lr=3e-3, val_split=0.2, progress=False)
    assert float(hm.val_rmse.max()) < 0.3, hm.val_rmse  # y spans [-1, 1]


def test_a_float64_model_trains_in_float64():
    x, y = data(200)
    torch.manual_seed(0)
    m = MLP(4, [8], 2).double()
    h = aiaas_fast.fit(m, x, y, epochs=3, progress=False)
    assert h.engine == "ops" and "float64" in h.engine_note
    assert m.layers[0].weight.dtype == torch.float64
    assert aiaas_fast.predict(m, x[:3]).dtype == torch.float64


def test_a_model_whose_output_does_not_match_y_is_refused_before_training():
    x, y = data(100)
    m = MLP(4, [8], 1)
    before = [p.clone() for p in m.parameters()]
    with pytest.raises(ValueError, match=r"y has 2 column\(s\), but the model gives output of shape \[1, 1\]"):
        aiaas_fast.fit(m, x, y, epochs=2, engine="ops", progress=False)
    with pytest.raises(ValueError, match=r"y has 1 column\(s\), but the model gives output of shape \[1, 2\]"):
        aiaas_fast.fit(model(), x, y[:, :1], epochs=2, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))  # nothing trained


def test_a_custom_loss_may_take_other_output_shapes():
    # Quantile regression: 3 outputs for 1 target, with a pinball loss. The output-width check
    # is for MSE, where a mismatch broadcasts silently; a custom loss decides its own shapes.
    x, y = data(120)
    y = y[:, :1]
    q = torch.tensor([0.1, 0.5, 0.9])

    def pinball(pred, target):
        d = target - pred
        return torch.maximum(q * d, (q - 1) * d).mean()

    torch.manual_seed(0)
    h = aiaas_fast.fit(MLP(4, [8], 3), x, y, epochs=2, loss_fn=pinball, progress=False, seed=np.int64(1),
                       min_delta=np.float32(0.0))
    assert len(h) == 2 and h.engine == "ops"


def test_the_scalers_fit_used_travel_in_the_state_dict():
    # The usual checkpoint (save state_dict, load into a new model) must predict in y's units
    # again, not silently in standardised ones.
    import io

    torch.manual_seed(0)
    X = torch.randn(200, 3) * 50 + 300
    y = X[:, :1] * 2 + 5
    model = aiaas_fast.nn.MLP(3, [16], 1)
    aiaas_fast.fit(model, X, y, epochs=3, progress=False)
    state = model.state_dict()
    assert {k for k in state if k.startswith("aiaas_fast_scalers.")} == {
        "aiaas_fast_scalers.x.mean", "aiaas_fast_scalers.x.std", "aiaas_fast_scalers.y.mean", "aiaas_fast_scalers.y.std"}
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # {k: v.cpu() ...} keeps working
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    fresh = aiaas_fast.nn.MLP(3, [16], 1)
    fresh.load_state_dict(torch.load(buf, weights_only=True))  # strict: every key known
    torch.testing.assert_close(aiaas_fast.predict(fresh, X[:5]), aiaas_fast.predict(model, X[:5]), rtol=0, atol=0)
    fresh.load_state_dict(aiaas_fast.nn.MLP(3, [16], 1).state_dict())  # an unfitted model's: no scalers
    assert not hasattr(fresh, "aiaas_fast_scalers")
    ens = aiaas_fast.Ensemble(3, 3, [8], 1)
    aiaas_fast.fit_many(ens, X, y, epochs=2, progress=False)
    again = aiaas_fast.Ensemble(3, 3, [8], 1)
    again.load_state_dict(ens.state_dict())
    torch.testing.assert_close(aiaas_fast.predict_many(again, X[:5]).mean, aiaas_fast.predict_many(ens, X[:5]).mean)


def test_fitted_models_work_with_distributed_checkpoint_and_members_keep_their_scalers():
    import torch.distributed.checkpoint.state_dict as dcp_state

    torch.manual_seed(0)
    X, y = torch.randn(120, 3) * 10 + 50, torch.randn(120, 1) * 3 + 7
    model = aiaas_fast.nn.MLP(3, [8], 1)
    aiaas_fast.fit(model, X, y, epochs=1, progress=False)
    state = dcp_state.get_model_state_dict(model)  # walks each key to its attribute
    assert torch.equal(state["aiaas_fast_scalers.x.mean"], model.aiaas_fast_scalers["x"].mean)
    ens = aiaas_fast.Ensemble(3, 3, [8], 1)
    aiaas_fast.fit_many(ens, X, y, epochs=1, progress=False)
    for k in range(3):
        torch.testing.assert_close(aiaas_fast.predict(ens.member(k), X), aiaas_fast.predict_many(ens, X).members[k])


@pytest.mark.parametrize("engine", ["ops", "compiled"])
def test_fit_equals_a_plain_pytorch_loop(engine):
    # fit's documented procedure written out in plain PyTorch: the validation rows held out by
    # a permutation from seed, scalers (mean, population std) fitted on the training rows only,
    # a new shuffle of the training rows every epoch (one generator from seed + 1), mini-batches
    # with a last partial one, torch.optim.Adam and MSE on the standardised targets.
    x, y = data(203)
    m = model()
    plain = aiaas_fast.to_torch(m)  # a copy with the same weights, in torch.nn modules
    h = aiaas_fast.fit(m, x, y, epochs=3, batch_size=32, lr=3e-3, val_split=0.2, seed=7, engine=engine,
                       progress=False)
    assert h.engine == engine

    order = torch.randperm(203, generator=torch.Generator().manual_seed(7))
    tr, va = order[41:], order[:41]
    scale = lambda v, ref: ((v.double() - ref.double().mean(0)) / ref.double().std(0, unbiased=False)).float()
    xs_tr, ys_tr, xs_va, ys_va = scale(x[tr], x[tr]), scale(y[tr], y[tr]), scale(x[va], x[tr]), scale(y[va], y[tr])
    opt = torch.optim.Adam(plain.parameters(), lr=3e-3)
    shuffle = torch.Generator().manual_seed(8)
    train_loss, val_loss = [], []
    for _ in range(3):
        perm = torch.randperm(len(tr), generator=shuffle)
        total = 0.0
        for i in range(0, len(perm), 32):
            idx = perm[i:i + 32]
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(plain(xs_tr[idx]), ys_tr[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        train_loss.append(total / len(tr))
        with torch.no_grad():
            val_loss.append(torch.nn.functional.mse_loss(plain(xs_va), ys_va).item())
    assert h["train_loss"] == pytest.approx(train_loss, rel=1e-4)
    assert h["val_loss"] == pytest.approx(val_loss, rel=1e-4)
    for a, b in zip(m.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
