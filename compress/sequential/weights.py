"""Weights that live on disk until their block's turn: a model skeleton with parameters on the meta device,
tensors read one at a time from the source safetensors (`safe_open`), blocks loaded and dropped again.

As accelerate's big-model loading does: nothing is materialized before it is needed. Buffers that are not
stored (rotary frequencies) are built for real with the skeleton, so a loaded block computes exactly what
`from_pretrained` would have given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from compress.errors import ConfigError

_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def _header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header and where its data starts (8-byte length, JSON, data)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(size)), 8 + size


class WeightSource:
    """The tensors of a safetensors model folder (one file, or shards with an index), read by name."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.folder / f for name, f in weight_map.items()}
        else:
            self.files = {}
            for f in sorted(self.folder.glob("*.safetensors")):
                with safe_open(str(f), "pt") as h:
                    self.files.update({k: f for k in h.keys()})  # noqa: SIM118 (a safe_open handle)
        if not self.files:
            raise ConfigError(f"{self.folder}: no safetensors weights to stream from")
        self.keys = {name: name for name in self.files}  # the model's parameter name -> the stored name

    def rename_for(self, model: nn.Module) -> WeightSource:
        """Map stored names to `model`'s names with transformers' own checkpoint renamings (a LLaVA folder stores
        `language_model.model.layers…` for `model.language_model.layers…`); conversions that change tensors
        (fused projections) are refused, since streaming reads each tensor as it is stored."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
        meta = model.state_dict()
        self.keys = {}
        for stored in self.files:
            name, converted = rename_source_key(stored, renamings, converters, model.base_model_prefix, meta)
            if converted is not None:
                raise ConfigError(f"{self.folder}: tensor '{stored}' is converted when loaded ({converted}); such a "
                                  "checkpoint cannot be streamed layer by layer")
            self.keys[name] = stored
        return self

    def __contains__(self, name: str) -> bool:
        return name in self.keys

    def tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors the model calls `names`, each read from its file straight into memory of its own (no
        memory map: pages of a file would count in the resident set, and a mapped copy would double it)."""
        missing = [n for n in names if n not in self.keys]
        if missing:
            raise ConfigError(f"{self.folder}: the weights have no tensor for '{missing[0]}'"
                              + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[self.keys[n]], []).append(n)
        out = {}
        for path, group in by_file.items():
            header, start = _header(path)
            with open(path, "rb") as f:
                for n in group:
                    entry = header[self.keys[n]]
                    t = torch.empty(entry["shape"], dtype=_TORCH[entry["dtype"]])
                    begin, end = entry["data_offsets"]
                    f.seek(start + begin)
                    if f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy())) != end - begin:
                        raise ConfigError(f"{path}: tensor '{self.keys[n]}' is cut short")
                    out[n] = t
        return out

    def nbytes(self, float_size: int | None = None) -> int:
        """Bytes of every stored tensor (from the headers; nothing is read), floating-point tensors counted at
        `float_size` bytes per value where given (the dtype the run loads them in)."""
        total = 0
        for path in set(self.files.values()):
            with safe_open(str(path), "pt") as h:
                for stored in h.keys():  # noqa: SIM118 (a safe_open handle)
                    s = h.get_slice(stored)
                    size = _DTYPES.get(s.get_dtype(), 4)
                    if float_size is not None and s.get_dtype() in ("F32", "F16", "BF16", "F64"):
                        size = float_size
                    total += size * int(torch.Size(s.get_shape()).numel())
        return total


def empty_model(source: str | Path, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The model of `source`'s config with every parameter on the meta device (buffers real), in eval mode."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval()


def _stored(module: nn.Module) -> list[str]:
    """State-dict keys of `module` (parameters and persistent buffers)."""
    return list(module.state_dict(keep_vars=True).keys())


def onload(module: nn.Module, prefix: str, source: WeightSource, dtype: torch.dtype,
           keys: list[str] | None = None) -> int:
    """Read `module`'s tensors (or only `keys`) from `source` and assign them in place; the bytes read."""
    keys = keys if keys is not None else _stored(module)
    read = source.tensors([f"{prefix}.{k}" if prefix else k for k in keys])
    state = {}
    for key, t in zip(keys, read.values(), strict=True):
        state[key] = t.to(dtype) if t.is_floating_point() else t
    module.load_state_dict(state, strict=keys is None, assign=True)
    return sum(t.numel() * t.element_size() for t in state.values())


def offload(module: nn.Module) -> None:
    """Drop `module`'s parameters and buffers back to the meta device (their memory is freed)."""
    module.to("meta")


def onload_outside(model: nn.Module, paths: list[str], source: WeightSource, dtype: torch.dtype) -> int:
    """Load every tensor not inside a block sequence (embeddings, norms, projector, lm_head), tie what the
    config ties, and check that nothing outside the blocks is left on the meta device; the bytes read."""
    inside = tuple(f"{p}." for p in paths)
    keys = [k for k in _stored(model) if not k.startswith(inside)]
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    present = [k for k in keys if k in source or k not in tied]
    read = onload(model, "", source, dtype, present)
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(inside)]
    if left:
        raise ConfigError(f"{source.folder}: no weights for {', '.join(left[:5])}")
    return read
