"""Quantization library used by the `quantize` stage: observers, INT8 (W8A8 / W8A16), SmoothQuant, NF4.

INT8 is pure torch and rewrites modules in place; SmoothQuant folds into the float weights; NF4 goes
through bitsandbytes and transformers' BitsAndBytesConfig loading path (an optional dependency,
imported only when used).
"""

from compress.quant.int8 import (
    ActQuant,
    Int8Linear,
    WeightQuant,
    fake_quant,
    int8_modules,
    quantize_weight,
)
from compress.quant.linears import calibrate, quantize_linears, size_summary
from compress.quant.nf4 import check_nf4, nf4_details, quantize_nf4, use_portable_nf4_kernel
from compress.quant.observers import OBSERVERS, Observer, make_observer
from compress.quant.sensitivity import KeepFloat
from compress.quant.smooth_rules import find_mappings
from compress.quant.smoothquant import smooth

__all__ = [
    "OBSERVERS",
    "ActQuant",
    "Int8Linear",
    "KeepFloat",
    "Observer",
    "WeightQuant",
    "calibrate",
    "check_nf4",
    "fake_quant",
    "find_mappings",
    "int8_modules",
    "make_observer",
    "nf4_details",
    "quantize_linears",
    "quantize_nf4",
    "quantize_weight",
    "size_summary",
    "smooth",
    "use_portable_nf4_kernel",
]
