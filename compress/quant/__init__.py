"""Quantization library used by the `quantize` stage: observers, INT8 (W8A8 / W8A16), SmoothQuant, NF4.

INT8 and SmoothQuant are pure torch and rewrite modules in place; NF4 goes through bitsandbytes and
transformers' BitsAndBytesConfig loading path (an optional dependency, imported only when used).
"""

from compress.quant.int8 import (
    ActQuant,
    Int8Linear,
    WeightQuant,
    fake_quant,
    int8_spec,
    quantize_weight,
    quantized_specs,
    replace_with_int8_from_specs,
)
from compress.quant.linears import calibrate, quantize_linears, size_summary
from compress.quant.nf4 import check_nf4, nf4_details, quantize_nf4, use_portable_nf4_kernel
from compress.quant.observers import OBSERVERS, Observer, make_observer
from compress.quant.sensitivity import KeepFloat
from compress.quant.smoothquant import SmoothedLinear, smooth

__all__ = [
    "OBSERVERS",
    "ActQuant",
    "Int8Linear",
    "KeepFloat",
    "Observer",
    "SmoothedLinear",
    "WeightQuant",
    "calibrate",
    "check_nf4",
    "fake_quant",
    "int8_spec",
    "make_observer",
    "nf4_details",
    "quantize_linears",
    "quantize_nf4",
    "quantize_weight",
    "quantized_specs",
    "replace_with_int8_from_specs",
    "size_summary",
    "smooth",
    "use_portable_nf4_kernel",
]
