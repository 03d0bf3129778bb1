"""Shared benchmark machinery: interleaved repeated timing with quantiles, the machine's
ceilings measured in the same run, and result files (JSON rows + a Markdown table).

Every benchmark in this folder times plain PyTorch and aiaas_fast in one process, one
round-robin over the providers per repetition, so drift on a shared machine hits all
providers alike; it reports the median with the 20th and 80th percentiles.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import statistics
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


def time_providers(fns: Dict[str, Callable[[], object]], device: str = "cpu", reps: int = 9,
                   block_seconds: float = 0.05, warmup: int = 3) -> Dict[str, Dict[str, float]]:
    """Seconds per call of each function: ``reps`` blocks per provider, interleaved, each
    block long enough (``block_seconds``) that timer and loop overhead vanish."""
    calls = {}
    for name, fn in fns.items():
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
        calls[name] = n
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            n = calls[name]
            sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            sync(device)
            samples[name].append((time.perf_counter() - t0) / n)
    return {name: _quantiles(v) for name, v in samples.items()}


def mm_gflops(m: int, k: int, n: int, dtype=torch.float32, device: str = "cpu", reps: int = 7) -> float:
    """The machine's product ceiling at one shape: torch.mm into a preallocated output."""
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    out = torch.empty(m, n, dtype=dtype, device=device)
    t = time_providers({"mm": lambda: torch.mm(a, b, out=out)}, device, reps=reps)["mm"]["y50"]
    return 2.0 * m * k * n / t / 1e9


def copy_gbps(device: str = "cpu", mbytes: int = 64, reps: int = 7) -> float:
    """The machine's memory ceiling: dst.copy_(src) on ``mbytes`` of float32, read + write."""
    src = torch.randn(mbytes * (1 << 20) // 4, device=device)
    dst = torch.empty_like(src)
    t = time_providers({"copy": lambda: dst.copy_(src)}, device, reps=reps)["copy"]["y50"]
    return 2.0 * src.numel() * 4 / t / 1e9


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
        "rank": int(os.environ.get("RANK", 0)),
        "world_size": int(os.environ.get("WORLD_SIZE", 1)),
    }


class Results:
    """Rows of (kernel, provider, mode, metric, unit, x, y50, y20, y80, config, ...), written
    to benchmarks/results/<name>-<device>-<date>T<HHMM>[-rank<r>].json and .md."""

    def __init__(self, name: str, device: str):
        self.name, self.device = name, device
        self.env = environment(device)
        self.rows: List[dict] = []
        self.tables: List[str] = []

    def add(self, **row) -> None:
        self.rows.append({"device_name": self.env["device_name"], "timestamp": self.env["date"],
                          "version": self.env["aiaas_fast"]["version"], **row})

    def table(self, title: str, header: List[str], lines: List[List[str]]) -> None:
        widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(header)]
        fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
        text = "\n".join([f"### {title}", "", fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                          *(fmt(l) for l in lines), ""])
        self.tables.append(text)
        print(text, flush=True)

    def write(self, out_dir: Optional[str]) -> str:
        out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
        os.makedirs(out_dir, exist_ok=True)
        kind = "cuda" if self.device.startswith("cuda") else "cpu"
        stem = f"{self.name}-{kind}-{self.env['date'][:16].replace(':', '')}"  # one file per run, none overwritten
        if self.env["world_size"] > 1:
            stem += f"-rank{self.env['rank']}"
        base = os.path.join(out_dir, stem)
        with open(base + ".json", "w") as f:
            json.dump({"environment": self.env, "rows": self.rows}, f, indent=1)
        env = self.env
        header = (f"# {self.name}: {env['device_name']}, {env['threads']} threads, torch {env['torch']}, "
                  f"aiaas_fast {env['aiaas_fast']['version']} ({env['aiaas_fast']['cpu_isa']} CPU kernels), {env['date']}\n\n"
                  "Times are medians of interleaved repeated blocks [20th-80th percentile]; "
                  "ratio = reference time / provider time (> 1: faster than the reference).\n\n")
        with open(base + ".md", "w") as f:
            f.write(header + "\n".join(self.tables))
        return base


def fmt_time(seconds: float) -> str:
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"
