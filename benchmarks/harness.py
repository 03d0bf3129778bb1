"""Shared benchmark machinery: interleaved repeated timing with quantiles, the machine's
ceilings measured in the same run, and result files (JSON rows + a Markdown table).

Every benchmark in this folder times plain PyTorch and aiaas_fast in one process, one
round-robin over the providers per repetition, so drift on a shared machine hits all
providers alike; it reports the median with the 20th and 80th percentiles.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

import torch


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _quantiles(samples: List[float]) -> Dict[str, float]:
    s = sorted(samples)
    q = lambda p: s[min(len(s) - 1, max(0, round(p * (len(s) - 1))))]
    return {"y50": statistics.median(s), "y20": q(0.2), "y80": q(0.8)}


def _do_bench():
    """triton.testing.do_bench where Triton is installed (CUDA timings only), else None."""
    try:
        from triton.testing import do_bench
    except Exception:  # noqa: BLE001  (no Triton, or a Triton that fails to import)
        return None
    return do_bench


def time_providers(fns: Dict[str, Callable[[], object]], device: str = "cpu", reps: int = 9,
                   block_seconds: float = 0.05, warmup: int = 3, wall_clock: bool = False,
                   failed: Optional[list] = None, case: str = "") -> Dict[str, Dict[str, float]]:
    """Seconds per call of each function: ``reps`` blocks per provider, interleaved, each
    block long enough (``block_seconds``) that timer and loop overhead vanish.

    On CUDA with Triton installed, ``triton.testing.do_bench`` times the providers instead
    (CUDA events per call, the L2 cache flushed between calls), as the GPU kernel
    libraries we compare with report it, in rounds the providers take in turns; the
    quantiles are over single calls. Not with
    ``wall_clock``: whole training steps are timed as a loop of them runs, blocks of calls
    with a sync at the end, so the CPU's launch work counts (do_bench's cache flush before
    each call would hide it: the CPU queues the next step while the GPU flushes).

    A provider that raises while being timed is left out of the result, recorded in
    ``failed`` (with ``case``) when given and on stderr: the others' numbers stand."""
    failed = [] if failed is None else failed
    do_bench = _do_bench() if device.startswith("cuda") and not wall_clock else None
    if do_bench is not None:
        return _time_do_bench(do_bench, fns, failed, case)
    calls = {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            sync(device)
            n, elapsed = 1, 0.0
            while True:  # calibrate the calls per block
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                sync(device)
                elapsed = time.perf_counter() - t0
                if elapsed >= block_seconds or n >= 1 << 20:
                    break
                n *= 2 if elapsed <= 0 else max(2, min(10, int(block_seconds / max(elapsed, 1e-9)) + 1))
        except Exception as e:  # noqa: BLE001
            record_failure(failed, case, name, e, "time_providers")
            continue
        calls[name] = n
    samples = {name: [] for name in calls}
    for _ in range(reps):
        for name in list(calls):
            fn, n = fns[name], calls[name]
            try:
                sync(device)
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                sync(device)
            except Exception as e:  # noqa: BLE001
                record_failure(failed, case, name, e, "time_providers")
                del calls[name], samples[name]
                continue
            samples[name].append((time.perf_counter() - t0) / n)
    return {name: _quantiles(v) for name, v in samples.items()}


#: do_bench rounds per provider, interleaved, and the milliseconds each round samples.
DO_BENCH_ROUNDS, DO_BENCH_ROUND_MS = 4, 25


def _time_do_bench(do_bench, fns, failed, case) -> Dict[str, Dict[str, float]]:
    """do_bench in rounds, the providers taking turns (``DO_BENCH_ROUNDS`` rounds of
    ``DO_BENCH_ROUND_MS``, as much GPU time as one default do_bench call): a GPU's clocks
    drift over a run (heat, power), and one provider timed wholly after another would carry
    all of the drift. Quantiles over the pooled single-call times."""
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for r in range(DO_BENCH_ROUNDS):
        for name in list(samples):
            try:
                ms = do_bench(fns[name], warmup=25 if r == 0 else 5, rep=DO_BENCH_ROUND_MS, return_mode="all")
            except Exception as e:  # noqa: BLE001 - recorded, not raised
                record_failure(failed, case, name, e, "time_providers")
                del samples[name]
                continue
            samples[name].extend(t * 1e-3 for t in ms)
    return {name: _quantiles(v) for name, v in samples.items()}


def record_failure(failed: list, case: str, name: str, e: BaseException, who: str) -> None:
    text = str(e).strip()
    msg = f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"
    failed.append({"case": case, "provider": name, "error": msg})
    print(f"{who}: {case}, {name} failed, left out: {msg}", file=sys.stderr, flush=True)


def drop_failing(fns: Dict[str, Callable[[], object]], failed: list, case: str, who: str) -> Dict[str, Callable[[], object]]:
    """The functions whose first call succeeds; each other one goes to ``failed`` (a list the
    caller keeps in ``Results.env["failed_providers"]``) with its error, and to stderr. A GPU
    run is rare: one provider that fails must not cost the others' numbers."""
    ok = {}
    for name, fn in fns.items():
        try:
            fn()
            ok[name] = fn
        except Exception as e:  # noqa: BLE001 - recorded and reported, not raised
            record_failure(failed, case, name, e, who)
    return ok


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (a count of repetitions or models)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def device_arg(text: str) -> str:
    """argparse type: cpu, cuda or cuda:N."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"the benchmarks run on cpu or cuda, got {text!r}")
    return text


def check_out_dir(parser: argparse.ArgumentParser, out_dir: Optional[str]) -> None:
    """Before any timing: the results folder can be made and written (a run of minutes is
    not lost to a typo in --out at the end)."""
    path = out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        parser.error(f"--out {path}: cannot write there ({e.strerror or e})")


def select_device(name: str) -> Optional[str]:
    """The device to time on: under torchrun, ``cuda`` means this rank's GPU (LOCAL_RANK),
    made current. None (after saying why on stderr) when CUDA is asked for but absent."""
    if not name.startswith("cuda"):
        return name
    if not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU", file=sys.stderr)
        return None
    if "LOCAL_RANK" in os.environ:
        name = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    index = torch.device(name).index
    # set_device needs an index: plain "cuda" (one process) is the current GPU, left as it is.
    torch.cuda.set_device(torch.cuda.current_device() if index is None else index)
    return name


def mm_fn(m: int, k: int, n: int, dtype=torch.float32, device: str = "cpu") -> Callable[[], object]:
    """torch.mm (m, k) x (k, n) into a preallocated output: 2*m*k*n flops a call. Time it
    among the providers (interleaved) where the machine's speed drifts during a run."""
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    out = torch.empty(m, n, dtype=dtype, device=device)
    return lambda: torch.mm(a, b, out=out)


def mm_gflops(m: int, k: int, n: int, dtype=torch.float32, device: str = "cpu", reps: int = 7) -> float:
    """The machine's product ceiling at one shape: torch.mm into a preallocated output."""
    t = time_providers({"mm": mm_fn(m, k, n, dtype, device)}, device, reps=reps)["mm"]["y50"]
    return 2.0 * m * k * n / t / 1e9


def copy_gbps(device: str = "cpu", mbytes: float = 64, reps: int = 7) -> float:
    """The machine's memory ceiling: dst.copy_(src) on ``mbytes`` of float32, read + write.
    64 MB leaves the caches; a smaller copy gives the ceiling of the cache level that holds it."""
    src = torch.randn(max(1, int(mbytes * (1 << 20)) // 4), device=device)
    dst = torch.empty_like(src)
    t = time_providers({"copy": lambda: dst.copy_(src)}, device, reps=reps)["copy"]["y50"]
    return 2.0 * src.numel() * 4 / t / 1e9


def _loadavg() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _proc_stat() -> Optional[List[int]]:
    try:
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def _cpu_busy_seconds() -> Optional[float]:
    """CPU seconds the whole machine has spent busy (all processes, all cores), from /proc/stat;
    steal (time the hypervisor gave our virtual CPUs to another guest) not included."""
    fields = _proc_stat()
    if fields is None:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:7]) - idle) / os.sysconf("SC_CLK_TCK")


