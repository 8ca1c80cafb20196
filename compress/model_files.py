"""Checks on a model folder's files before any weights load or any run folder is made.

A truncated download, a pre-quantized checkpoint the stages cannot take, pickled weights and models
that ship their own Python code each fail here with one line naming the file (and tensor), instead
of a library traceback halfway through loading.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from compress.errors import ConfigError

FLOAT = {"F64", "F32", "F16", "BF16"}
BUFFERS = {"I64", "I32", "I16", "BOOL"}  # position ids, masks: not weights a stage changes
OUR_QUANT = {"compressed-tensors", "bitsandbytes"}  # what this toolkit writes, and reloads
PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def read_header(path: Path) -> dict[str, Any]:
    """The safetensors header (tensor name -> dtype, shape, offsets), checked against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConfigError(f"{path}: not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise ConfigError(f"{path}: not a complete safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ConfigError(f"{path}: corrupt safetensors header ({e})") from e
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end > size:
        last = max(header, key=lambda k: header[k]["data_offsets"][1])
        raise ConfigError(f"{path}: truncated: its tensors need {8 + n + end} bytes, the file has {size} "
                          f"(tensor {last} is cut off); download or copy it again")
    return header


def check_model_folder(folder: Path, trust_remote_code: bool) -> None:
    """Complete safetensors files, dtypes the stages handle, remote code only when the recipe allows it."""
    config = _config(folder)
    check_remote_code(folder, config, trust_remote_code)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for pattern in PICKLES for p in folder.glob(pattern))
        if pickles:
            raise ConfigError(f"{folder} holds pickled weights only ({', '.join(pickles[:3])}); loading a pickle can "
                              "run code, so only safetensors are read: convert them (e.g. load and "
                              "save_pretrained(safe_serialization=True)) in a process you trust")
        return  # transformers names what is missing
    quant = (config.get("quantization_config") or {}).get("quant_method")
    if quant and quant not in OUR_QUANT:
        raise ConfigError(f"{folder / 'config.json'}: the model is already quantized (quant_method '{quant}'); "
                          "the stages start from float weights (float32 / float16 / bfloat16) or from this "
                          f"toolkit's own {' / '.join(sorted(OUR_QUANT))} folders: use the unquantized model")
    for path in files:
        for name, info in read_header(path).items():
            dtype = info["dtype"]
            if dtype not in FLOAT and dtype not in BUFFERS and not quant:
                raise ConfigError(f"{path}: tensor {name} is {dtype} and config.json has no quantization_config; "
                                  "the stages handle float32 / float16 / bfloat16 weights")


def check_remote_code(folder: Path, config: dict[str, Any], trust_remote_code: bool) -> None:
    """A config with auto_map for a model_type transformers does not know would run the folder's Python code."""
    from transformers import CONFIG_MAPPING

    auto_map = config.get("auto_map")
    if not auto_map or trust_remote_code or config.get("model_type") in CONFIG_MAPPING:
        return
    files = sorted({str(v if isinstance(v, str) else v[0]).split(".")[0] + ".py"
                    for v in auto_map.values() if v})
    raise ConfigError(f"{folder / 'config.json'}: model_type '{config.get('model_type')}' is defined by code in the "
                      f"model folder ({', '.join(files)}), which runs only if the recipe sets "
                      "model.trust_remote_code: true; read that code first")


def _config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{folder / 'config.json'}: cannot read it ({e})") from e
    if not isinstance(config, dict):
        raise ConfigError(f"{folder / 'config.json'}: expected a JSON object")
    return config
