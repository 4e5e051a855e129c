"""Session fixture: the tiny profile built once (downloads cached in <repo>/cache, git-ignored)."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "cache"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from data_prep.build import build

    out = tmp_path_factory.mktemp("data") / "tiny"
    build("tiny", out, cache=CACHE, quiet=True)
    return out