def _steal_seconds() -> Optional[float]:
    fields = _proc_stat()
    return fields[7] / os.sysconf("SC_CLK_TCK") if fields is not None and len(fields) > 7 else None


class OtherLoad:
    """How much of the CPUs other processes used while we measured: busy time of the
    whole machine less our own CPU time, over wall time times cores. On a shared machine
    a few tens of percent already skews short multi-threaded calls, whose threads then
    wait for each other at every barrier."""

    def __init__(self):
        self.t0, self.busy0, self.own0, self.steal0 = time.perf_counter(), _cpu_busy_seconds(), self._own(), _steal_seconds()

    @staticmethod
    def _own() -> float:
        """CPU seconds of this process and its children (torch.compile's worker pool too)."""
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system  # children_*: those already reaped
        try:
            parent, cpu = {}, {}
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                parent[int(pid)] = int(fields[1])
                cpu[int(pid)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            me = os.getpid()
            for pid in cpu:
                p = parent.get(pid)
                while p and p != me:
                    p = parent.get(p)
                if p == me:
                    own += cpu[pid]
        except OSError:
            pass
        return own

    def fraction(self) -> Optional[float]:
        busy = _cpu_busy_seconds()
        if busy is None or self.busy0 is None:
            return None
        wall = time.perf_counter() - self.t0
        other = (busy - self.busy0) - (self._own() - self.own0)
        return round(max(0.0, other) / (wall * (os.cpu_count() or 1)), 3) if wall > 0 else None

    def steal_fraction(self) -> Optional[float]:
        """Share of our virtual CPUs' time the hypervisor gave to other guests (a busy host)."""
        steal = _steal_seconds()
        wall = time.perf_counter() - self.t0
        if steal is None or self.steal0 is None or wall <= 0:
            return None
        return round((steal - self.steal0) / (wall * (os.cpu_count() or 1)), 3)


def wait_until_quiet(max_busy: float = 0.1, timeout_s: float = 300.0, window_s: float = 3.0) -> Optional[float]:
    """Wait (at most ``timeout_s``) until the machine's CPUs are at most ``max_busy``
    busy over a ``window_s`` window, before timing on a shared machine. Returns the last
    busy fraction seen (None where /proc/stat is unreadable)."""
    deadline = time.monotonic() + timeout_s
    while True:
        b0 = _cpu_busy_seconds()
        if b0 is None:
            return None
        time.sleep(window_s)
        busy = (_cpu_busy_seconds() - b0) / (window_s * (os.cpu_count() or 1))
        if busy <= max_busy or time.monotonic() >= deadline:
            return round(busy, 3)


#: Above this share of the CPUs used by other processes a CPU run's times are not to be trusted.
NOISY_OTHER_LOAD = 0.1


def environment(device: str) -> dict:
    import aiaas_fast

    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "device": device,
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "aiaas_fast": aiaas_fast.build_info(),
        # Another process on a shared machine slows every provider; the load says how busy it was.
        "loadavg_start": _loadavg(),
        "timer": "triton.testing.do_bench" if device.startswith("cuda") and _do_bench() else "interleaved blocks (time.perf_counter)",
        "rank": int(os.environ.get("RANK", 0)),
        "world_size": int(os.environ.get("WORLD_SIZE", 1)),
    }


