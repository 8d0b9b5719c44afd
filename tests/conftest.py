from __future__ import annotations

import pytest
import torch

from cases import CASES


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def case(request):
    return request.param
