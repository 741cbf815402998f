"""Train tests run torch single-threaded: on a shared, busy CPU, intra-op threads spin and
make these small networks tens of times slower. The previous setting is restored after
each test."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
