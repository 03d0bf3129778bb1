"""The installed CMake package works for another project: examples/cpp_consumer is
configured with find_package(aiaas_fast), built, run, and checks the ops against ATen."""
import os
import shutil
import subprocess

import pytest
import torch

import aiaas_fast

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "cpp_consumer")


def _run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


@pytest.mark.slow
def test_cpp_consumer_builds_links_and_passes(tmp_path):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    prefix = f"{aiaas_fast.cmake_prefix_path};{torch.utils.cmake_prefix_path}"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run([cmake, "-S", EXAMPLE, "-B", str(tmp_path), *generator, f"-DCMAKE_PREFIX_PATH={prefix}",
          "-DCMAKE_BUILD_TYPE=Release"])
    _run([cmake, "--build", str(tmp_path), "--parallel", "2"])
    exe = os.path.join(str(tmp_path), "consumer")
    r = _run([exe])
    assert "aiaas_fast C++ consumer: all checks passed" in r.stdout
    assert "MISMATCH" not in r.stdout
    assert r.stdout.count(" ok") == 12, r.stdout


def test_cmake_package_version_matches():
    path = os.path.join(aiaas_fast.cmake_prefix_path, "aiaas_fast", "aiaas_fastConfigVersion.cmake")
    with open(path) as f:
        assert f'set(PACKAGE_VERSION "{aiaas_fast.__version__}")' in f.read()
