"""Which ModuleLists of a model are block sequences (the units layer-sequential calibration walks)."""

from __future__ import annotations

from torch import nn


def _linear(module: nn.Module) -> bool:
    """An nn.Linear or a quantized stand-in for one (Int8Linear, Int4Linear: they carry its shape)."""
    return isinstance(module, nn.Linear) or (hasattr(module, "in_features") and hasattr(module, "out_features"))


def _holds_linear(module: nn.Module) -> bool:
    return not _linear(module) and any(_linear(m) for m in module.modules())


def block_lists(model: nn.Module) -> list[str]:
    """Paths of the outermost ModuleLists with at least two elements, each a block holding Linears.

    Vision encoder layers, decoder layers (Mllama's mix of self- and cross-attention layers included)
    qualify; a list nested in a block does not (its block is the unit). Found by structure, not by
    family, so a new family needs nothing here; the sequencer checks at run time that each list is
    called as a chain (block j's output is block j+1's input)."""
    found: list[str] = []
    for name, module in model.named_modules():  # pre-order: outer lists come first
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if any(name.startswith(f"{p}.") for p in found):
            continue
        if all(_holds_linear(block) for block in module):
            found.append(name)
    return found
