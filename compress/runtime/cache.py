"""The KV-cache argument under the name the installed transformers uses.

transformers 5.24 renamed `past_key_values` to `cache` (inputs and outputs; the old name warns and goes
away in 5.40), while earlier 5.x releases only know `past_key_values`. Everything that feeds a cache
back goes through these two helpers.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any


@functools.cache
def _accepts_cache(cls: type) -> bool:
    return "cache" in inspect.signature(cls.forward).parameters


def cache_kwargs(module: Any, cache: Any) -> dict[str, Any]:
    """{'cache': cache} or {'past_key_values': cache}, whichever `module.forward` takes."""
    return {"cache": cache} if _accepts_cache(type(module)) else {"past_key_values": cache}


def output_cache(out: Any) -> Any:
    """The cache a forward returned (`out.cache`, or `out.past_key_values` before 5.24)."""
    fields = getattr(out, "__dataclass_fields__", {})
    return out.cache if "cache" in fields else out.past_key_values
