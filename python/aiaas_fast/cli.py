"""The ``aiaas-fast`` command: train a regression MLP on a CSV (or the built-in reactor
data) and predict with it, without writing code.

    aiaas-fast train [--data FILE.csv --target COL[,COL]] [--hidden 64,64] [--epochs N]
                     [--batch-size N] [--lr X] [--backend native|triton|reference] [--device cpu|cuda]
                     [--engine auto|compiled|ops] [--ensemble K | --group-by COL]
                     [--seed N] [--out model.pt] [--force] [--compare]
    aiaas-fast predict --model model.pt --data FILE.csv [--out preds.csv] [--force]

Bad input is one line on stderr and a non-zero exit, never a traceback; nothing the user
gave is overwritten without --force.
"""
from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import sys
import time
from typing import List, Sequence, Tuple

import numpy as np

MODEL_FORMAT = "aiaas_fast.model/1"


class UsageError(Exception):
    """A problem with what the user gave: reported as one line, exit status 2."""


# ------------------------------------------------------------------ CSV
def read_csv(path: str) -> Tuple[List[str], np.ndarray]:
    """The header and a float64 matrix; every cell must be a finite number."""
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file")
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a directory, not a CSV file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not a text CSV file ({e.reason} at byte {e.start})") from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise UsageError(f"{path}: the file is empty")
    header = [h.strip() for h in rows[0]]
    if len(rows) == 1:
        raise UsageError(f"{path}: has a header but no data rows")
    if len(set(header)) != len(header):
        dup = next(h for h in header if header.count(h) > 1)
        raise UsageError(f"{path}: column '{dup}' appears more than once in the header")
    data = np.empty((len(rows) - 1, len(header)))
    for i, row in enumerate(rows[1:], start=2):  # 1-based line numbers, line 1 is the header
        if len(row) != len(header):
            raise UsageError(f"{path}: line {i} has {len(row)} cells but the header has {len(header)}")
        for j, cell in enumerate(row):
            text = cell.strip()
            if not text:
                raise UsageError(f"{path}: line {i}, column '{header[j]}': empty cell")
            try:
                v = float(text)
            except ValueError:
                raise UsageError(f"{path}: line {i}, column '{header[j]}': '{text}' is not a number") from None
            if not math.isfinite(v):
                raise UsageError(f"{path}: line {i}, column '{header[j]}': '{text}' is not a finite number")
            data[i - 2, j] = v
    return header, data


def write_csv(path: str, header: Sequence[str], data: np.ndarray, force: bool) -> None:
    if os.path.exists(path) and not force:
        raise UsageError(f"{path}: already exists; pass --force to overwrite it")
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows([[f"{v:.7g}" for v in row] for row in data])
    os.replace(tmp, path)


# ------------------------------------------------------------------ arguments
def _widths(text: str) -> List[int]:
    try:
        widths = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of widths, e.g. 64,64") from None
    if not widths or any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(f"'{text}': widths must be positive integers, e.g. 64,64")
    return widths


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return v


def _fraction(text: str) -> float:
    v = _positive_float(text) if text.strip() not in ("0", "0.0") else 0.0
    if not v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return v


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as every other bad input
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="aiaas-fast", description="Train regression MLPs on process data with aiaas_fast.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="train a model on a CSV, or on the built-in reactor data")
    t.add_argument("--data", help="CSV file with a header row (default: the built-in CSTR reactor data)")
    t.add_argument("--target", help="target column(s), comma-separated (required with --data)")
    t.add_argument("--hidden", type=_widths, default=[64, 64], help="hidden widths, e.g. 64,64 (default)")
    t.add_argument("--epochs", type=_positive_int, default=20)
    t.add_argument("--batch-size", type=_positive_int, default=256)
    t.add_argument("--lr", type=_positive_float, default=1e-3)
    t.add_argument("--val-split", type=_fraction, default=0.2)
    t.add_argument("--patience", type=_positive_int, default=None, help="early stopping after N epochs without improvement")
    t.add_argument("--backend", default="native",
                   help="native (aiaas_fast's compiled ops, default), triton (its Triton kernels) or reference (plain PyTorch)")
    t.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    t.add_argument("--engine", default="auto", choices=["auto", "compiled", "ops"],
                   help="auto (default): the compiled C++ training engine when it supports the model, else op by op")
    t.add_argument("--ensemble", type=_positive_int, default=None, metavar="K",
                   help="train K models at once, each on its own bootstrap sample; predictions get a mean and a spread")
    t.add_argument("--group-by", default=None, metavar="COLUMN",
                   help="train one model per value of this --data column (e.g. a plant unit), all at once")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--rows", type=_positive_int, default=20000, help="rows of built-in data (default 20000)")
    t.add_argument("--out", help="save the trained model here (.pt)")
    t.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    t.add_argument("--compare", action="store_true",
                   help="also train the same network in plain PyTorch from the same initial weights and compare")
    pr = sub.add_parser("predict", help="predict with a saved model")
    pr.add_argument("--model", required=True, help="a model file written by 'aiaas-fast train --out'")
    pr.add_argument("--data", required=True, help="CSV with the model's feature columns (and its --group-by column)")
    pr.add_argument("--out", help="write predictions to this CSV (default: print them)")
    pr.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    return p


