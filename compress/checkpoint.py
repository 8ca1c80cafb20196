"""Stage checkpoints: a transformers folder, plus what transformers cannot rebuild by itself.

Pruned and NF4 models are plain transformers folders (bitsandbytes layers are described by the
`quantization_config` transformers writes into config.json). INT8 layers are this toolkit's own
modules: their specs go into `compress_quant.json` and their int8 weights and scales into
`compress_quant.safetensors` (keyed by module path as the model names them; transformers renames
keys in `model.safetensors` on save). `load_checkpoint` swaps the modules back in and loads them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from compress.errors import ConfigError

QUANT_SPECS = "compress_quant.json"
QUANT_TENSORS = "compress_quant.safetensors"


def save_checkpoint(model: torch.nn.Module, processor: Any, path: Path) -> None:
    from compress.quant import quantized_specs

    specs = quantized_specs(model)
    prefixes = tuple(f"{name}." for name in specs)
    state = model.state_dict()
    quant = {k: v.contiguous() for k, v in state.items() if prefixes and k.startswith(prefixes)}
    # Each tensor is stored once: the INT8 modules' tensors only in our file.
    model.save_pretrained(path, state_dict={k: v for k, v in state.items() if k not in quant})
    processor.save_pretrained(path)
    if specs:
        save_file(quant, str(path / QUANT_TENSORS))
        (path / QUANT_SPECS).write_text(json.dumps({"format": 1, "modules": specs}, indent=1) + "\n")


def load_checkpoint(path: str | Path, adapter: Any, dtype: str = "float32",
                    trust_remote_code: bool = False) -> tuple[torch.nn.Module, Any]:
    """Load a source model or a stage checkpoint with every compressed module restored."""
    path = Path(path)
    specs_file = path / QUANT_SPECS
    if specs_file.exists():
        # The INT8 modules' float weights are absent on purpose; they are rebuilt just below.
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model, processor = adapter.load(str(path), dtype, trust_remote_code)
        finally:
            hf_logging.set_verbosity(level)
    else:
        model, processor = adapter.load(str(path), dtype, trust_remote_code)
    if specs_file.exists():
        from compress.quant import replace_with_int8_from_specs

        specs = json.loads(specs_file.read_text())["modules"]
        replace_with_int8_from_specs(model, specs)
        prefixes = tuple(f"{name}." for name in specs)
        state = load_file(str(path / QUANT_TENSORS))
        expected = {k for k in model.state_dict() if k.startswith(prefixes)}
        if set(state) != expected:
            missing = sorted(expected - set(state))[:5]
            raise ConfigError(f"checkpoint {path} is missing quantized tensors, e.g. {missing}")
        model.load_state_dict(state, strict=False)
    if any(type(m).__name__ == "Linear4bit" for m in model.modules()):
        from compress.quant import use_portable_nf4_kernel

        use_portable_nf4_kernel(model)
    model.eval()
    adapter.bind(model)
    return model, processor


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of everything the model serialises (parameters and persistent buffers, packed as stored),
    each shared tensor counted once, as safetensors stores it."""
    seen: set[tuple[int, int, torch.dtype]] = set()
    total = 0
    for t in model.state_dict().values():
        if not isinstance(t, torch.Tensor):
            continue
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key in seen and t.data_ptr() != 0:  # tied weights (embeddings / lm_head) are stored once
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total
