"""Stage checkpoints: transformers folders that plain `from_pretrained` loads with every weight in place.

Pruned models are plain folders; NF4 models carry bitsandbytes' `quantization_config`; INT8 models are
compressed-tensors checkpoints (compress.quant.ct_checkpoint). Loading goes through transformers' own
loaders, then INT8 layers become this toolkit's Int8Linear and bitsandbytes layers get the portable kernel.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

CT_METHOD = "compressed-tensors"


def save_checkpoint(model: torch.nn.Module, processor: Any, path: Path) -> None:
    from compress.quant.ct_checkpoint import compressed_state, quantization_config

    qconfig = quantization_config(model)
    state = model.state_dict()
    if qconfig is not None:
        state = compressed_state(model, state)
    model.save_pretrained(path, state_dict=state)
    save_processor(processor, path)
    if qconfig is not None:
        config_file = Path(path) / "config.json"
        config = json.loads(config_file.read_text())
        config["quantization_config"] = qconfig
        tmp = config_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, config_file)


def save_processor(processor: Any, path: Path) -> None:
    """`save_pretrained`, with the same bytes whatever the process encoded before: a fast tokenizer keeps the
    padding / truncation of its last batched call and would write it into tokenizer.json (every call sets
    its own again, so clearing them changes nothing at run time)."""
    backend = getattr(getattr(processor, "tokenizer", processor), "backend_tokenizer", None)
    if backend is not None:
        backend.no_padding()
        backend.no_truncation()
    processor.save_pretrained(path)


def quant_method(path: str | Path) -> str | None:
    """The `quantization_config.quant_method` of a transformers folder, if any."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    try:
        qc = json.loads(config_file.read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return None
    return qc.get("quant_method") if isinstance(qc, dict) else None


def load_checkpoint(path: str | Path, adapter: Any, dtype: str = "float32",
                    trust_remote_code: bool = False) -> tuple[torch.nn.Module, Any]:
    """Load a source model or a stage checkpoint with every compressed module restored."""
    model, processor = adapter.load(str(path), dtype, trust_remote_code)
    if quant_method(path) == CT_METHOD:
        from compress.quant.ct_checkpoint import from_loaded

        from_loaded(model)
    if any(type(m).__name__ == "Linear4bit" for m in model.modules()):
        from compress.quant import use_portable_nf4_kernel

        use_portable_nf4_kernel(model)
    from compress.tokens.install import reinstall

    reinstall(model, adapter)  # a `tokens` stage's reduction, recorded in the config
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
