"""Shared test set-up: offline hub, few threads, seeded torch, and the `tiny` model fixture.

Tests never touch the network: the HF offline switches are set before transformers/huggingface_hub are
imported (they read them at import), so a model that is not cached fails at once instead of retrying.
The machine running the suite is small and shared, so torch uses at most 2 threads.
"""

from __future__ import annotations

import os

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    """Every test starts from the same global torch RNG state, whatever ran before it."""
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: tiny models run several times faster that way on a shared 2-core
    machine (no spin-waiting between threads). Modules of tiny-model tests use it for every test with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny():
    """(model, tokenizer) from `preflens.models.tiny_model()`: a fresh random 2-layer Llama per test."""
    from preflens.models import tiny_model

    return tiny_model()
