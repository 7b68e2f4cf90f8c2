"""The quick zoo, built once per test session (its build time: docs/results.md#timings)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from opd.lab.zoo import build_zoo_stages


@pytest.fixture(scope="session")
def quick_zoo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """(root folder, zoo.json contents) of a quick-profile zoo."""
    root = tmp_path_factory.mktemp("zoo")
    return root, build_zoo_stages(root, profile="quick", progress=False)
