"""Shared fixtures: where the real data sets are, and tiny data sets made on the spot."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data(name: str) -> Path:
    """Path of a real data set in ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data set {path} is absent (clone the project beside its shared/ folder to run this test)")
    return path


@pytest.fixture
def movielens_dir() -> Path:
    return shared_data("movielens-latest-small")


@pytest.fixture
def telco_dir() -> Path:
    return shared_data("telco-churn")


@pytest.fixture
def one_torch_thread():
    """Small torch models on 2 shared cores: one intra-op thread beats a contended pool by up to 10x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
