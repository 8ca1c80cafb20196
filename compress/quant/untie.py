"""A tied output head, untied before it is quantized.

Gemma 3, PaliGemma, SmolVLM's SmolLM2 and the small Qwen2-VL / Qwen2.5-VL language models read their input
embedding table again as the lm_head. Quantizing that head in place would rewrite the table too (every
prompt token's embedding moved by the head's rounding), so the head gets its own copy first, as
llm-compressor does when a recipe targets it: the table stays float (a step reads one row of it), the head
is quantized (a step reads all of it: for Gemma 3's 262k vocabulary the largest GEMV of the model), and the
config says `tie_word_embeddings: false` so plain `from_pretrained` loads the two apart. The cost is the
quantized head's bytes on top of the float table, recorded by the stage.
"""

from __future__ import annotations

from torch import nn


def untie_heads(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Give each named module that reads the input embedding table as its weight its own copy; returns
    {module: embedding parameter it was tied to}. Any other sharing is left to `check_unshared` to refuse."""
    embed = model.get_input_embeddings()
    table = getattr(embed, "weight", None)
    if table is None:
        return {}
    table_name = next(f"{n}.weight" for n, m in model.named_modules() if m is embed)
    untied: dict[str, str] = {}
    for name in names:
        module = model.get_submodule(name)
        if getattr(module, "weight", None) is table:
            module.weight = nn.Parameter(table.detach().clone(), requires_grad=table.requires_grad)
            untied[name] = table_name
    if untied:
        for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            if getattr(config, "tie_word_embeddings", False):
                config.tie_word_embeddings = False
        if hasattr(model, "all_tied_weights_keys"):  # what save_pretrained drops as duplicates
            model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    return untied
