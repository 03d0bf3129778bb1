import os
import sys
import tempfile

# A fresh torch.compile cache for every test session: compiled graphs embed the ops'
# autograd formulas, and a cache left by an older build of aiaas_fast would replay them.
# scripts/gpu_check.sh gives its pytest runs one new folder to share (AIAAS_FAST_TEST_INDUCTOR_CACHE).
os.environ["TORCHINDUCTOR_CACHE_DIR"] = (os.environ.get("AIAAS_FAST_TEST_INDUCTOR_CACHE")
                                         or tempfile.mkdtemp(prefix="aiaas_fast_inductor_"))

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors, so their
# numerics are tested on every change. triton.jit reads this when aiaas_fast.triton is
# imported (lazily, on first use of the backend), which is after this line.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))

from helpers import BACKENDS, backend_skip_reason  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    # Fresh inputs for every test, reproducible from the test's seed when one fails.
    torch.manual_seed(0x5EED)
    yield


def pytest_collection_modifyitems(config, items):
    # A case of the backend fixture on CUDA runs on the GPU: marked so that
    # scripts/gpu_check.sh can take the GPU's cases alone (-m gpu).
    for item in items:
        b = getattr(getattr(item, "callspec", None), "params", {}).get("backend")
        if b is not None and getattr(b, "device", None) == "cuda":
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(params=BACKENDS, ids=lambda b: f"{b.name}-{b.device}")
def backend(request):
    """Every op test that takes this fixture runs once per backend (and device) that can run
    here: native and reference on the CPU (and CUDA), triton on CUDA or, without a GPU,
    interpreted on the CPU. Tensors go to ``backend.device``."""
    import aiaas_fast

    why = backend_skip_reason(request.param)
    if why:
        pytest.skip(why)
    with aiaas_fast.use_backend(request.param.name):
        yield request.param


@pytest.fixture
def ieee_float32():
    """CUDA float32 products in IEEE float32 (no TF32) for the test: what the fused kernels
    and the reference both follow, so they compare at float32 tolerances."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old
