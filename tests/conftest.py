import os
import sys
import tempfile

# A fresh torch.compile cache for every test session: compiled graphs embed the ops'
# autograd formulas, and a cache left by an older build of aiaas_fast would replay them.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="aiaas_fast_inductor_")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _seed():
    # Fresh inputs for every test, reproducible from the test's seed when one fails.
    torch.manual_seed(0x5EED)
    yield
