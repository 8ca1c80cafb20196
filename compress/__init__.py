"""compress: accuracy-gated offline compression of vision-language models.

    from compress import load_recipe, run
    result = run("recipes/quickstart.yaml", out="runs/quickstart")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_recipe", "run"]

if TYPE_CHECKING:
    from compress.pipeline import RunResult
    from compress.recipe import LoadedRecipe


def load_recipe(path: Any) -> LoadedRecipe:
    from compress.recipe import load_recipe as _load

    return _load(path)


def run(recipe: Any, out: Any = None, resume: bool = False, force: bool = False,
        threads: int | None = None) -> RunResult:
    from compress.pipeline import run as _run

    return _run(recipe, out=out, resume=resume, force=force, threads=threads)
