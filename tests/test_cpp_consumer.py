"""The installed CMake package works for another project: examples/cpp_consumer is
configured with find_package(aiaas_fast), built, run, and checks the ops against ATen;
and find_package sees the package's version."""
import os
import shutil
import subprocess

import pytest
import torch

import aiaas_fast

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "cpp_consumer")
PACKAGE_DIR = os.path.join(aiaas_fast.cmake_prefix_path, "aiaas_fast")
SUCCESS = "aiaas_fast C++ consumer: all checks passed"
# One line per check in main.cpp; a check that silently stops running must fail this test.
N_CHECKS = 19


def _cmake():
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not on PATH (pip install cmake ninja): cannot build a C++ consumer")
    return cmake


def _run(cmd, what, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert r.returncode == 0, (f"{what} failed ({r.returncode}): {' '.join(cmd)}\n"
                               f"--- stdout\n{r.stdout[-6000:]}\n--- stderr\n{r.stderr[-6000:]}")
    return r


def _configure(cmake, source, build):
    # Both prefixes, as the README says; Ninja when there is one (the default
    # generator works too, only slower to start).
    prefix = f"{aiaas_fast.cmake_prefix_path};{torch.utils.cmake_prefix_path}"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    return _run([cmake, "-S", str(source), "-B", str(build), *generator, f"-DCMAKE_PREFIX_PATH={prefix}",
                 "-DCMAKE_BUILD_TYPE=Release"], "cmake configure")


@pytest.mark.slow
def test_cpp_consumer_builds_links_and_passes(tmp_path):
    cmake = _cmake()
    configured = _configure(cmake, EXAMPLE, tmp_path)
    assert f"Found aiaas_fast {aiaas_fast.__version__} " in configured.stdout, configured.stdout
    _run([cmake, "--build", str(tmp_path), "--parallel", "2"], "cmake --build")
    # Run with no LD_LIBRARY_PATH: the run-time paths linked in must find libaiaas_fast and libtorch.
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    r = _run([os.path.join(str(tmp_path), "consumer")], "the consumer", env=env)
    assert SUCCESS in r.stdout, r.stdout
    assert "MISMATCH" not in r.stdout, r.stdout
    assert sum(line.rstrip().endswith(" ok") for line in r.stdout.splitlines()) == N_CHECKS, r.stdout


def test_cmake_package_version_file_matches():
    path = os.path.join(PACKAGE_DIR, "aiaas_fastConfigVersion.cmake")
    assert os.path.isfile(path), f"find_package(aiaas_fast) could not report a version: {path} is missing"
    with open(path) as f:
        assert f'set(PACKAGE_VERSION "{aiaas_fast.__version__}")' in f.read()


@pytest.mark.slow
def test_find_package_checks_the_version(tmp_path):
    """find_package(aiaas_fast <version>) accepts this release's major.minor and refuses
    a later one, so a consumer that pins a version gets a clear configure error."""
    cmake = _cmake()
    major_minor = ".".join(aiaas_fast.__version__.split(".")[:2])
    src = tmp_path / "src"
    src.mkdir()
    (src / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.21)\n"
        "project(version_probe LANGUAGES CXX)\n"
        f"find_package(aiaas_fast {major_minor} CONFIG REQUIRED)\n"
        'message(STATUS "aiaas_fast_VERSION=${aiaas_fast_VERSION}")\n'
        "find_package(aiaas_fast 999.0 CONFIG QUIET)\n"
        'message(STATUS "later version found: ${aiaas_fast_FOUND}")\n')
    r = _configure(cmake, src, tmp_path / "build")
    assert f"aiaas_fast_VERSION={aiaas_fast.__version__}" in r.stdout, r.stdout
    assert "later version found: 0" in r.stdout, r.stdout


TORCH_CUDA = os.path.join(PACKAGE_DIR, "aiaas_fastTorchCuda.cmake")


