import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _seed():
    # Fresh inputs for every test, reproducible from the test's seed when one fails.
    torch.manual_seed(0x5EED)
    yield