# ------------------------------------------------------------------ commands
def _device(name: str):
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device name (use cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: this torch sees no CUDA GPU")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: only cpu and cuda are supported")
    return device


def _build_model(backend: str, widths: Sequence[int], device):
    from torch import nn

    import aiaas_fast

    layers: list = []
    for a, b in zip(widths[:-2], widths[1:-1]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(widths[-2], widths[-1]))
    model = nn.Sequential(*layers).to(device)
    return model if backend == "reference" else aiaas_fast.convert(model, inplace=True)


def cmd_train(args) -> int:
    import torch

    import aiaas_fast
    from aiaas_fast import datasets

    if args.backend not in ("native", "triton", "reference"):
        raise UsageError(f"--backend {args.backend}: choose native, triton or reference")
    device = _device(args.device)
    if args.backend == "triton":
        from aiaas_fast import backend as _backend

        why = _backend._triton_unavailable(device.type)
        if why:
            raise UsageError(f"--backend triton cannot run on {device.type}: {why}")
        aiaas_fast.set_backend("triton")
    many = args.ensemble is not None or args.group_by is not None
    if args.ensemble is not None and args.group_by is not None:
        raise UsageError("--ensemble and --group-by are two kinds of many-model training; use one")
    if args.group_by is not None and not args.data:
        raise UsageError("--group-by needs --data (a CSV with the column to group by)")
    if many:
        what = "--ensemble" if args.ensemble is not None else "--group-by"
        for flag, bad in (("--compare", args.compare),
                          (f"--backend {args.backend}", args.backend != "native"), ("--engine ops", args.engine == "ops")):
            if bad:
                raise UsageError(f"{what} trains on the compiled many-model engine; {flag} does not apply to it")
    if args.out and os.path.exists(args.out) and not args.force:
        raise UsageError(f"{args.out}: already exists; pass --force to overwrite it")
    if args.data:
        if not args.target:
            raise UsageError("--target is required with --data (the column(s) to predict)")
        header, table = read_csv(args.data)
        targets = [t.strip() for t in args.target.split(",") if t.strip()]
        missing = [t for t in targets if t not in header]
        if missing:
            raise UsageError(f"{args.data}: no column named '{missing[0]}' (columns: {', '.join(header)})")
        if args.group_by is not None:
            if args.group_by not in header:
                raise UsageError(f"{args.data}: no column named '{args.group_by}' to group by (columns: {', '.join(header)})")
            if args.group_by in targets:
                raise UsageError(f"--group-by {args.group_by}: that column is a target")
        features = [h for h in header if h not in targets and h != args.group_by]
        if not features:
            raise UsageError(f"{args.data}: no feature columns left besides the target(s)")
        groups = table[:, header.index(args.group_by)] if args.group_by is not None else None
        x = table[:, [header.index(f) for f in features]]
        y = table[:, [header.index(t) for t in targets]]
        source = f"{args.data} ({len(x)} rows)"
    else:
        if args.target:
            raise UsageError("--target needs --data (the built-in data has its own targets)")
        x, y, features, targets = datasets.cstr(args.rows, seed=args.seed)
        source = f"built-in CSTR reactor data ({len(x)} rows, seed {args.seed})"
    if len(x) < 2:
        raise UsageError(f"{source}: at least 2 rows are needed to train")
    if args.val_split > 0 and int(round(len(x) * args.val_split)) in (0, len(x)):
        raise UsageError(f"--val-split {args.val_split} leaves no training or no validation rows out of {len(x)}")

    x_t, y_t = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    widths = [len(features), *args.hidden, len(targets)]
    torch.manual_seed(args.seed)
    if many:
        return _train_many(args, x_t, y_t, groups if args.data else None, widths, features, targets, source, device)
    model = _build_model(args.backend, widths, device)
    initial = copy.deepcopy(model.state_dict())
    print(f"data: {source}; features: {', '.join(features)}; targets: {', '.join(targets)}")
    print(f"model: MLP {'->'.join(map(str, widths))} ({args.backend} backend, {device}), "
          f"{args.epochs} epochs, batch {args.batch_size}, lr {args.lr}")
    t0 = time.perf_counter()
    # The reference backend is plain PyTorch, op by op, unless the engine is asked for by name.
    # The Triton backend's kernels run op by op too: --backend triton means those kernels.
    engine = "ops" if args.backend in ("reference", "triton") and args.engine == "auto" else args.engine
    try:
        history = aiaas_fast.fit(model, x_t, y_t, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                 val_split=args.val_split, seed=args.seed, patience=args.patience, engine=engine)
    except ValueError as e:
        if "engine='compiled'" in str(e):
            raise UsageError(f"--engine compiled: {str(e).split(': ', 2)[-1]}") from None
        raise
    print(f"engine: compiled ({history.engine_note})" if history.engine == "compiled"
          else f"engine: op by op{f' ({history.engine_note})' if history.engine_note else ''}")
    wall = time.perf_counter() - t0
    # Training time: the epochs' own clocks (no validation, no one-time start-up costs).
    seconds = sum(history["seconds"])
    samples = len(history) * (len(x_t) - int(round(len(x_t) * args.val_split)))
    last = history.epochs[-1]
    print(f"trained {len(history)} epochs: {seconds:.2f} s of training ({samples / seconds:,.0f} samples/s), "
          f"{wall:.2f} s in all" + (", stopped early" if history.stopped_early else ""))
    print(f"final train loss (standardised MSE): {last['train_loss']:.5f}")
    if "val_rmse" in last:
        print(f"validation: RMSE {last['val_rmse']:.5g}, MAE {last['val_mae']:.5g}, R^2 {last['val_r2']:.4f}")
    if args.compare:
        # The same loop, split, batches and initial weights, on torch.nn and torch.optim.Adam.
        ref = _build_model("reference", widths, device)
        ref.load_state_dict(initial)
        ref_history = aiaas_fast.fit(ref, x_t, y_t, epochs=len(history), batch_size=args.batch_size,
                                     val_split=args.val_split, seed=args.seed, progress=False,
                                     optimizer=torch.optim.Adam(ref.parameters(), lr=args.lr),
                                     loss_fn=torch.nn.MSELoss(), engine="ops")
        ref_seconds = sum(ref_history["seconds"])
        ref_loss = ref_history.epochs[-1]["train_loss"]
        print(f"compare (training time): plain PyTorch {ref_seconds:.2f} s, final loss {ref_loss:.5f}; "
              f"aiaas_fast {seconds:.2f} s, final loss {last['train_loss']:.5f}; speedup {ref_seconds / seconds:.2f}x")
    if args.out:
        payload = {"format": MODEL_FORMAT, "widths": widths, "features": features, "targets": targets,
                   "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                   "scalers": {k: s.state_dict() for k, s in model.aiaas_fast_scalers.items()},
                   "aiaas_fast": aiaas_fast.__version__}
        _save_model(args.out, payload)
    return 0


