from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The default model, fetched into lockstep's cache on first use (make test fetches it first)."""
    from lockstep.runtime.fetch import ensure_model

    return ensure_model(quiet=True)
