"""Shared fixtures: make the project importable and keep tests on the CPU, small and seeded."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A `tiny` run trained once for the whole session: (run folder, config)."""
    import ilsgan
    out = tmp_path_factory.mktemp("tiny_run")
    cfg = ilsgan.make_config("tiny", out=str(out), device="cpu")
    ilsgan.train(cfg)
    return out, cfg