def _save_model(path: str, payload: dict) -> None:
    """Written to a temporary file and renamed: an interrupted save leaves no half-written model."""
    import torch

    tmp = path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)
    print(f"saved: {path}")


def _train_many(args, x_t, y_t, groups, widths, features, targets, source, device) -> int:
    import aiaas_fast

    if groups is not None:
        values = sorted(set(groups.tolist()))
        k = len(values)
        if k > 10000:
            raise UsageError(f"--group-by {args.group_by}: {k} distinct values; that many models is surely not meant")
    else:
        k = args.ensemble
    ens = aiaas_fast.Ensemble(k, widths[0], widths[1:-1], widths[-1], device=device)
    kind = f"{k} models, one per value of '{args.group_by}'" if groups is not None else f"ensemble of {k} bootstrap models"
    print(f"data: {source}; features: {', '.join(features)}; targets: {', '.join(targets)}")
    print(f"model: {kind}, MLP {'->'.join(map(str, widths))} each, {args.epochs} epochs, batch {args.batch_size}, "
          f"lr {args.lr}")
    try:
        history = aiaas_fast.fit_many(ens, x_t, y_t, groups=groups, epochs=args.epochs, batch_size=args.batch_size,
                                      lr=args.lr, val_split=args.val_split, seed=args.seed, patience=args.patience)
    except ValueError as e:
        raise UsageError(str(e).replace("aiaas_fast.fit_many: ", "")) from None
    seconds = sum(history.seconds)
    samples = len(history) * sum(history.rows)
    print(f"engine: compiled ({history.engine_note})")
    print(f"trained {len(history)} epochs: {seconds:.2f} s of training ({samples / seconds:,.0f} samples/s over all models)"
          + (", stopped early (each model keeps its best epoch's weights)" if history.stopped_early else ""))
    last = history.train_loss[-1]
    print(f"final train loss (standardised MSE): mean {last.mean():.5f}, range {last.min():.5f} - {last.max():.5f}")
    if history.val_rmse is not None:
        labels = [f"{args.group_by}={v:g}" for v in history.group_values] if groups is not None else \
            [f"model {i}" for i in range(k)]
        worst = int(history.val_rmse.argmax())
        print(f"validation RMSE: mean {history.val_rmse.mean():.5g}, worst {history.val_rmse[worst]:.5g} ({labels[worst]})")
    if args.out:
        payload = {"format": MODEL_FORMAT, "kind": "groups" if groups is not None else "ensemble", "num_models": k,
                   "widths": widths, "features": features, "targets": targets,
                   "group_by": args.group_by, "group_values": history.group_values,
                   "state_dict": {n: v.cpu() for n, v in ens.state_dict().items()},
                   "scalers": {n: s.state_dict() for n, s in ens.aiaas_fast_scalers.items()},
                   "aiaas_fast": aiaas_fast.__version__}
        _save_model(args.out, payload)
    return 0


