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
N_CHECKS = 18


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
