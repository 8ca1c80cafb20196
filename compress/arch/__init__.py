"""Architecture adapters: which model families the toolkit knows, and which modules a stage may touch."""

from __future__ import annotations

import json
from fnmatch import fnmatch
from pathlib import Path

import torch

from compress.arch.base import Adapter, Batch
from compress.arch.gemma3 import Gemma3Adapter
from compress.arch.idefics3 import Idefics3Adapter
from compress.arch.internvl import InternVLAdapter
from compress.arch.llava import LlavaAdapter
from compress.arch.mllama import MllamaAdapter
from compress.arch.paligemma import PaliGemmaAdapter
from compress.arch.qwen2_vl import Qwen2VLAdapter
from compress.config import Targets
from compress.errors import ConfigError

__all__ = [
    "ADAPTERS",
    "Adapter",
    "Batch",
    "adapter_for_source",
    "get_adapter",
    "select_modules",
    "supported",
]

ADAPTERS: tuple[type[Adapter], ...] = (LlavaAdapter, Qwen2VLAdapter, Idefics3Adapter, PaliGemmaAdapter,
                                       Gemma3Adapter, InternVLAdapter, MllamaAdapter)
_BY_MODEL_TYPE: dict[str, type[Adapter]] = {mt: cls for cls in ADAPTERS for mt in cls.model_types}


def supported() -> list[str]:
    """Every config.model_type an adapter handles, sorted."""
    return sorted(_BY_MODEL_TYPE)


def get_adapter(model_type: str) -> Adapter:
    """A fresh adapter for a config.model_type (fresh, because `load` binds it to one checkpoint)."""
    cls = _BY_MODEL_TYPE.get(model_type)
    if cls is None:
        raise ConfigError(f"unsupported architecture '{model_type}'; supported: {', '.join(supported())}")
    return cls(model_type)


def adapter_for_source(source: str, trust_remote_code: bool = False) -> Adapter:
    """Pick the adapter from the config (and check the folder's files), so an unsupported or damaged model
    fails before any weights load."""
    from transformers import AutoConfig

    path = Path(source).expanduser()
    looks_local = path.is_absolute() or source.startswith((".", "~")) or source.count("/") != 1
    if looks_local and not path.exists():
        raise ConfigError(f"model folder '{source}' does not exist (hub ids look like 'owner/name')")
    if path.exists() and not (path / "config.json").is_file():
        raise ConfigError(f"'{source}' has no config.json; expected a saved transformers model folder")
    if path.is_dir():  # complete safetensors, handled dtypes, no remote code unless allowed: before any load
        from compress.model_files import check_model_folder

        check_model_folder(path, trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(str(path) if path.exists() else source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        # A model_type transformers itself does not know: still report it as ours to reject.
        model_type = _raw_model_type(path)
        if model_type is not None:
            return get_adapter(model_type)
        raise ConfigError(f"cannot read a model config from '{source}': {exc}") from exc
    return get_adapter(config.model_type)


def _raw_model_type(path: Path) -> str | None:
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return model_type if isinstance(model_type, str) else None


def select_modules(
    model: torch.nn.Module,
    adapter: Adapter,
    targets: Targets,
    kinds: tuple[type[torch.nn.Module], ...] = (torch.nn.Linear,),
) -> dict[str, torch.nn.Module]:
    """Modules of `kinds` in the targeted components, filtered by include then exclude globs.

    A module belongs to the innermost component containing it (Qwen2-VL's merger is inside the
    vision tower but is the projector), so components never overlap. Globs match the full name or
    the name relative to the component root. Order follows `model.named_modules()`.
    """
    roots = {name: path for name, path in adapter.components.items()}
    for name in targets.components:
        if name not in roots:
            raise ConfigError(f"{adapter.name} has no component '{name}'; it has: {', '.join(sorted(roots))}")
        adapter.component(model, name)  # fail early and clearly if the path does not resolve
    # Innermost first, so the longest matching root wins.
    ordered = sorted(roots.items(), key=lambda item: len(item[1]), reverse=True)
    wanted = set(targets.components)

    selected: dict[str, torch.nn.Module] = {}
    for full, module in model.named_modules():
        if not isinstance(module, kinds):
            continue
        owner = next(((c, r) for c, r in ordered if full == r or full.startswith(r + ".")), None)
        if owner is None or owner[0] not in wanted:
            continue
        relative = full[len(owner[1]) + 1 :]
        names = (full, relative) if relative else (full,)
        if targets.include and not any(fnmatch(n, p) for n in names for p in targets.include):
            continue
        if any(fnmatch(n, p) for n in names for p in targets.exclude):
            continue
        selected[full] = module

    if not selected:
        kind_names = "/".join(k.__name__ for k in kinds)
        where = ", ".join(f"{c} ({roots[c]})" for c in targets.components)
        raise ConfigError(
            f"no {kind_names} modules selected in {where} with include={targets.include} exclude={targets.exclude}"
        )
    return selected