def cmd_predict(args) -> int:
    import torch

    import aiaas_fast
    from aiaas_fast.training import Scaler

    if not os.path.exists(args.model):
        raise UsageError(f"{args.model}: no such file")
    if args.out and os.path.exists(args.out) and not args.force:
        raise UsageError(f"{args.out}: already exists; pass --force to overwrite it")
    try:
        payload = torch.load(args.model, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        payload = None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise UsageError(f"{args.model}: not a model file written by 'aiaas-fast train --out'")
    header, table = read_csv(args.data)
    missing = [f for f in payload["features"] if f not in header]
    if missing:
        raise UsageError(f"{args.data}: no column named '{missing[0]}', which the model needs "
                         f"(features: {', '.join(payload['features'])})")
    x = torch.as_tensor(table[:, [header.index(f) for f in payload["features"]]], dtype=torch.float32)
    kind = payload.get("kind", "single")
    if kind in ("ensemble", "groups"):
        ens = aiaas_fast.Ensemble(payload["num_models"], payload["widths"][0], payload["widths"][1:-1],
                                  payload["widths"][-1])
        ens.load_state_dict(payload["state_dict"])
        ens.aiaas_fast_scalers = {k: Scaler.from_state_dict(v) for k, v in payload["scalers"].items()}
        if kind == "groups":
            col = payload["group_by"]
            if col not in header:
                raise UsageError(f"{args.data}: no column named '{col}', which the model groups by")
            ens.group_values = payload["group_values"]
            groups = table[:, header.index(col)]
            known = set(ens.group_values)
            for i, v in enumerate(groups.tolist()):
                if v not in known:
                    raise UsageError(f"{args.data}: line {i + 2}, column '{col}': {v:g} is a group no model was "
                                     f"trained for")
            pred = aiaas_fast.predict_many(ens, x, groups=groups).numpy()
            names = payload["targets"]
        else:
            out = aiaas_fast.predict_many(ens, x)
            pred = np.concatenate([out.mean.numpy(), out.std.numpy()], axis=1)
            names = [f"{t}_mean" for t in payload["targets"]] + [f"{t}_std" for t in payload["targets"]]
        return _write_predictions(args, names, pred)
    model = _build_model("native", payload["widths"], torch.device("cpu"))
    model.load_state_dict(payload["state_dict"])
    model.aiaas_fast_scalers = {k: Scaler.from_state_dict(v) for k, v in payload["scalers"].items()}
    pred = aiaas_fast.predict(model, x).numpy()
    return _write_predictions(args, payload["targets"], pred)


def _write_predictions(args, names, pred) -> int:
    if args.out:
        write_csv(args.out, names, pred, args.force)
        print(f"wrote {len(pred)} predictions to {args.out}")
    else:
        w = csv.writer(sys.stdout)
        w.writerow(names)
        w.writerows([[f"{v:.7g}" for v in row] for row in pred])
    return 0


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return cmd_train(args) if args.command == "train" else cmd_predict(args)
    except UsageError as e:
        print(f"aiaas-fast: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aiaas-fast: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the promise is one line, never a traceback
        if os.environ.get("AIAAS_FAST_DEBUG"):
            raise
        print(f"aiaas-fast: error: {type(e).__name__}: {e} (set AIAAS_FAST_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
