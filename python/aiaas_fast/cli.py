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
import io
import math
import os
import sys
import tempfile
import time
from typing import List, Optional, Sequence, Tuple

import numpy as np

MODEL_FORMAT = "aiaas_fast.model/1"


class UsageError(Exception):
    """A problem with what the user gave: reported as one line, exit status 2."""


# ------------------------------------------------------------------ CSV
class Table:
    """A CSV's header, its numeric columns as a float64 matrix (NaN where not read), the file
    line of each data record (for messages) and, for a label column, its cells as text."""

    def __init__(self, header: List[str], data: np.ndarray, lines: List[int], labels: Optional[List[str]]):
        self.header, self.data, self.lines, self.labels = header, data, lines, labels

    def columns(self, names: Sequence[str]) -> np.ndarray:
        return self.data[:, [self.header.index(n) for n in names]]


def read_csv(path: str, numeric: Optional[Sequence[str]] = None, label: Optional[str] = None) -> Table:
    """Reads a comma-separated file with a header row. The ``numeric`` columns (all but
    ``label`` when None) must hold a finite number in every record; ``label``'s cells are kept
    as text (a plant unit may be "R-102"). Blank lines are skipped; a record of empty cells is
    an error, as any empty cell: rows are never dropped, so predictions line up with the input.
    Messages name the file line (a quoted cell may span lines)."""
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file")
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a directory, not a CSV file")
    records: List[Tuple[int, List[str]]] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            last = 0  # the line a record starts on: after the previous one (a quoted cell may span lines)
            for row in reader:
                first, last = last + 1, reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # a blank line: no record
                records.append((first, row))
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 CSV") from None
    except csv.Error as e:
        raise UsageError(f"{path}: not a readable CSV file ({e})") from None
    while records and not any(c.strip() for c in records[-1][1]):
        records.pop()  # trailing records of empty cells (",,," at the end of a spreadsheet export)
    if not records:
        raise UsageError(f"{path}: the file is empty")
    header = [h.strip() for h in records[0][1]]
    if len(records) == 1:
        raise UsageError(f"{path}: has a header but no data rows")
    if len(set(header)) != len(header):
        dup = next(h for h in header if header.count(h) > 1)
        raise UsageError(f"{path}: column '{dup}' appears more than once in the header")
    if any(not h for h in header):
        raise UsageError(f"{path}: column {header.index('') + 1} of the header has no name")
    if len(header) == 1 and any(d in header[0] for d in ";\t|"):
        raise UsageError(f"{path}: one column named '{header[0]}': the file must be comma-separated")
    wanted = [j for j, h in enumerate(header) if (h in numeric if numeric is not None else h != label)]
    label_j = header.index(label) if label is not None and label in header else None
    data = np.full((len(records) - 1, len(header)), np.nan)
    labels: Optional[List[str]] = [] if label_j is not None else None
    lines = []
    for i, (line, row) in enumerate(records[1:]):
        if len(row) != len(header):
            raise UsageError(f"{path}: line {line} has {len(row)} cells but the header has {len(header)}")
        for j in wanted:
            text = row[j].strip()
            if not text:
                raise UsageError(f"{path}: line {line}, column '{header[j]}': empty cell")
            try:
                v = float(text)
            except ValueError:
                raise UsageError(f"{path}: line {line}, column '{header[j]}': '{text}' is not a number") from None
            if not math.isfinite(v):
                raise UsageError(f"{path}: line {line}, column '{header[j]}': '{text}' is not a finite number")
            data[i, j] = v
        if labels is not None:
            text = row[label_j].strip()
            if not text:
                raise UsageError(f"{path}: line {line}, column '{header[label_j]}': empty cell")
            labels.append(text)
        lines.append(line)
    return Table(header, data, lines, labels)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _header_hint(header: Sequence[str]) -> str:
    """For a column not found: a first line of numbers is likely data, not a header."""
    return "; the first line is all numbers: does the file have a header row?" if all(map(_is_number, header)) else ""


def group_values(labels: List[str]) -> list:
    """Group labels as numbers where every one is a finite number (unit 3, unit 1000003), else
    as text (unit "R-102"). Where two different labels are the same number ("007" and "7",
    "7" and "7.0") they stay text: distinct units are not merged silently."""
    try:
        values = [float(v) for v in labels]
    except ValueError:
        return list(labels)
    if not all(math.isfinite(v) for v in values) or len(set(values)) != len(set(labels)):
        return list(labels)
    return values


