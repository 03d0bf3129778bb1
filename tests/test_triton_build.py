"""CI's Triton build check: every Triton kernel compiles to a cubin for sm_90 and sm_80
through Triton's real compiler, without a GPU (scripts/check_triton_kernels.py). The
interpreter runs the kernels' numerics on the CPU; this catches what only the compiler
refuses. Skipped only where Triton is not installed."""
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "check_triton_kernels.py")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_every_triton_kernel_compiles_for_hopper_and_ampere():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, SCRIPT, "--quick"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for kernel in ("linear_relu._matmul_kernel", "mse_loss._mse_kernel", "mse_loss._sum_kernel", "adam._adam_kernel",
                   "fused_mlp._mlp_kernel", "fused_mlp._sum_rows_kernel"):
        for arch in ("sm_90", "sm_80"):
            assert f"{arch} {kernel}[" in out, f"{kernel} was not compiled for {arch}\n{out}"
    assert "FAIL" not in out, out


def test_a_kernel_that_does_not_compile_is_reported(tmp_path):
    # The check must be able to fail: a kernel Triton's compiler refuses (a block of 12
    # elements: blocks are powers of two) is reported with its error, not passed.
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    code = f"""
import sys; sys.path.insert(0, {os.path.join(ROOT, 'scripts')!r})
import types, triton, triton.language as tl, check_triton_kernels as c
@triton.jit
def bad(a_ptr, B: tl.constexpr):
    r = tl.arange(0, B)
    x = tl.load(a_ptr + r[:, None] * B + r[None, :])
    tl.store(a_ptr + r[:, None] * B + r[None, :], tl.dot(x, x))
mod = types.ModuleType("aiaas_fast.triton.bad"); mod.bad = bad
sys.modules["aiaas_fast.triton.bad"] = mod
label, _, err, _ = c.compile_case(c.Case("bad", "bad", {{"a_ptr": "*fp32"}}, {{"B": 12}}, 4, 2, 90))
print("ERROR:", err)
"""
    script = tmp_path / "bad_kernel.py"  # triton.jit reads the kernel's source from its file
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert "ERROR:" in proc.stdout and "ERROR: None" not in proc.stdout, proc.stdout + proc.stderr
    assert "power of 2" in proc.stdout, proc.stdout


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_adam_uses_16_byte_accesses_where_its_tensors_are_aligned():
    # The Adam kernel reaches its tensors through a table of addresses, which Triton cannot
    # see are aligned: without its ALIGNED hint every access is 4 bytes wide. The hint is easy
    # to lose (set on a function's result it vanishes when the call is inlined): check the PTX.
    code = """
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from aiaas_fast.triton import adam
types = {"addr_ptr": "*i64", "numel_ptr": "*i64", "scalar_ptr": "*fp32", "blk_tensor_ptr": "*i32",
         "blk_index_ptr": "*i32", "T": "i32"}
for aligned in (True, False):
    consts = dict(P_CODE=0, S_CODE=0, WD_MODE=0, AMSGRAD=False, LERP_LOW=True, ALIGNED=aligned, BLOCK=adam.BLOCK)
    fn = adam._adam_kernel
    sig = {n: "constexpr" if n in consts else types.get(n, "fp32") for n in fn.arg_names}
    ptx = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": 4}).asm["ptx"]
    print(aligned, len(re.findall(r"ld\\.global\\.v4\\.b32", ptx)), len(re.findall(r"st\\.global\\.v4\\.b32", ptx)))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    counts = {line.split()[0]: tuple(map(int, line.split()[1:])) for line in proc.stdout.splitlines()}
    # 2048 elements over 128 threads: 16 per thread, four 16-byte loads of each of p, g, m, v.
    assert counts["True"][0] >= 16 and counts["True"][1] >= 12, proc.stdout
    assert counts["False"] == (0, 0), proc.stdout
