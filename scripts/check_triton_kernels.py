#!/usr/bin/env python3
"""Compiles every Triton kernel of aiaas_fast for the GPUs we target (Hopper sm_90, Ampere
sm_80) down to a cubin, on a machine without a GPU: the build check for the Triton backend.

CI runs the kernels under TRITON_INTERPRET=1, which checks their numerics but not that
Triton's compiler accepts them: the interpreter runs constructs the compiler refuses, and
compile time or register use can explode in ways the interpreter never shows. This runs
Triton's real pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas) for the kernels' autotuning
configurations and constexpr variants, in parallel, and fails on the first kernel that does
not compile.

    python scripts/check_triton_kernels.py [--quick] [--registers] [--jobs N]

``--quick``: one configuration per variant (what the test suite runs). ``--registers``:
also each kernel's registers and spills, from ptxas -v (Triton's own ptxas). Every line
gives the kernel's shared memory and its tensor-core instructions (tc=wgmma, mma or none, from
the PTX); a kernel that needs more shared memory than the architecture has fails, unless it is
one configuration of an autotuned kernel (autotuning skips those), and so does a 16-bit or TF32
product without tensor-core instructions, or a Hopper tile of 64 rows or more without wgmma.
Compiled kernels land in Triton's cache, so a second run of unchanged kernels takes seconds.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, NamedTuple

os.environ.pop("TRITON_INTERPRET", None)  # compile for real (read when aiaas_fast.triton is imported)


#: Shared memory a block may use (bytes): H100/H200 227 KB, A100 163 KB.
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


class Case(NamedTuple):
    module: str      # aiaas_fast.triton.<module>
    kernel: str      # its attribute name
    types: Dict[str, str]  # non-int arguments: Triton signature types ("*fp32", "fp32", ...)
    consts: Dict[str, object]
    warps: int
    stages: int
    arch: int
    autotuned: bool = False
    # As the JIT specializes a call on large aligned tensors (the benchmarks'): every pointer
    # 16-byte aligned and every int a multiple of 16. Those loads vectorize and pipeline, which
    # changes the code (and its shared memory) the compiler has to accept.
    aligned: bool = False
    ones: tuple = ()  # with aligned: the int arguments a real call passes as 1 (unit strides), constants then

    def label(self) -> str:
        shown = ",".join(f"{k}={v}" for k, v in self.consts.items())
        return (f"sm_{self.arch} {self.module}.{self.kernel}[{shown}] warps={self.warps} stages={self.stages}"
                + (" aligned" if self.aligned else ""))


def _configs(module: str, kernel: str):
    import importlib

    k = getattr(importlib.import_module(f"aiaas_fast.triton.{module}"), kernel)
    return [(c.kwargs, c.num_warps, c.num_stages) for c in getattr(k, "configs", [])]


def _untuned(module: str):
    """The one configuration a module's kernel runs with AIAAS_FAST_TRITON_AUTOTUNE=0 (what
    the GPU test run uses)."""
    import importlib

    old = os.environ.get("AIAAS_FAST_TRITON_AUTOTUNE")
    os.environ["AIAAS_FAST_TRITON_AUTOTUNE"] = "0"
    try:
        c = importlib.import_module(f"aiaas_fast.triton.{module}")._configs()[0]
    finally:
        if old is None:
            os.environ.pop("AIAAS_FAST_TRITON_AUTOTUNE")
        else:
            os.environ["AIAAS_FAST_TRITON_AUTOTUNE"] = old
    return c.kwargs, c.num_warps, c.num_stages


# Which strides are 1 in each mode's call (python/aiaas_fast/triton/linear_relu.py): forward
# x @ W^T, grad_x g @ W (mask out), grad_w and grad_b g^T @ x (mask out^T); C row-major.
UNIT_STRIDES = {
    "forward": ("stride_ak", "stride_bk", "stride_cn"),
    "grad_x": ("stride_ak", "stride_bn", "stride_mk", "stride_cn"),
    "grad_w": ("stride_am", "stride_bn", "stride_mm", "stride_cn"),
    "grad_b": ("stride_am", "stride_bn", "stride_mm", "stride_cn"),
}


def cases(quick: bool) -> List[Case]:
    out: List[Case] = []
    # linear_relu: one matrix-product kernel in four modes, four input types.
    mm_configs = _configs("linear_relu", "_matmul_kernel")
    modes = {
        "forward": dict(MASK_A=False, HAS_BIAS=True, RELU=True, ROWSUM=False, WRITE_C=True),
        "grad_x": dict(MASK_A=True, HAS_BIAS=False, RELU=False, ROWSUM=False, WRITE_C=True),
        "grad_w": dict(MASK_A=True, HAS_BIAS=False, RELU=False, ROWSUM=True, WRITE_C=True),
        "grad_b": dict(MASK_A=True, HAS_BIAS=False, RELU=False, ROWSUM=True, WRITE_C=False),
    }
    inputs = {"bf16": "tf32", "fp16": "tf32", "fp32": "ieee", "fp32-tf32": "tf32"}
    for arch in (90, 80):
        for mode, flags in modes.items():
            for dtype, precision in inputs.items():
                ty = dtype.split("-")[0]
                types = {"a_ptr": f"*{ty}", "b_ptr": f"*{ty}", "c_ptr": f"*{ty}", "mask_ptr": f"*{ty}",
                         "bias_ptr": f"*{ty}", "rowsum_ptr": "*fp32"}
                # Every configuration for the modes the benchmarks time, on Hopper; one otherwise.
                every = not quick and arch == 90 and dtype in ("bf16", "fp32") and mode in ("forward", "grad_w")
                for kw, warps, stages in (mm_configs if every else mm_configs[-1:]) + [_untuned("linear_relu")]:
                    consts = dict(flags, PRECISION=precision, UPCAST=False, **kw)
                    out.append(Case("linear_relu", "_matmul_kernel", types, consts, warps, stages, arch, True))
                # The benchmarks' shapes on Hopper (8192^3, 4096 x 1024 bf16): aligned, unit
                # strides as constants (as the JIT specializes them), so the loads pipeline.
                if arch == 90 and dtype == "bf16":
                    for kw, warps, stages in mm_configs if every else mm_configs[-1:]:
                        consts = dict(flags, PRECISION=precision, UPCAST=False, **kw)
                        out.append(Case("linear_relu", "_matmul_kernel", types, consts, warps, stages, arch, True,
                                        aligned=True, ones=UNIT_STRIDES[mode]))
    # mse_loss: the one-pass kernel per dtype and output, the block-sum kernel.
    for arch in (90, 80):
        for ty in ("fp32", "bf16", "fp16"):
            for grad, elems in ((True, False), (False, True)):
                types = {"x_ptr": f"*{ty}", "t_ptr": f"*{ty}", "grad_ptr": f"*{ty}", "elems_ptr": f"*{ty}",
                         "partial_ptr": "*fp32", "grad_scale": "fp32"}
                out.append(Case("mse_loss", "_mse_kernel", types, dict(WRITE_GRAD=grad, WRITE_ELEMS=elems, BLOCK=4096),
                                8, 3, arch))
            out.append(Case("mse_loss", "_sum_kernel", {"partial_ptr": "*fp32", "loss_ptr": f"*{ty}", "scale": "fp32"},
                            dict(BLOCK=1024), 4, 3, arch))
    # adam: parameter/state types, weight decay modes, amsgrad.
    adam_types = {"addr_ptr": "*i64", "numel_ptr": "*i64", "scalar_ptr": "*fp32", "blk_tensor_ptr": "*i32",
                  "blk_index_ptr": "*i32", **{k: "fp32" for k in ("beta2", "one_minus_beta2", "lerp_weight", "eps",
                                                                    "weight_decay", "decay", "sign")}}
    for arch in (90, 80):
        for p, s, wd, ams, aligned in ((0, 0, 0, False, True), (0, 0, 1, True, False), (1, 0, 2, False, True),
                                       (2, 0, 0, True, True), (1, 1, 2, False, False)):
            out.append(Case("adam", "_adam_kernel", adam_types, dict(P_CODE=p, S_CODE=s, WD_MODE=wd, AMSGRAD=ams,
                                                                     LERP_LOW=True, ALIGNED=aligned, BLOCK=2048), 4, 3, arch))
    # fused_mlp: each padded width, training and inference, IEEE and TF32 products.
    from aiaas_fast.triton import fused_mlp

    mlp_types = {"x_ptr": "*fp32", "y_ptr": "*fp32", "out_ptr": "*fp32", "w_addr_ptr": "*i64", "b_addr_ptr": "*i64",
                 "dims_ptr": "*i32", "relu_ptr": "*i32", "goff_ptr": "*i64", "scratch_ptr": "*fp32", "part_ptr": "*fp32",
                 "grad_scale": "fp32", "loss_scale": "fp32"}
    for arch in (90, 80):
        for d in (16, 32, 64, 128):  # the configurations autotuning tries at this width
            fits = [(c.kwargs, c.num_warps, c.num_stages) for c in fused_mlp._prune(fused_mlp._mlp_kernel.configs, {}, D=d)]
            fits.append(_untuned("fused_mlp"))  # last, so the quick check's fits[:1] stays the tuned one
            for train in (True, False):
                for precision in ("ieee", "tf32"):
                    every = not quick and arch == 90 and train and precision == "ieee"
                    for kw, warps, stages in (fits if every else fits[:1] + fits[-1:]):
                        consts = dict(D=d, HAS_BIAS=True, TRAIN=train, PRECISION=precision, **kw)
                        out.append(Case("fused_mlp", "_mlp_kernel", mlp_types, consts, warps, stages, arch, True))
        kw, warps, stages = _configs("fused_mlp", "_mlp_kernel")[0]  # a network without biases
        out.append(Case("fused_mlp", "_mlp_kernel", mlp_types,
                        dict(D=32, HAS_BIAS=False, TRAIN=True, PRECISION="ieee", **kw), warps, stages, arch, True))
        out.append(Case("fused_mlp", "_sum_rows_kernel", {"part_ptr": "*fp32"}, dict(BLOCK=1024),
                        4, 3, arch))
    assert fused_mlp.MAX_WIDTH == 128  # the widths above cover every D the kernel is launched with
    return out


def _ptxas_info(ptx: str, arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    found = get_ptxas(arch)
    ptxas = getattr(found, "path", None) or found[0]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}", src, "-o", os.devnull],
                           capture_output=True, text=True, check=False)
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spill = re.search(r"(\d+) bytes spill stores", r.stderr)
    return f" regs={regs.group(1) if regs else '?'} spills={spill.group(1) if spill else '?'}B"


def compile_case(case: Case, registers: bool = False) -> tuple:
    """(label, seconds, error or None, details)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    start = time.perf_counter()
    try:
        jit = getattr(importlib.import_module(f"aiaas_fast.triton.{case.module}"), case.kernel)
        fn = jit
        while not hasattr(fn, "params"):  # an autotuned kernel wraps the JIT function
            fn = fn.fn
        wanted = {p.name for p in fn.params if p.is_constexpr}
        if wanted != set(case.consts):
            raise ValueError(f"the case's constexprs {sorted(case.consts)} are not the kernel's {sorted(wanted)}")
        consts = dict(case.consts, **{name: 1 for name in case.ones})
        signature = {name: "constexpr" if name in consts else case.types.get(name, "i32") for name in fn.arg_names}
        attrs = {}
        if case.aligned:
            from triton.compiler import make_backend

            backend = make_backend(GPUTarget("cuda", case.arch, 32))
            attrs = {(i,): backend.parse_attr("D") for i, name in enumerate(fn.arg_names)
                     if signature[name].startswith("*") or signature[name] == "i32"}
        src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", case.arch, 32),
                                  options={"num_warps": case.warps, "num_stages": case.stages})
        if not compiled.asm.get("cubin"):
            raise RuntimeError("no cubin produced")
        shared = compiled.metadata.shared
        ptx = compiled.asm.get("ptx", "")
        cores = "wgmma" if "wgmma.mma_async" in ptx else "mma" if re.search(r"\bmma\.sync", ptx) else "none"
        details = f"smem={shared / 1024:.0f}KB tc={cores}"
        # A product of 16-bit or TF32 inputs must run on tensor cores, and on Hopper a tile of 64
        # rows or more on wgmma (Triton's MMAv3): mma.sync there would halve the ceiling.
        product = case.kernel == "_mlp_kernel" or (case.kernel == "_matmul_kernel" and case.consts["WRITE_C"])
        if product and case.consts["PRECISION"] == "tf32":
            if cores == "none":
                raise RuntimeError("a 16-bit/TF32 product compiled without tensor-core instructions")
            if case.arch == 90 and case.kernel == "_matmul_kernel" and case.consts["BLOCK_M"] >= 64 and cores != "wgmma":
                raise RuntimeError(f"a {case.consts['BLOCK_M']}-row tile on sm_90 compiled to {cores}, not wgmma")
        if registers:
            details += _ptxas_info(compiled.asm["ptx"], case.arch)
        if shared > SHARED_LIMIT[case.arch] and not case.autotuned:
            raise RuntimeError(f"needs {shared} bytes of shared memory; sm_{case.arch} has {SHARED_LIMIT[case.arch]}")
        return case.label(), time.perf_counter() - start, None, details
    except Exception as e:  # report every failure, with its message
        return case.label(), time.perf_counter() - start, f"{type(e).__name__}: {str(e).strip()[:2000]}", ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one configuration per kernel variant")
    parser.add_argument("--registers", action="store_true", help="also registers and spills (ptxas -v)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compilations (default: CPUs)")
    args = parser.parse_args(argv)
    try:
        import triton  # noqa: F401
    except ImportError:
        print("check_triton_kernels: Triton is not installed (pip install triton)", file=sys.stderr)
        return 2
    todo = cases(args.quick)
    start = time.perf_counter()
    failed = 0
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for label, seconds, error, details in pool.map(compile_case, todo, [args.registers] * len(todo)):
            print(f"{'ok  ' if error is None else 'FAIL'} {seconds:6.1f}s  {label}  {details}", flush=True)
            if error:
                failed += 1
                print(f"      {error}", flush=True)
    print(f"check_triton_kernels: {len(todo) - failed}/{len(todo)} compiled for sm_90/sm_80 "
          f"in {time.perf_counter() - start:.0f}s (triton {__import__('triton').__version__})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
