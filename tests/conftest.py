"""Shared fixtures: a small embedded dataset, and the real data directory for adapters that read files."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mtlbench.registry import build_options, get

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _data_dir():
    """Point adapters at ../shared/data (tests and CI read real files there, never copies in the repo)."""
    if SHARED_DATA.is_dir():
        os.environ.setdefault("MTLBENCH_DATA_DIR", str(SHARED_DATA))
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def small_data():
    entry = get("dataset", "ecommerce")
    return entry.obj(entry.obj.Options(n_rows=4000, n_users=300, n_items=200)).load(0)


def build_arch(name: str, data, embed_dim: int = 8, **options):
    entry = get("arch", name)
    return entry.obj(data.schema, data.tasks, embed_dim, build_options(entry.options_class,
                                                                      entry.resolve_options(options)))
