"""The aiaas-fast command: training on the built-in data and on CSV files, predicting, and
one clear line with a non-zero exit for every bad input (never a traceback)."""
import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from aiaas_fast import cli, datasets


def run(*args, cwd=None):
    r = subprocess.run([sys.executable, "-m", "aiaas_fast.cli", *args], capture_output=True, text=True, cwd=cwd,
                       timeout=300)
    return r.returncode, r.stdout, r.stderr


def write(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def plant_csv(tmp_path, n=300):
    x, y, feats, targets = datasets.cstr(n, seed=3)
    return write(tmp_path / "plant.csv", feats + targets, np.concatenate([x, y], 1).tolist()), feats, targets


def test_cstr_data_is_deterministic_and_physical():
    x1, y1, feats, targets = datasets.cstr(500, seed=1)
    x2, y2, *_ = datasets.cstr(500, seed=1)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert x1.shape == (500, 5) and y1.shape == (500, 2) and len(feats) == 5 and len(targets) == 2
    assert np.isfinite(y1).all()
    clean = datasets.cstr(500, seed=1, noise=False)[1]
    assert (clean[:, 1] >= 0).all() and (clean[:, 1] <= 1).all()  # conversion is a fraction
    assert (clean[:, 0] > 250).all()  # no reactor freezes below its coolant


def test_units_differ_by_their_jackets_and_are_deterministic():
    x, y, labels, feats, targets = datasets.units(3, 601, seed=2, noise=False)
    assert x.shape == (601, 5) and y.shape == (601, 2) and labels[:4] == ["R-101", "R-102", "R-103", "R-101"]
    assert [labels.count(f"R-{u}") for u in (101, 102, 103)] == [201, 200, 200]
    again = datasets.units(3, 601, seed=2, noise=False)
    assert np.array_equal(x, again[0]) and np.array_equal(y, again[1]) and labels == again[2]
    # Unit k is cstr(seed + k) with a fouled jacket: the same inputs, a hotter reactor.
    first = datasets.cstr(201, seed=2, noise=False)
    np.testing.assert_array_equal(x[0::3], first[0])
    np.testing.assert_array_equal(y[0::3], first[1])
    third = np.array(labels) == "R-103"
    hotter = datasets.cstr(200, seed=4, noise=False, jacket=0.7)[1]
    np.testing.assert_array_equal(y[third], hotter)
    assert (hotter[:, 0] >= datasets.cstr(200, seed=4, noise=False)[1][:, 0] - 1e-3).all()
    with pytest.raises(ValueError, match="rows must be an int of at least count=3"):
        datasets.units(3, 2)


def test_data_writes_the_builtin_data_for_train_and_predict(tmp_path):
    code, out, err = run("data", "--rows", "400", "--units", "2", "--out", "units.csv", cwd=tmp_path)
    assert code == 0 and "wrote 400 rows" in out, err
    with open(tmp_path / "units.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["unit"] + datasets.FEATURES + datasets.TARGETS and len(rows) == 401
    assert [r[0] for r in rows[1:3]] == ["R-101", "R-102"]
    x, y, labels, *_ = datasets.units(2, 400)
    np.testing.assert_allclose(np.array([r[1:] for r in rows[1:]], dtype=np.float64), np.concatenate([x, y], 1),
                               rtol=1e-6)
    code, out, err = run("train", "--data", "units.csv", "--target", "outlet_temp_K,conversion", "--group-by", "unit",
                         "--hidden", "8", "--epochs", "1", "--out", "units.pt", cwd=tmp_path)
    assert code == 0 and "2 models, one per value of 'unit'" in out, err
    code, out, err = run("data", "--rows", "3", cwd=tmp_path)  # to stdout, no unit column
    assert code == 0 and out.splitlines()[0] == ",".join(datasets.FEATURES + datasets.TARGETS)
    assert len(out.splitlines()) == 4, out
    code, out, err = run("data", "--rows", "5", "--out", "units.csv", cwd=tmp_path)
    assert code == 2 and "units.csv: already exists; pass --force" in err, err
    code, out, err = run("data", "--rows", "2", "--units", "3", cwd=tmp_path)
    assert code == 2 and "--units 3: more units than --rows 2" in err, err


def test_train_with_no_arguments_uses_builtin_data(tmp_path):
    code, out, err = run("train", "--epochs", "2", "--rows", "3000", cwd=tmp_path)
    assert code == 0, err
    assert "built-in CSTR reactor data (3000 rows" in out and "samples/s" in out and "R^2" in out


def test_train_csv_save_predict_round_trip(tmp_path):
    path, feats, targets = plant_csv(tmp_path)
    model = str(tmp_path / "model.pt")
    code, out, err = run("train", "--data", path, "--target", ",".join(targets), "--hidden", "16,16",
                         "--epochs", "3", "--out", model, "--compare")
    assert code == 0, err
    assert os.path.exists(model) and "compare (training time): plain PyTorch" in out
    preds = str(tmp_path / "preds.csv")
    code, out, err = run("predict", "--model", model, "--data", path, "--out", preds)
    assert code == 0, err
    with open(preds) as f:
        rows = list(csv.reader(f))
    assert rows[0] == targets and len(rows) == 301
    # Printed predictions are the CSV's numbers, and they are in the targets' units.
    code, out, err = run("predict", "--model", model, "--data", path)
    assert code == 0 and out.splitlines()[0] == ",".join(targets) and len(out.splitlines()) == 301
    printed = np.array([[float(v) for v in line.split(",")] for line in out.splitlines()[1:]])
    written = np.array([[float(v) for v in row] for row in rows[1:]])
    np.testing.assert_allclose(printed, written, rtol=1e-6)
    truth = np.array(datasets.cstr(300, seed=3)[1])
    assert abs(printed[:, 0].mean() - truth[:, 0].mean()) < 0.5 * truth[:, 0].std()


def test_nothing_is_overwritten_without_force(tmp_path):
    path, feats, targets = plant_csv(tmp_path, 100)
    model = tmp_path / "model.pt"
    model.write_text("precious")
    code, out, err = run("train", "--data", path, "--target", targets[0], "--epochs", "1", "--out", str(model))
    assert code == 2 and "already exists; pass --force" in err and model.read_text() == "precious"
    code, out, err = run("train", "--data", path, "--target", targets[0], "--epochs", "1", "--out", str(model), "--force")
    assert code == 0, err
    preds = tmp_path / "p.csv"
    preds.write_text("keep me")
    code, out, err = run("predict", "--model", str(model), "--data", path, "--out", str(preds))
    assert code == 2 and preds.read_text() == "keep me"


@pytest.mark.parametrize("content,message", [
    ("", "the file is empty"),
    ("a,b\n", "has a header but no data rows"),
    ("a,b\n1,2\n3,\n", "line 3, column 'b': empty cell"),
    ("a,b\n1,2\n3,x7\n", "line 3, column 'b': 'x7' is not a number"),
    ("a,b\n1,2\nnan,4\n", "line 3, column 'a': 'nan' is not a finite number"),
    ("a,b\n1,2,3\n", "line 2 has 3 cells but the header has 2"),
    ("a,a\n1,2\n", "column 'a' appears more than once"),
    ("a,b\n1,2\n\n3,x\n", "line 4, column 'b': 'x' is not a number"),  # file lines, blank lines counted
    ('a,b\n"1\n",2\n3,x\n', "line 4, column 'b'"),  # a quoted cell over two lines
    ('a,b\n1,2\n"3\n",x\n', "line 3, column 'b'"),  # a record over two lines: the line it starts on
    ("a,b\n1,2\n,\n3,4\n", "line 3, column 'a': empty cell"),  # a record of empty cells is not dropped
    ("a;b\n1;2\n", "must be comma-separated"),
    ("a,,b\n1,2,3\n", "column 2 of the header has no name"),
    ("1,2\n3,4\n", "no column named 'b' (columns: 1, 2); the first line is all numbers: does the file have a header"),
    ("a,b\n1,2\n,\n3,4\n,\n,\n", "line 3, column 'a': empty cell"),  # only trailing ones are dropped
])
def test_bad_csv_files_get_one_line_with_row_and_column(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    code, out, err = run("train", "--data", str(path), "--target", "b", "--epochs", "1")
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("args,message", [
    (["train", "--data", "missing.csv", "--target", "y"], "missing.csv: no such file"),
    (["train", "--epochs", "0"], "argument --epochs: must be at least 1, got 0"),
    (["train", "--lr", "-1"], "argument --lr: must be a positive finite number"),
    (["train", "--hidden", "64,x"], "is not a comma-separated list of widths"),
    (["train", "--backend", "cuda"], "--backend cuda: choose native, triton or reference"),
    (["train", "--device", "tpu"], "--device tpu"),
    (["train", "--target", "y"], "--target needs --data"),
    (["predict", "--model", "nope.pt", "--data", "x.csv"], "nope.pt: no such file"),
    ([], "the following arguments are required"),
])
def test_bad_arguments_get_one_line(tmp_path, args, message):
    code, out, err = run(*args, cwd=tmp_path)
    assert code == 2 and message in err and "Traceback" not in err, err


def test_missing_or_non_numeric_target_column(tmp_path):
    path = write(tmp_path / "d.csv", ["a", "b", "label"], [[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    code, out, err = run("train", "--data", path, "--target", "y", "--epochs", "1")
    assert code == 2 and "no column named 'y' (columns: a, b, label)" in err
    (tmp_path / "t.csv").write_text("a,y\n1,2\n3,high\n")
    code, out, err = run("train", "--data", str(tmp_path / "t.csv"), "--target", "y", "--epochs", "1")
    assert code == 2 and "line 3, column 'y': 'high' is not a number" in err


def test_predict_refuses_a_file_that_is_not_our_model(tmp_path):
    path, feats, targets = plant_csv(tmp_path, 20)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00\x01 not a pickle")
    for model in (other, junk):
        code, out, err = run("predict", "--model", str(model), "--data", path)
        assert code == 2 and "not a model file written by 'aiaas-fast train --out'" in err, err


def test_main_in_process_returns_status():
    assert cli.main(["train", "--epochs", "0"]) == 2


def test_train_says_which_engine_ran(tmp_path):
    code, out, err = run("train", "--epochs", "1", "--rows", "500", cwd=tmp_path)
    assert code == 0 and "engine: compiled (the C++ training engine)" in out, err
    code, out, err = run("train", "--epochs", "1", "--rows", "500", "--engine", "ops", cwd=tmp_path)
    assert code == 0 and "engine: op by op" in out, err
    code, out, err = run("train", "--epochs", "1", "--rows", "500", "--backend", "reference", cwd=tmp_path)
    assert code == 0 and "engine: op by op" in out, err


def test_ensemble_train_and_predict_mean_and_spread(tmp_path):
    path, feats, targets = plant_csv(tmp_path)
    model = str(tmp_path / "ens.pt")
    code, out, err = run("train", "--data", path, "--target", ",".join(targets), "--hidden", "16", "--epochs", "3",
                         "--ensemble", "4", "--out", model)
    assert code == 0, err
    assert "ensemble of 4 bootstrap models" in out and "validation RMSE" in out
    assert "engine: compiled (the C++ training engine, 4 models in one call)" in out
    preds = str(tmp_path / "p.csv")
    code, out, err = run("predict", "--model", model, "--data", path, "--out", preds)
    assert code == 0, err
    with open(preds) as f:
        rows = list(csv.reader(f))
    assert rows[0] == [f"{t}_mean" for t in targets] + [f"{t}_std" for t in targets] and len(rows) == 301
    assert all(float(v) > 0 for v in rows[1][len(targets):])


def test_group_by_trains_one_model_per_value_and_routes_predictions(tmp_path):
    x, y, feats, targets = datasets.cstr(300, seed=3)
    unit = (np.arange(300) % 3 + 1)[:, None]
    path = write(tmp_path / "units.csv", ["unit"] + feats + targets, np.concatenate([unit, x, y], 1).tolist())
    model = str(tmp_path / "units.pt")
    code, out, err = run("train", "--data", path, "--target", ",".join(targets), "--group-by", "unit",
                         "--hidden", "8", "--epochs", "2", "--out", model)
    assert code == 0, err
    assert "3 models, one per value of 'unit'" in out and "unit=" in out
    code, out, err = run("predict", "--model", model, "--data", path)
    assert code == 0 and out.splitlines()[0] == ",".join(targets) and len(out.splitlines()) == 301, err
    bad = write(tmp_path / "bad.csv", ["unit"] + feats, [[1] + list(x[0]), [7] + list(x[1])])
    code, out, err = run("predict", "--model", model, "--data", bad)
    assert code == 2 and "line 3, column 'unit': 7 is a group no model was trained for" in err, err


@pytest.mark.parametrize("args,message", [
    (["train", "--ensemble", "3", "--group-by", "u", "--data", "x.csv", "--target", "y"], "use one"),
    (["train", "--group-by", "u"], "--group-by needs --data"),
    (["train", "--ensemble", "3", "--compare"], "--compare does not apply"),
    (["train", "--ensemble", "3", "--backend", "reference"], "--backend reference does not apply"),
    (["train", "--engine", "fast"], "argument --engine: invalid choice"),
])
def test_bad_many_model_arguments(tmp_path, args, message):
    code, out, err = run(*args, cwd=tmp_path)
    assert code == 2 and message in err and "Traceback" not in err, err


def test_backend_triton_without_a_gpu_or_the_interpreter_says_why(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "aiaas_fast.cli", "train", "--backend", "triton", "--epochs", "1"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the Triton backend can run")
    assert r.returncode == 2 and "--backend triton cannot run on cpu" in r.stderr and "Traceback" not in r.stderr, r.stderr


def main(*args):
    """The command in this process (faster than a subprocess); (status, stdout, stderr)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return code, out.getvalue(), err.getvalue()


def test_out_is_checked_before_training_and_never_an_input(tmp_path):
    path, feats, targets = plant_csv(tmp_path, 60)
    original = open(path).read()
    train = ["train", "--data", path, "--target", targets[0], "--epochs", "1"]
    for out, message in [(str(tmp_path / "nodir" / "m.pt"), "does not exist"), (str(tmp_path), "is a directory"),
                         (path, "is the input file"), ("", "--out: empty file name")]:
        code, stdout, err = main(*train, "--out", out, "--force")
        assert code == 2 and message in err and "trained" not in stdout, (out, err)
    assert open(path).read() == original
    model = str(tmp_path / "m.pt")
    stray = tmp_path / "m.pt.tmp"
    stray.write_text("someone's file")
    assert main(*train, "--out", model)[0] == 0
    assert stray.read_text() == "someone's file"  # the save's temporary file is a fresh one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "m.pt.tmp", "plant.csv"]
    for out in (path, model):
        code, _, err = main("predict", "--model", model, "--data", path, "--out", out, "--force")
        assert code == 2 and "is the input file" in err
    assert open(path).read() == original and torch.load(model, weights_only=True)["format"] == cli.MODEL_FORMAT


def test_predict_reads_only_the_columns_the_model_needs(tmp_path):
    path, feats, targets = plant_csv(tmp_path, 60)
    model = str(tmp_path / "m.pt")
    assert main("train", "--data", path, "--target", ",".join(targets), "--epochs", "1", "--out", model)[0] == 0
    x, *_ = datasets.cstr(5, seed=4)
    new = write(tmp_path / "new.csv", ["timestamp"] + feats + targets,
                [[f"2024-01-01T00:0{i}"] + list(r) + [""] * len(targets) for i, r in enumerate(x)])
    code, out, err = main("predict", "--model", model, "--data", new)
    assert code == 0 and len(out.splitlines()) == 6, err


def test_group_labels_may_be_text_and_are_shown_as_written(tmp_path):
    x, y, feats, targets = datasets.cstr(240, seed=3)
    for units, shown in ((["R-101", "R-102", "R-103"], "unit=R-10"), ([1000001, 1000002, 1000003], "unit=100000")):
        rows = [[units[i % 3]] + list(x[i]) + list(y[i, :1]) for i in range(240)]
        path = write(tmp_path / "u.csv", ["unit"] + feats + targets[:1], rows)
        model = str(tmp_path / "u.pt")
        code, out, err = main("train", "--data", path, "--target", targets[0], "--group-by", "unit", "--hidden", "8",
                              "--epochs", "2", "--out", model, "--force")
        assert code == 0 and shown in out and "e+06" not in out, err
        code, out, err = main("predict", "--model", model, "--data", path)
        assert code == 0 and len(out.splitlines()) == 241, err
        bad = write(tmp_path / "bad.csv", ["unit"] + feats, [[units[0]] + list(x[0]), ["R-999"] + list(x[1])])
        code, out, err = main("predict", "--model", model, "--data", bad)
        assert code == 2 and "line 3, column 'unit': R-999 is a group no model was trained for" in err, err


def test_group_labels_that_are_the_same_number_are_not_merged(tmp_path):
    # "007" and "7" are two units written differently; as numbers they would silently merge.
    x, y, feats, targets = datasets.cstr(240, seed=3)
    units = ["007", "7", "8"]
    rows = [[units[i % 3]] + list(x[i]) + list(y[i, :1]) for i in range(240)]
    path = write(tmp_path / "u.csv", ["unit"] + feats + targets[:1], rows)
    model = str(tmp_path / "u.pt")
    code, out, err = main("train", "--data", path, "--target", targets[0], "--group-by", "unit", "--hidden", "8",
                          "--epochs", "2", "--out", model)
    assert code == 0 and "3 models, one per value of 'unit'" in out, (out, err)
    assert torch.load(model, weights_only=True)["group_values"] == ["007", "7", "8"]
    code, out, err = main("predict", "--model", model, "--data", path)
    assert code == 0 and len(out.splitlines()) == 241, err


def test_a_group_without_validation_rows_is_named_not_counted_as_perfect(tmp_path):
    x, y, feats, targets = datasets.cstr(61, seed=3)
    unit = [1] * 30 + [2] * 30 + [7]
    path = write(tmp_path / "g.csv", ["unit"] + feats + targets[:1],
                 [[unit[i]] + list(x[i]) + list(y[i, :1]) for i in range(61)])
    code, out, err = main("train", "--data", path, "--target", targets[0], "--group-by", "unit", "--hidden", "8",
                          "--epochs", "2")
    assert code == 0, err
    assert "no validation rows (too few rows to hold any out): unit=7" in out
    mean = float(out.split("validation RMSE: mean ")[1].split(",")[0])
    assert mean > 0.0


@pytest.mark.parametrize("args,message", [
    (["--target", " , "], "--target ' , ': no column names"),
    (["--target", "y,y"], "--target: column 'y' is named twice"),
    (["--target", "y", "--seed", "99999999999999999999"], "argument --seed: must be in [0, 2^63)"),
    (["--target", "y", "--val-split", "-0.1"], "argument --val-split: must be in [0, 1), got -0.1"),
    (["--target", "y", "--rows", "100"], "--rows sets the size of the built-in data"),
])
def test_bad_target_and_option_values(tmp_path, args, message):
    path = write(tmp_path / "d.csv", ["a", "y"], [[i, 2 * i] for i in range(20)])
    code, out, err = main("train", "--data", path, *args)
    assert code == 2 and message in err, err


def test_a_diverged_run_is_an_error_and_saves_nothing(tmp_path):
    path, feats, targets = plant_csv(tmp_path, 60)
    model = tmp_path / "m.pt"
    code, out, err = main("train", "--data", path, "--target", targets[0], "--epochs", "2", "--lr", "1e30",
                          "--out", str(model))
    assert code == 1 and "training diverged" in err and "nothing was saved" in err and not model.exists()


def test_several_targets_get_their_own_metrics(tmp_path):
    path, feats, targets = plant_csv(tmp_path, 100)
    code, out, err = main("train", "--data", path, "--target", ",".join(targets), "--epochs", "2")
    assert code == 0 and "(all targets pooled)" in out, err
    for t in targets:
        assert f"  {t}: RMSE " in out


def test_early_stopping_reports_the_kept_epoch(tmp_path):
    path, feats, targets = plant_csv(tmp_path, 100)
    code, out, err = main("train", "--data", path, "--target", targets[0], "--epochs", "60", "--lr", "0.05",
                          "--patience", "2", "--hidden", "4")
    assert code == 0 and "stopped early" in out, err
    kept = int(out.split("kept the weights of epoch ")[1].split(",")[0])
    trained = int(out.split("trained ")[1].split(" epochs")[0])
    assert kept == trained - 2  # patience 2: the two epochs after the best did not improve


def test_without_an_early_stop_the_last_epoch_is_what_is_reported_and_saved(tmp_path):
    path, feats, targets = plant_csv(tmp_path, 100)
    code, out, err = main("train", "--data", path, "--target", targets[0], "--epochs", "3", "--patience", "50")
    assert code == 0 and "stopped early" not in out and "kept the weights" not in out, out


def test_saved_files_get_the_usual_permissions(tmp_path):
    path, feats, targets = plant_csv(tmp_path, 40)
    old = os.umask(0o022)
    try:
        model, preds = tmp_path / "m.pt", tmp_path / "p.csv"
        assert main("train", "--data", path, "--target", targets[0], "--epochs", "1", "--out", str(model))[0] == 0
        assert main("predict", "--model", str(model), "--data", path, "--out", str(preds))[0] == 0
        assert (model.stat().st_mode & 0o777, preds.stat().st_mode & 0o777) == (0o644, 0o644)
        os.chmod(model, 0o640)  # replacing a file keeps its mode
        assert main("train", "--data", path, "--target", targets[0], "--epochs", "1", "--out", str(model),
                    "--force")[0] == 0
        assert model.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def test_an_incomplete_model_file_is_named(tmp_path):
    path, feats, targets = plant_csv(tmp_path, 20)
    model = tmp_path / "m.pt"
    torch.save({"format": cli.MODEL_FORMAT, "widths": [5, 1]}, model)
    code, out, err = main("predict", "--model", str(model), "--data", path)
    assert code == 2 and "an incomplete model file (no features, targets, state_dict, scalers)" in err, err


def test_output_into_a_closed_pipe_is_quiet(tmp_path):
    path, feats, targets = plant_csv(tmp_path, 300)
    model = str(tmp_path / "m.pt")
    assert main("train", "--data", path, "--target", targets[0], "--epochs", "1", "--out", model)[0] == 0
    r = subprocess.run(f"{sys.executable} -m aiaas_fast.cli predict --model {model} --data {path} 2>{tmp_path}/err | head -2",
                       shell=True, capture_output=True, text=True, timeout=300)
    assert len(r.stdout.splitlines()) == 2 and (tmp_path / "err").read_text() == ""
    model2 = tmp_path / "m2.pt"
    r = subprocess.run(f"{sys.executable} -m aiaas_fast.cli train --data {path} --target {targets[0]} --epochs 1 "
                       f"--out {model2} 2>{tmp_path}/err | head -1", shell=True, capture_output=True, text=True,
                       timeout=300)
    assert model2.exists() and (tmp_path / "err").read_text() == ""  # the work finishes: the model is saved


def test_under_torchrun_only_rank_0_reports_and_writes(tmp_path, monkeypatch):
    # Every process runs the command (fit trains them as one): one report, one writer.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not cli._secondary_rank()  # RANK alone (a job scheduler's) is not torchrun
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli._secondary_rank()
    monkeypatch.setenv("RANK", "0")
    assert not cli._secondary_rank()
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    path, feats, targets = plant_csv(tmp_path, 60)
    model = tmp_path / "m.pt"
    monkeypatch.setattr(cli, "_secondary_rank", lambda: True)
    code, out, err = main("train", "--data", path, "--target", targets[0], "--epochs", "1", "--out", str(model))
    assert code == 0 and out == "" and not model.exists(), (out, err)
    monkeypatch.setattr(cli, "_secondary_rank", lambda: False)
    code, out, err = main("train", "--data", path, "--target", targets[0], "--epochs", "1", "--out", str(model))
    assert code == 0 and "saved:" in out and model.exists(), (out, err)
    monkeypatch.setattr(cli, "_secondary_rank", lambda: True)
    preds = tmp_path / "p.csv"
    code, out, err = main("predict", "--model", str(model), "--data", path, "--out", str(preds))
    assert code == 0 and out == "" and not preds.exists(), (out, err)
    code, out, err = main("predict", "--model", str(model), "--data", path)
    assert code == 0 and out == "", (out, err)
