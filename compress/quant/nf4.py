"""NF4 weight-only quantization through bitsandbytes, on the path transformers supports end to end.

The supported way to get a bnb 4-bit model is `from_pretrained(..., quantization_config=
BitsAndBytesConfig(load_in_4bit=True, ...))`; transformers then also writes `quantization_config` into
config.json so `save_pretrained` / `from_pretrained` round-trip. Our pipeline holds an in-memory
(possibly pruned) float model, so `quantize_nf4` saves it to a scratch folder and reloads it that way.

Choices:
- Which layers: `llm_int8_skip_modules` lists every nn.Linear that is NOT selected, by its full name,
  `re.escape`d. transformers matches each entry as a regex anchored at the start of the module name
  (up to a `.` boundary) or as a name suffix, so an escaped full name matches exactly that module.
  Passing the list also disables transformers' default skips (lm_head), so a selected lm_head is
  quantized and an unselected one is not. The result is checked module by module.
- Block size: `BitsAndBytesConfig` has no block size (bnb's default is 64). For another size the
  selected layers of the reloaded model are re-quantized from the float weights with
  `Params4bit(blocksize=...)`, the same call bnb makes internally. The block size is stored in every
  layer's serialized quant state, so a later `from_pretrained` restores it without further help.
- Shapes: a block must not straddle two rows (bnb's CPU kernels reshape absmax to (out, in/blocksize),
  and group-wise int4 exporters need it), so every selected layer needs in_features % blocksize == 0.
  This is checked for all layers before anything is written.
- CPU kernel: on CPUs with AVX512-BF16, bnb's Linear4bit repacks weights on the first forward and
  computes in bfloat16; that path also requires out_features % 32 == 0 and changes the quant state
  (it drops double quantization). `use_portable_nf4_kernel` switches every Linear4bit to bnb's
  dequantize + matmul path instead: the same numbers on every CPU, in the compute dtype, any shape.
  Call it again after each `from_pretrained` of an NF4 checkpoint (the loader cannot know).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.errors import ConfigError
from compress.quant.smoothquant import check_unshared

BNB_DEFAULT_BLOCKSIZE = 64
BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _bnb() -> Any:
    try:
        import bitsandbytes
    except ImportError as exc:  # optional dependency
        raise ConfigError("NF4 needs bitsandbytes: pip install 'vlm-compress[nf4]'") from exc
    return bitsandbytes


def _dtype(value: str | torch.dtype) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise ConfigError(f"unsupported NF4 compute dtype '{value}'; supported: {', '.join(DTYPES)}")
    return DTYPES[value]


def check_nf4(model: nn.Module, selected_names: list[str], blocksize: int) -> None:
    """Every reason NF4 would fail, raised as ConfigError naming the module, before anything changes."""
    if blocksize not in BNB_BLOCKSIZES:
        raise ConfigError(f"NF4 blocksize {blocksize} is not supported by bitsandbytes; use one of {BNB_BLOCKSIZES}")
    if not selected_names:
        raise ConfigError("NF4: no modules selected")
    modules = dict(model.named_modules())
    for name in selected_names:
        m = modules.get(name)
        if m is None:
            raise ConfigError(f"NF4: module '{name}' not found in the model")
        if type(m) is not nn.Linear:  # transformers converts exactly nn.Linear (and GPT-2's Conv1D)
            raise ConfigError(f"NF4 applies to plain float nn.Linear modules; '{name}' is {type(m).__name__}")
        if m.in_features % blocksize:
            raise ConfigError(
                f"NF4: '{name}' has in_features={m.in_features}, not a multiple of blocksize {blocksize} "
                f"(weight {m.out_features}x{m.in_features}); use a smaller blocksize or exclude the module"
            )
    check_unshared(model, {name: modules[name] for name in selected_names})  # tied lm_head / embeddings
    foreign = [n for n, m in modules.items() if type(m).__name__ in ("Int8Linear", "Linear4bit")]
    if foreign:
        raise ConfigError(f"NF4 must be applied to a float model; already quantized/smoothed: {', '.join(foreign[:5])}")


def skip_modules(model: nn.Module, selected_names: list[str]) -> list[str]:
    """`llm_int8_skip_modules` that leaves exactly `selected_names` to be converted (escaped full names)."""
    chosen = set(selected_names)
    return [re.escape(n) for n, m in model.named_modules() if type(m) is nn.Linear and n not in chosen]


def use_portable_nf4_kernel(model: nn.Module) -> int:
    """Make every bnb Linear4bit on CPU dequantize + matmul (no AVX512-BF16 repacking). Returns the count."""
    n = 0
    for m in model.modules():
        if type(m).__name__ == "Linear4bit" and hasattr(m, "support_avx512bf16_for_cpu"):
            if getattr(m.weight.quant_state, "packing_format_for_cpu", False):
                raise RuntimeError("a Linear4bit was already repacked for CPU; call this before the first forward")
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def quantize_nf4(
    model: nn.Module,
    selected_names: list[str],
    blocksize: int = BNB_DEFAULT_BLOCKSIZE,
    double_quant: bool = True,
    compute_dtype: str | torch.dtype = "float32",
    workdir: str | Path | None = None,
) -> nn.Module:
    """A new model whose selected Linears are bnb NF4 `Linear4bit`; every other module stays as it was.

    The input model is not modified (free it afterwards). Its float weights are written to a scratch
    folder under `workdir` (removed afterwards) and reloaded with a BitsAndBytesConfig. The result is a
    normal transformers bnb model: `save_pretrained` writes `quantization_config`, and
    `from_pretrained` reloads it (then call `use_portable_nf4_kernel`). Python attributes and hooks
    set on the input model are not carried over; re-bind adapters to the returned model.
    """
    bnb = _bnb()
    from transformers import BitsAndBytesConfig

    selected = list(dict.fromkeys(selected_names))
    check_nf4(model, selected, blocksize)
    compute = _dtype(compute_dtype)
    param = next(model.parameters())
    skips = skip_modules(model, selected)
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute,
        llm_int8_skip_modules=skips,
    )
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="nf4-float-", dir=workdir))
    try:
        model.save_pretrained(scratch)
        device_map = {"": str(param.device) if param.device.type != "cpu" else "cpu"}
        quantized = type(model).from_pretrained(
            scratch, quantization_config=config, dtype=param.dtype, device_map=device_map
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    originals = dict(model.named_modules())
    modules = dict(quantized.named_modules())
    if blocksize != BNB_DEFAULT_BLOCKSIZE:
        for name in selected:
            _requantize(bnb, modules[name], originals[name].weight, blocksize, double_quant)
    _verify(quantized, selected, blocksize, bnb)
    use_portable_nf4_kernel(quantized)
    quantized.eval()
    return quantized


def _requantize(bnb: Any, layer: Any, float_weight: torch.Tensor, blocksize: int, double_quant: bool) -> None:
    """Re-quantize one Linear4bit from its float weight with a non-default block size."""
    weight = bnb.nn.Params4bit(
        float_weight.detach().clone(),
        requires_grad=False,
        blocksize=blocksize,
        compress_statistics=double_quant,
        quant_type="nf4",
        quant_storage=layer.weight.quant_storage,
        module=layer,
    )
    layer.weight = weight.to(float_weight.device)  # .to() on an unquantized Params4bit quantizes it


def _verify(model: nn.Module, selected: list[str], blocksize: int, bnb: Any) -> None:
    chosen = set(selected)
    for name, m in model.named_modules():
        if name in chosen:
            state = getattr(getattr(m, "weight", None), "quant_state", None)
            if not isinstance(m, bnb.nn.Linear4bit) or state is None:
                raise ConfigError(f"NF4: '{name}' was not converted by transformers (kept in float by the model?)")
            if state.quant_type != "nf4" or state.blocksize != blocksize:
                raise RuntimeError(f"NF4: '{name}' got {state.quant_type}/{state.blocksize}")
        elif isinstance(m, bnb.nn.Linear4bit):
            raise RuntimeError(f"NF4: '{name}' was converted but not selected")


def nf4_details(model: nn.Module, selected_names: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Per Linear4bit: bits, blocksize, double_quant, serialized bytes (packed 4-bit + statistics) vs fp32."""
    bnb = _bnb()
    out: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        if not isinstance(m, bnb.nn.Linear4bit) or (selected_names is not None and name not in selected_names):
            continue
        state = m.weight.quant_state
        sd = m.state_dict()
        weight_bytes = sd["weight"].numel() * sd["weight"].element_size()
        stats = sum(t.numel() * t.element_size() for k, t in sd.items() if k.startswith("weight."))
        rows, cols = state.shape
        out[name] = {
            "scheme": "nf4",
            "bits": 4,
            "blocksize": state.blocksize,
            "double_quant": bool(state.nested),
            "compute_dtype": str(m.compute_dtype).removeprefix("torch.") if m.compute_dtype else None,
            "shape": [int(rows), int(cols)],
            "packed_bytes": weight_bytes,
            "statistics_bytes": stats,
            "quantized_bytes": weight_bytes + stats,
            "fp32_bytes": int(rows) * int(cols) * 4,
        }
    return out
