"""Builds csrc/kernels/cuda's element-wise and reduction kernels as a CPU shared library
with the CUDA stand-in of runtime.h, for tests/test_cuda_kernels_emulated.py.

Each kernel file is compiled as C++ by the host compiler after one rewrite: every launch
``kernel<<<grid, block, smem, stream>>>(args)`` becomes ``::emu::Launch(grid, block, smem,
stream).run(kernel, args)``. The kernel code itself is compiled as written. Two builds:
``asan`` (the default) with AddressSanitizer and UndefinedBehaviorSanitizer, which the loading
process must preload (``asan_preload()``); ``race``, whose kernel code reports every load and
store to the data-race detector of race.cpp.

    python tests/cuda_emulator/build_kernels.py [asan|race]    # builds, prints the library's path
"""
from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
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
    """The host compiler's command (CXX may carry a launcher: "ccache g++")."""
    cxx = os.environ.get("CXX")
    if cxx:
        return cxx if shutil.which(shlex.split(cxx)[0]) else None
    return shutil.which("g++") or shutil.which("c++")


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
    out = subprocess.run(shlex.split(cxx) + ["-print-file-name=libasan.so"], capture_output=True, text=True,
                         check=False).stdout.strip()
    return out if os.path.isabs(out) and os.path.exists(out) else None


BOUNDS = re.compile(r"__launch_bounds__\(([^,()]+(?:\([^()]*\))?)[^)]*\)\s*([A-Za-z_]\w*)\s*\(")


def rewrite_launches(source: str) -> str:
    """Each launch as a call the host compiler takes; a kernel with __launch_bounds__ passes
    its maximum threads per block on, for the launch to check."""
    bounds = {name: expr.strip() for expr, name in BOUNDS.findall(source)}

    def launch(m):
        kernel, config = m.group(1), m.group(2)
        name = kernel.split("<")[0].split("::")[-1]
        check = f".bounds({bounds[name]})" if name in bounds else ""
        return f"::emu::Launch({config}){check}.run({kernel}, "

    rewritten = LAUNCH.sub(launch, source)
    rewritten = re.sub(r"(\.run\([^;]*?), (\s*)\)", r"\1\2)", rewritten)  # a kernel without arguments
    if "<<<" in rewritten:
        raise RuntimeError("a kernel launch build_kernels.py cannot rewrite: " + rewritten[rewritten.index("<<<") - 80:][:160])
    return rewritten


MODES = {
    # every unit with AddressSanitizer and UndefinedBehaviorSanitizer: the loading process
    # preloads libasan (asan_preload())
    "asan": (["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"], []),
    # the kernel units with -fsanitize=thread instrumentation, reported to race.cpp (no libtsan,
    # nothing to preload)
    "race": ([], ["-fsanitize=thread"]),
}


def build(mode: str = "asan", out_dir: Optional[str] = None) -> str:
    """Compiles (or reuses, keyed by every input's content) and returns the library's path."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    cxx, include = compiler(), cuda_include()
    if not cxx:
        raise RuntimeError("no C++ compiler (g++ or c++; set CXX)")
    if not include:
        raise RuntimeError("no CUDA runtime headers (cuda_runtime_api.h, cuda_bf16.h): set CUDA_HOME or NVCC")
    cxx = shlex.split(cxx)  # CXX="ccache g++"
    flags = ["-std=c++17", "-O1", "-g", "-fPIC", "-pthread", "-Wall", "-Wno-unknown-pragmas",
             "-I", os.path.join(ROOT, "csrc"), "-I", HERE, "-isystem", include,
             # bias_relu's grid-stride loop runs past 65536 blocks (16.7M elements) on a GPU; with
             # 3 blocks here the checks' shapes run it (and its one-pass form up to 768 elements).
             "-DAIAAS_FAST_BIAS_RELU_MAX_BLOCKS=3"]
    every_unit, kernel_units = MODES[mode]
    version = subprocess.run(cxx + ["--version"], capture_output=True, text=True, check=False).stdout
    digest = hashlib.sha256(" ".join(cxx + flags + every_unit + kernel_units).encode() + version.encode())
    kernel_headers = os.path.join(ROOT, "csrc", "kernels")
    for folder, names in ((KERNELS, sorted(os.listdir(KERNELS))), (kernel_headers, sorted(os.listdir(kernel_headers))),
                          (HERE, sorted(os.listdir(HERE)))):
        for name in names:
            path = os.path.join(folder, name)
            if os.path.isfile(path) and not name.endswith(".pyc"):
                digest.update(path.encode() + open(path, "rb").read())
    out_dir = out_dir or os.path.join(ROOT, "build", "cuda-emulator", f"{digest.hexdigest()[:16]}-{mode}")
    lib = os.path.join(out_dir, "libaiaas_fast_cuda_emulated.so")
    if os.path.exists(lib):
        return lib
    # Built in a folder of its own, then renamed into place: concurrent builds never share files.
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    work = tempfile.mkdtemp(prefix="building-", dir=os.path.dirname(out_dir))
    try:
        procs = []
        for source in SOURCES + [os.path.join(HERE, n) for n in ("runtime.cpp", "api.cpp", "race.cpp", "device_memory.cpp")]:
            kernel = source in SOURCES
            unit = os.path.join(work, os.path.basename(source).replace(".cu", ".emulated.cpp"))
            if kernel:
                with open(unit, "w") as f, open(source) as src:
                    f.write(f'#line 1 "{source}"\n' + rewrite_launches(src.read()))
            else:
                unit = source
            obj = os.path.join(work, os.path.basename(unit) + ".o")
            cmd = cxx + flags + every_unit + (kernel_units if kernel else []) + [
                "-include", os.path.join(HERE, "runtime.h"), "-c", unit, "-o", obj]
            procs.append((unit, obj, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
        failures = []
        for unit, _, p in procs:
            log = p.communicate()[0]
            if p.returncode != 0:
                failures.append(f"{unit}:\n{log}")
        if failures:
            raise RuntimeError("the emulated kernels did not compile:\n" + "\n".join(failures))
        # -Bsymbolic: the library's own cudaGetLastError (runtime.cpp), even in a process where a
        # CUDA build of torch has loaded the real libcudart first.
        link = subprocess.run(cxx + flags + every_unit + ["-shared", "-Wl,-Bsymbolic", "-o",
                                                          os.path.join(work, os.path.basename(lib))] +
                              [o for _, o, _ in procs], capture_output=True, text=True, check=False)
        if link.returncode != 0:
            raise RuntimeError("the emulated kernels did not link:\n" + link.stdout + link.stderr)
        os.makedirs(out_dir, exist_ok=True)
        os.replace(os.path.join(work, os.path.basename(lib)), lib)  # atomic: a whole library or none
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return lib


if __name__ == "__main__":
    try:
        print(build(sys.argv[1] if len(sys.argv) > 1 else "asan"))
    except (RuntimeError, ValueError) as e:
        sys.exit(f"build_kernels.py: {e}")