class Results:
    """Rows of (kernel, provider, mode, metric, unit, x, y50, y20, y80, config, ...), written
    to benchmarks/results/<name>-<device>-<date>T<HHMM>[-rank<r>].json and .md."""

    def __init__(self, name: str, device: str):
        self.name, self.device = name, device
        self.env = environment(device)
        self.env["benchmark"] = name  # summarize.py refuses to pool different benchmarks
        self._other_load = OtherLoad()
        self.rows: List[dict] = []
        self.tables: List[str] = []

    def add(self, **row) -> None:
        self.rows.append({"device_name": self.env["device_name"], "timestamp": self.env["date"],
                          "version": self.env["aiaas_fast"]["version"], **row})

    def table(self, title: str, header: List[str], lines: List[List[str]]) -> None:
        widths = [max([len(h), *(len(l[i]) for l in lines)]) for i, h in enumerate(header)]
        fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
        text = "\n".join([f"### {title}", "", fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                          *(fmt(l) for l in lines), ""])
        self.tables.append(text)
        print(text, flush=True)

    def noise_warning(self) -> str:
        return _noise_warning(self.env)

    def write(self, out_dir: Optional[str]) -> str:
        out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
        os.makedirs(out_dir, exist_ok=True)
        kind = "cuda" if self.device.startswith("cuda") else "cpu"
        stem = f"{self.name}-{kind}-{self.env['date'][:16].replace(':', '')}"  # one file per run, none overwritten
        if "RANK" in os.environ:  # under torchrun every rank writes its own file
            stem += f"-rank{self.env['rank']}"
        self.env["loadavg_end"] = _loadavg()
        self.env["other_processes_cpu_fraction"] = self._other_load.fraction()
        self.env["steal_cpu_fraction"] = self._other_load.steal_fraction()
        base = os.path.join(out_dir, stem)
        with open(base + ".json", "w") as f:
            json.dump({"environment": self.env, "rows": self.rows}, f, indent=1)
        env = self.env
        timing = ("Times are do_bench medians of single calls [20th-80th percentile]" if "do_bench" in env["timer"]
                  else "Times are medians of interleaved repeated blocks [20th-80th percentile]")
        warning = self.noise_warning()
        header = (f"# {self.name}: {env['device_name']}, {env['threads']} threads, torch {env['torch']}, "
                  f"aiaas_fast {env['aiaas_fast']['version']} ({env['aiaas_fast']['cpu_isa']} CPU kernels), {env['date']}\n\n"
                  f"Timer: {env['timer']}. Load average (1, 5, 15 min) at start {env['loadavg_start']}, "
                  f"at end {env['loadavg_end']}; other processes used {env['other_processes_cpu_fraction']} "
                  f"of the CPUs during the run, hypervisor steal {env['steal_cpu_fraction']}.\n\n" + (warning + "\n\n" if warning else "")
                  + f"{timing}; ratio = reference time / provider time (> 1: faster than the reference).\n\n")
        failed = env.get("failed_providers") or []
        failures = "".join(f"- {f['case']}, {f['provider']}: {f['error']}\n" for f in failed)
        with open(base + ".md", "w") as f:
            f.write(header + "\n".join(self.tables) + (f"\n### Failed, left out of the tables\n\n{failures}" if failed else ""))
        return base


def _noise_warning(env: dict) -> str:
    frac = (env.get("other_processes_cpu_fraction") or 0.0) + (env.get("steal_cpu_fraction") or 0.0)
    if env["device"].startswith("cuda") or frac <= NOISY_OTHER_LOAD:
        return ""
    return (f"**WARNING: other processes or guests took {frac:.0%} of the CPUs during this run; its times "
            "are not trustworthy (rerun on a quiet machine, e.g. with --wait-quiet).**")


def fmt_time(seconds: float) -> str:
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"