def label(v) -> str:
    """A group value as the user wrote it: 1000003, not 1e+06."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
        return str(int(v))
    return str(v)


def check_writable(path: str, inputs: Sequence[str], force: bool) -> None:
    """Before any work: --out must be a file we may write, not one of the inputs, and not
    an existing file unless --force."""
    if not path.strip():
        raise UsageError("--out: empty file name")
    if os.path.isdir(path):
        raise UsageError(f"--out {path}: is a directory; give a file name")
    for given in inputs:
        if given and os.path.exists(given) and os.path.exists(path) and os.path.samefile(given, path):
            raise UsageError(f"--out {path}: is the input file {given}; write the output elsewhere")
    if os.path.exists(path) and not force:
        raise UsageError(f"{path}: already exists; pass --force to overwrite it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"--out {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"--out {path}: the folder {parent} is not writable")


def replace_atomically(path: str, write) -> None:
    """``write(f)`` into a fresh temporary file beside ``path``, then renamed over it: an
    interrupted write leaves ``path`` as it was, and no other file is touched."""
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    try:
        # mkstemp makes it private (0600); the file gets the mode a plain open() would give it,
        # or, replacing one, that file's mode.
        if os.path.exists(path):
            mode = os.stat(path).st_mode & 0o7777
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_rows(f, header: Sequence[str], data) -> None:
    """The header and the numbers (7 significant digits) as CSV, to a text stream; rows given
    as lists of strings are written as they are."""
    w = csv.writer(f)
    w.writerow(header)
    w.writerows([row if isinstance(row, list) else [f"{v:.7g}" for v in row] for row in data])


def write_csv(path: str, header: Sequence[str], data: np.ndarray) -> None:
    """Through replace_atomically; ``path`` was checked by check_writable before any work."""

    def write(f):
        text = io.TextIOWrapper(f, newline="", encoding="utf-8")
        write_rows(text, header, data)
        text.flush()
        text.detach()

    if not _secondary_rank():
        replace_atomically(path, write)


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
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return v


def _seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if not 0 <= v < 2**63:
        raise argparse.ArgumentTypeError(f"must be in [0, 2^63), got {text}")
    return v


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as every other bad input
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="aiaas-fast", description="Train regression MLPs on process data with aiaas_fast.",
                epilog="aiaas-fast train --help, predict --help and data --help describe each command.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="train a model on a CSV, or on the built-in reactor data",
                       description="Train an MLP (ReLU hidden layers) with MSE loss and Adam. With --data, every "
                                   "column but the target(s) and the --group-by column is a feature; the file is "
                                   "comma-separated with a header row, every cell a number (the --group-by column "
                                   "may hold text). Columns are standardised; predictions come in the targets' units.")
    t.add_argument("--data", help="CSV file with a header row (default: the built-in CSTR reactor data)")
    t.add_argument("--target", help="target column(s), comma-separated (required with --data)")
    t.add_argument("--hidden", type=_widths, default=[64, 64], help="hidden widths (default: 64,64)")
    t.add_argument("--epochs", type=_positive_int, default=20, help="passes over the training rows (default: 20)")
    t.add_argument("--batch-size", type=_positive_int, default=256, help="rows per step (default: 256)")
    t.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam's learning rate (default: 0.001)")
    t.add_argument("--val-split", type=_fraction, default=0.2,
                   help="fraction of rows held out for validation, in [0, 1) (default: 0.2)")
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
    t.add_argument("--seed", type=_seed, default=0, help="for the split, the batches and the weights (default: 0)")
    t.add_argument("--rows", type=_positive_int, default=None, help="rows of built-in data (default: 20000)")
    t.add_argument("--out", help="save the trained model here (.pt)")
    t.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    t.add_argument("--compare", action="store_true",
                   help="also train the same network in plain PyTorch from the same initial weights and compare")
    pr = sub.add_parser("predict", help="predict with a saved model")
    pr.add_argument("--model", required=True, help="a model file written by 'aiaas-fast train --out'")
    pr.add_argument("--data", required=True, help="CSV with the model's feature columns (and its --group-by column)")
    pr.add_argument("--out", help="write predictions to this CSV (default: print them)")
    pr.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    d = sub.add_parser("data", help="write the built-in reactor data as a CSV, to try train --data on",
                       description="Write the built-in CSTR reactor data (the five feed and coolant columns, then "
                                   "the targets outlet_temp_K and conversion) as a CSV with a header row.")
    d.add_argument("--out", help="CSV file to write (default: print)")
    d.add_argument("--rows", type=_positive_int, default=20000, help="rows (default: 20000)")
    d.add_argument("--seed", type=_seed, default=0, help="(default: 0)")
    d.add_argument("--units", type=_positive_int, default=None, metavar="K",
                   help="K reactor units (R-101, R-102, ...) whose cooling jackets differ, in a first column 'unit' "
                        "(for train --group-by unit)")
    d.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    return p


# ------------------------------------------------------------------ commands
def cmd_data(args) -> int:
    from . import datasets

    if args.out:
        check_writable(args.out, [], args.force)
    if args.units is None:
        x, y, features, targets = datasets.cstr(args.rows, seed=args.seed)
        header, cells = features + targets, np.concatenate([x, y], 1).astype(np.float64)
    else:
        if args.units > args.rows:
            raise UsageError(f"--units {args.units}: more units than --rows {args.rows}")
        x, y, labels, features, targets = datasets.units(args.units, args.rows, seed=args.seed)
        header = ["unit"] + features + targets
        cells = [[label] + [f"{v:.7g}" for v in row] for label, row in zip(labels, np.concatenate([x, y], 1))]
    if args.out:
        write_csv(args.out, header, cells)
        say(f"wrote {len(cells)} rows of the built-in reactor data to {args.out} (targets: {', '.join(targets)})")
        return 0
    try:
        write_rows(sys.stdout, header, cells)
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
    return 0


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
    if args.out is not None:
        check_writable(args.out, [args.data], args.force)
    if args.data and args.rows is not None:
        raise UsageError("--rows sets the size of the built-in data; with --data every row of the file is used")
    if args.data:
        if not args.target:
            raise UsageError("--target is required with --data (the column(s) to predict)")
        targets = [t.strip() for t in args.target.split(",") if t.strip()]
        if not targets:
            raise UsageError(f"--target '{args.target}': no column names")
        if len(set(targets)) != len(targets):
            raise UsageError(f"--target: column '{next(t for t in targets if targets.count(t) > 1)}' is named twice")
        if args.group_by is not None:
            args.group_by = args.group_by.strip()
        table = read_csv(args.data, label=args.group_by)
        header = table.header
        missing = [t for t in targets if t not in header]
        if missing:
            raise UsageError(f"{args.data}: no column named '{missing[0]}' (columns: {', '.join(header)})"
                             + _header_hint(header))
        if args.group_by is not None:
            if args.group_by not in header:
                raise UsageError(f"{args.data}: no column named '{args.group_by}' to group by (columns: {', '.join(header)})")
            if args.group_by in targets:
                raise UsageError(f"--group-by {args.group_by}: that column is a target")
        features = [h for h in header if h not in targets and h != args.group_by]
        if not features:
            raise UsageError(f"{args.data}: no feature columns left besides the target(s)")
        groups = np.asarray(group_values(table.labels), dtype=object) if args.group_by is not None else None
        x, y = table.columns(features), table.columns(targets)
        source = f"{args.data} ({len(x)} rows)"
    else:
        if args.target:
            raise UsageError("--target needs --data (the built-in data has its own targets)")
        x, y, features, targets = datasets.cstr(args.rows or 20000, seed=args.seed)
        source = f"built-in CSTR reactor data ({len(x)} rows, seed {args.seed})"
    if len(x) < 2:
        raise UsageError(f"{source}: at least 2 rows are needed to train")
    if args.val_split > 0 and int(round(len(x) * args.val_split)) in (0, len(x)):
        raise UsageError(f"--val-split {args.val_split} leaves no training or no validation rows out of {len(x)}")

    # float64: fit standardises in float64 before the model's float32 (a column at 1e9 keeps its steps)
    x_t, y_t = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    widths = [len(features), *args.hidden, len(targets)]
    torch.manual_seed(args.seed)
    if many:
        return _train_many(args, x_t, y_t, groups if args.data else None, widths, features, targets, source, device)
    model = _build_model(args.backend, widths, device)
    initial = copy.deepcopy(model.state_dict())
    say(f"data: {source}; features: {', '.join(features)}; targets: {', '.join(targets)}")
    say(f"model: MLP {'->'.join(map(str, widths))} ({args.backend} backend, {device}), "
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
    say(f"engine: compiled ({history.engine_note})" if history.engine == "compiled"
        else f"engine: op by op{f' ({history.engine_note})' if history.engine_note else ''}")
    wall = time.perf_counter() - t0
    # Training time: the epochs' own clocks (no validation, no one-time start-up costs).
    seconds = sum(history["seconds"])
    samples = len(history) * (len(x_t) - int(round(len(x_t) * args.val_split)))
    last = history.epochs[-1]
    say(f"trained {len(history)} epochs: {seconds:.2f} s of training ({samples / seconds:,.0f} samples/s), "
        f"{wall:.2f} s in all" + (", stopped early" if history.stopped_early else ""))
    if not math.isfinite(last["train_loss"]):
        raise TrainingFailed(f"training diverged (train loss {last['train_loss']}); nothing was saved. "
                             "Try a smaller --lr.")
    say(f"final train loss (standardised MSE): {last['train_loss']:.5f}")
    kept = last
    if history.stopped_early and history.best_epoch is not None and history.best_epoch != last["epoch"]:
        kept = next(e for e in history.epochs if e["epoch"] == history.best_epoch)
        say(f"kept the weights of epoch {history.best_epoch + 1}, the best on validation "
            f"(train loss {kept['train_loss']:.5f})")
    if "val_rmse" in kept:
        say(f"validation: RMSE {kept['val_rmse']:.5g}, MAE {kept['val_mae']:.5g}, R^2 {kept['val_r2']:.4f}"
            + (" (all targets pooled)" if len(targets) > 1 else ""))
        if len(targets) > 1:  # targets in different units: each its own figures
            for i, t in enumerate(targets):
                say(f"  {t}: RMSE {kept['val_rmse_by_target'][i]:.5g}, MAE {kept['val_mae_by_target'][i]:.5g}, "
                    f"R^2 {kept['val_r2_by_target'][i]:.4f}")
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
        say(f"compare (training time): plain PyTorch {ref_seconds:.2f} s, final loss {ref_loss:.5f}; "
            f"aiaas_fast {seconds:.2f} s, final loss {last['train_loss']:.5f}; speedup {ref_seconds / seconds:.2f}x")
    if args.out:
        payload = {"format": MODEL_FORMAT, "widths": widths, "features": features, "targets": targets,
                   "state_dict": _weights_only(model),
                   "scalers": {k: s.state_dict() for k, s in model.aiaas_fast_scalers.items()},
                   "aiaas_fast": aiaas_fast.__version__}
        _save_model(args.out, payload)
    return 0


def _weights_only(model) -> dict:
    """The state_dict without the scalers an MLP or Ensemble carries in it: the file keeps them
    under "scalers", and a model file stays readable by releases before they moved in."""
    return {k: v.cpu() for k, v in model.state_dict().items() if not k.startswith("aiaas_fast_scalers.")}


def _save_model(path: str, payload: dict) -> None:
    """Written to a temporary file and renamed: an interrupted save leaves no half-written model."""
    import torch

    if _secondary_rank():
        return
    replace_atomically(path, lambda f: torch.save(payload, f))
    say(f"saved: {path}")


def _train_many(args, x_t, y_t, groups, widths, features, targets, source, device) -> int:
    import aiaas_fast

    if groups is not None:
        k = len(set(groups.tolist()))
        if k > 10000:
            raise UsageError(f"--group-by {args.group_by}: {k} distinct values; that many models is surely not meant")
    else:
        k = args.ensemble
    ens = aiaas_fast.Ensemble(k, widths[0], widths[1:-1], widths[-1], device=device)
    kind = f"{k} models, one per value of '{args.group_by}'" if groups is not None else f"ensemble of {k} bootstrap models"
    say(f"data: {source}; features: {', '.join(features)}; targets: {', '.join(targets)}")
    say(f"model: {kind}, MLP {'->'.join(map(str, widths))} each, {args.epochs} epochs, batch {args.batch_size}, "
        f"lr {args.lr}")
    try:
        history = aiaas_fast.fit_many(ens, x_t, y_t, groups=groups, epochs=args.epochs, batch_size=args.batch_size,
                                      lr=args.lr, val_split=args.val_split, seed=args.seed, patience=args.patience)
    except ValueError as e:
        raise UsageError(str(e).replace("aiaas_fast.fit_many: ", "")) from None
    seconds = sum(history.seconds)
    samples = len(history) * sum(history.rows)
    say(f"engine: compiled ({history.engine_note})")
    say(f"trained {len(history)} epochs: {seconds:.2f} s of training ({samples / seconds:,.0f} samples/s over all models)"
        + (", stopped early (each model keeps its best epoch's weights)" if history.stopped_early else ""))
    last = history.train_loss[-1]
    names = [f"{args.group_by}={label(v)}" for v in history.group_values] if groups is not None else \
        [f"model {i}" for i in range(k)]
    diverged = [names[i] for i in range(k) if not math.isfinite(float(last[i]))]
    if diverged:
        raise TrainingFailed(f"training diverged for {', '.join(diverged[:5])}{' ...' if len(diverged) > 5 else ''} "
                             "(train loss not finite); nothing was saved. Try a smaller --lr.")
    say(f"final train loss (standardised MSE): mean {last.mean():.5f}, range {last.min():.5f} - {last.max():.5f}")
    if history.val_rmse is not None:
        scored = [i for i in range(k) if math.isfinite(float(history.val_rmse[i]))]
        if scored:
            worst = max(scored, key=lambda i: float(history.val_rmse[i]))
            mean = sum(float(history.val_rmse[i]) for i in scored) / len(scored)
            say(f"validation RMSE: mean {mean:.5g}, worst {float(history.val_rmse[worst]):.5g} ({names[worst]})")
        unscored = [names[i] for i in range(k) if i not in scored]
        if unscored:
            say(f"no validation rows (too few rows to hold any out): {', '.join(unscored[:10])}"
                f"{' ...' if len(unscored) > 10 else ''}")
    if args.out:
        payload = {"format": MODEL_FORMAT, "kind": "groups" if groups is not None else "ensemble", "num_models": k,
                   "widths": widths, "features": features, "targets": targets,
                   "group_by": args.group_by, "group_values": history.group_values,
                   "state_dict": _weights_only(ens),
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
    if args.out is not None:
        check_writable(args.out, [args.data, args.model], args.force)
    try:
        payload = torch.load(args.model, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        payload = None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise UsageError(f"{args.model}: not a model file written by 'aiaas-fast train --out'")
    kind = payload.get("kind", "single")
    needed = ["widths", "features", "targets", "state_dict", "scalers"] + (
        ["num_models"] if kind in ("ensemble", "groups") else []) + (["group_by", "group_values"] if kind == "groups" else [])
    lacking = [k for k in needed if k not in payload]
    if lacking:
        raise UsageError(f"{args.model}: an incomplete model file (no {', '.join(lacking)}); train it again")
    features = payload["features"]
    group_by = payload["group_by"] if kind == "groups" else None
    table = read_csv(args.data, numeric=features, label=group_by)  # other columns are not read
    missing = [f for f in features if f not in table.header]
    if missing:
        raise UsageError(f"{args.data}: no column named '{missing[0]}', which the model needs "
                         f"(features: {', '.join(features)})" + _header_hint(table.header))
    x = torch.as_tensor(table.columns(features), dtype=torch.float64)
    if kind in ("ensemble", "groups"):
        ens = aiaas_fast.Ensemble(payload["num_models"], payload["widths"][0], payload["widths"][1:-1],
                                  payload["widths"][-1])
        ens.load_state_dict(payload["state_dict"])
        ens.aiaas_fast_scalers = {k: Scaler.from_state_dict(v) for k, v in payload["scalers"].items()}
        if kind == "groups":
            if group_by not in table.header:
                raise UsageError(f"{args.data}: no column named '{group_by}', which the model groups by")
            ens.group_values = payload["group_values"]
            numeric = all(isinstance(v, float) for v in ens.group_values)
            known = set(ens.group_values)
            groups = []
            for line, text in zip(table.lines, table.labels):
                try:
                    v = float(text) if numeric else text
                except ValueError:
                    v = text
                if v not in known:
                    raise UsageError(f"{args.data}: line {line}, column '{group_by}': {label(v)} is a group no model "
                                     f"was trained for")
                groups.append(v)
            pred = aiaas_fast.predict_many(ens, x, groups=np.asarray(groups, dtype=object)).numpy()
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
        write_csv(args.out, names, pred)
        say(f"wrote {len(pred)} predictions to {args.out}")
    else:
        if _secondary_rank():
            return 0
        try:
            write_rows(sys.stdout, names, pred)
            sys.stdout.flush()
        except BrokenPipeError:  # | head: the reader has what it wanted
            _silence_stdout()
    return 0


class TrainingFailed(Exception):
    """Training ran but gave no usable model (it diverged): one line, exit status 1."""


def _secondary_rank() -> bool:
    """Under torchrun every process runs the command (fit trains them as one, under DDP);
    rank 0 alone reports and writes files."""
    return os.environ.get("RANK", "0") not in ("", "0") and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def say(text: str) -> None:
    """A line on stdout; a closed pipe (| head) ends the output, not the work (the model is
    still saved)."""
    if _secondary_rank():
        return
    try:
        print(text, flush=True)
    except BrokenPipeError:
        _silence_stdout()


def _silence_stdout() -> None:
    # The reader is gone: later writes (and the interpreter's last flush) go nowhere.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return {"train": cmd_train, "predict": cmd_predict, "data": cmd_data}[args.command](args)
    except UsageError as e:
        print(f"aiaas-fast: error: {e}", file=sys.stderr)
        return 2
    except TrainingFailed as e:
        print(f"aiaas-fast: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        _silence_stdout()
        return 0
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
