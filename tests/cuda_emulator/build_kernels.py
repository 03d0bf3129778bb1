"""Builds csrc/kernels/cuda's element-wise and reduction kernels as a CPU shared library
with the CUDA stand-in of runtime.h, for tests/test_cuda_kernels_emulated.py.

Each kernel file is compiled as C++ by the host compiler after one rewrite: every launch
``kernel<<<grid, block, smem, stream>>>(args)`` becomes ``::emu::Launch(grid, block, smem,
stream).run(kernel, args)``. The kernel code itself is compiled as written. With
``asan=True`` (the default) it is built with AddressSanitizer and UndefinedBehaviorSanitizer,
so the process that loads it must start with libasan preloaded (``asan_preload()``).

    python tests/cuda_emulator/build_kernels.py          # builds, prints the library's path
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
KERNELS = os.path.join(ROOT, "csrc", "kernels", "cuda")
# The kernel files this covers (the GEMM files, CUTLASS on tensor cores, are not emulated),
# and the emulator's own test kernels.
SOURCES = [os.path.join(KERNELS, name) for name in ("linear_relu.cu", "mse_loss.cu", "adam.cu")]
SOURCES.append(os.path.join(HERE, "selftest.cu"))
LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^;{}]*?>)?)\s*<<<(.*?)>>>\s*\(", re.S)


def compiler() -> Optional[str]:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def cuda_include() -> Optional[str]:
    """A folder with the CUDA runtime headers (cuda_runtime_api.h, cuda_bf16.h): the toolkit's."""
    candidates = []
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.join(os.path.dirname(os.path.realpath(nvcc)), "..", "include"))
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "include"))
    candidates += ["/usr/local/cuda/include"]
    for d in candidates:
        if os.path.isfile(os.path.join(d, "cuda_runtime_api.h")) and os.path.isfile(os.path.join(d, "cuda_bf16.h")):
            return os.path.abspath(d)
    return None


def asan_preload(cxx: Optional[str] = None) -> Optional[str]:
    """The AddressSanitizer runtime a process must preload to load the sanitized library."""
    cxx = cxx or compiler()
    if not cxx:
        return None
    out = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True, text=True, check=False).stdout.strip()
    return out if os.path.isabs(out) and os.path.exists(out) else None


def rewrite_launches(source: str) -> str:
    rewritten, count = LAUNCH.subn(lambda m: f"::emu::Launch({m.group(2)}).run({m.group(1)}, ", source)
    if "<<<" in rewritten:
        raise RuntimeError("a kernel launch build_kernels.py cannot rewrite: " + rewritten[rewritten.index("<<<") - 80:][:160])
    return rewritten


def build(asan: bool = True, out_dir: Optional[str] = None) -> str:
    """Compiles (or reuses, keyed by every input's content) and returns the library's path."""
    cxx, include = compiler(), cuda_include()
    if not cxx:
        raise RuntimeError("no C++ compiler (g++ or c++; set CXX)")
    if not include:
        raise RuntimeError("no CUDA runtime headers (cuda_runtime_api.h, cuda_bf16.h): set CUDA_HOME or NVCC")
    flags = ["-std=c++17", "-O1", "-g", "-fPIC", "-pthread", "-Wall", "-Wno-unknown-pragmas",
             "-I", os.path.join(ROOT, "csrc"), "-I", HERE, "-isystem", include]
    if asan:
        flags += ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
    digest = hashlib.sha256(" ".join([cxx] + flags).encode())
    kernel_headers = os.path.join(ROOT, "csrc", "kernels")
    for folder, names in ((KERNELS, sorted(os.listdir(KERNELS))), (kernel_headers, sorted(os.listdir(kernel_headers))),
                          (HERE, ["runtime.h", "runtime.cpp", "api.cpp", "selftest.cu", "build_kernels.py"])):
        for name in names:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                digest.update(path.encode() + open(path, "rb").read())
    out_dir = out_dir or os.path.join(ROOT, "build", "cuda-emulator", digest.hexdigest()[:16] + ("-asan" if asan else ""))
    lib = os.path.join(out_dir, "libaiaas_fast_cuda_emulated.so")
    if os.path.exists(lib):
        return lib
    os.makedirs(out_dir, exist_ok=True)
    units = []
    for source in SOURCES:
        unit = os.path.join(out_dir, os.path.basename(source).replace(".cu", ".emulated.cpp"))
        with open(unit, "w") as f, open(source) as src:
            f.write(f'#line 1 "{source}"\n' + rewrite_launches(src.read()))
        units.append(unit)
    units += [os.path.join(HERE, "runtime.cpp"), os.path.join(HERE, "api.cpp")]
    procs = []
    for unit in units:
        obj = os.path.join(out_dir, os.path.basename(unit) + ".o")
        cmd = [cxx, *flags, "-include", os.path.join(HERE, "runtime.h"), "-c", unit, "-o", obj]
        procs.append((unit, obj, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    failures = []
    for unit, _, p in procs:
        log = p.communicate()[0]
        if p.returncode != 0:
            failures.append(f"{unit}:\n{log}")
    if failures:
        raise RuntimeError("the emulated kernels did not compile:\n" + "\n".join(failures))
    tmp = lib + f".{os.getpid()}.tmp"
    link = subprocess.run([cxx, *flags, "-shared", "-o", tmp] + [o for _, o, _ in procs],
                          capture_output=True, text=True, check=False)
    if link.returncode != 0:
        raise RuntimeError("the emulated kernels did not link:\n" + link.stdout + link.stderr)
    os.replace(tmp, lib)  # atomic: a concurrent build finds a whole library or none
    return lib


if __name__ == "__main__":
    try:
        print(build(asan="--no-asan" not in sys.argv))
    except RuntimeError as e:
        sys.exit(f"build_kernels.py: {e}")