def _probe_torch_cuda(cmake, tmp_path, *args, env=None):
    """Configures a project that includes the installed aiaas_fastTorchCuda.cmake (what the
    package runs before torch's config looks for CUDA) and reports what it decided."""
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.21)\n"
        "project(torch_cuda_probe LANGUAGES CXX)\n"
        f'include("{TORCH_CUDA}")\n'
        'if(TARGET torch::cudart)\n  message(STATUS "probe: stub torch::cudart")\nendif()\n'
        'message(STATUS "probe: root=${CUDA_TOOLKIT_ROOT_DIR}")\n')
    r = _run([cmake, "-S", str(src), "-B", str(tmp_path / "build"), *args], "cmake configure", env=env)
    root = [line.split("root=", 1)[1] for line in r.stdout.splitlines() if "probe: root=" in line]
    return "probe: stub torch::cudart" in r.stdout, root[0].strip() if root else None


def test_cuda_torch_without_a_toolkit_links_without_it(tmp_path):
    """A CUDA build of torch on a machine with no CUDA toolkit (the usual pip install without
    nvcc) made torch's config stop: "cannot find the CUDA libraries". The package now stands
    in the one CUDA target torch's own targets link, so a CPU-only build and its consumers go on."""
    assert os.path.isfile(TORCH_CUDA)
    stub, root = _probe_torch_cuda(_cmake(), tmp_path, "-DCMAKE_DISABLE_FIND_PACKAGE_CUDAToolkit=ON")
    assert stub and not root


def test_cuda_toolkit_behind_a_wrapper_script_is_found_at_its_root(tmp_path):
    """torch's config finds CUDA with the legacy FindCUDA, which took /usr/local for the root
    when nvcc on PATH was a wrapper script (/usr/local/bin/nvcc running the real one), and
    failed. The package hands it the root CMake's own search finds."""
    real = shutil.which("nvcc") or next((c for c in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(c)), None)
    if real is None:
        pytest.skip("no nvcc here: no CUDA toolkit to find")
    wrapper = tmp_path / "wrapper"
    wrapper.mkdir()
    (wrapper / "nvcc").write_text(f'#!/bin/sh\nexec "{real}" "$@"\n')
    (wrapper / "nvcc").chmod(0o755)
    env = dict(os.environ, PATH=f"{wrapper}{os.pathsep}{os.environ.get('PATH', '')}")
    stub, root = _probe_torch_cuda(_cmake(), tmp_path, env=env)
    assert not stub, "a toolkit is here: torch's own CUDA lookup must run"
    assert root and os.path.isfile(os.path.join(root, "bin", "nvcc")) and root != str(tmp_path), root
    assert os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")), root


@pytest.mark.slow
def test_find_package_refuses_another_torch_and_unknown_components(tmp_path):
    """libaiaas_fast matches one libtorch's ABI: a consumer that found another Torch first gets
    the reason, not link or run-time errors; a component we do not have is named."""
    cmake = _cmake()
    fake = tmp_path / "faketorch" / "share" / "cmake" / "Torch"
    fake.mkdir(parents=True)
    (fake / "TorchConfig.cmake").write_text("add_library(torch INTERFACE IMPORTED)\nset(Torch_FOUND TRUE)\n")
    (fake / "TorchConfigVersion.cmake").write_text(
        'set(PACKAGE_VERSION "1.0.0")\nset(PACKAGE_VERSION_COMPATIBLE TRUE)\n')
    src = tmp_path / "src"
    src.mkdir()
    (src / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.21)\n"
        "project(probe LANGUAGES CXX)\n"
        "find_package(Torch CONFIG REQUIRED)\n"
        "find_package(aiaas_fast CONFIG)\n"
        'message(STATUS "aiaas_fast found: ${aiaas_fast_FOUND}")\n')
    r = _run([cmake, "-S", str(src), "-B", str(tmp_path / "b1"), f"-DCMAKE_PREFIX_PATH={tmp_path / 'faketorch'};"
              f"{aiaas_fast.cmake_prefix_path}"], "cmake configure")
    out = " ".join((r.stdout + r.stderr).split())
    assert "aiaas_fast found: 0" in out and "was built against Torch" in out and "but Torch 1.0.0 was found" in out, out
    (src / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.21)\n"
        "project(probe LANGUAGES CXX)\n"
        "find_package(aiaas_fast CONFIG COMPONENTS gpu)\n")
    r = _configure(cmake, src, tmp_path / "b2")
    assert "aiaas_fast has no components (asked for 'gpu')" in " ".join((r.stdout + r.stderr).split())
