import os
import warnings
from pathlib import Path

import pytest
import torch

warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# The data sets live in ../shared/data beside the checkout; `make test` sets ETP_GRAPH_DATA, and a
# bare `pytest` from the checkout gets the same default here (the library itself never guesses).
_SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if "ETP_GRAPH_DATA" not in os.environ and _SHARED.is_dir():
    os.environ["ETP_GRAPH_DATA"] = str(_SHARED)
