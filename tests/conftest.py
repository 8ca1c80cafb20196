"""Suite-wide settings and the fixtures more than one test module uses (plain helpers: helpers.py).

Under pytest-xdist (the README's `-n 2`) each worker runs torch on one thread: two workers on two cores
instead of four torch threads contending for them. Subprocesses the tests start inherit it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def recipe_error(tmp_path: Path) -> Callable[..., str]:
    """`recipe_error(stages, calibration=True)`: the RecipeError message for helpers.VALID with these stages."""
    import helpers

    return lambda stages, calibration=True: helpers.recipe_error(tmp_path, stages, calibration)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`tiny_folder(family)`: the family's tiny model saved as a transformers folder, once per session (worker).
    Read-only: a test that changes the folder copies it first."""
    from compress.zoo.tiny import save_tiny

    saved: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in saved:
            saved[family] = save_tiny(family, tmp_path_factory.mktemp("tiny") / family)
        return saved[family]

    return get
