"""What every tiny model shares: its sizes, a byte-level tokenizer any text encodes with, and the text
config arguments (`compress.zoo.tiny` and `compress.zoo.tiny_more` build the families from these)."""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

IMAGE_SIZE = 32
HIDDEN = 32
VISION_HIDDEN = 32
LAYERS = 2
HEADS = 4
KV_HEADS = 2
PATCH = 8


def byte_tokenizer(
    specials: list[str], *, bos: str | None, eos: str, pad: str, extra: dict[str, str] | None = None
) -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges: every byte is a token, so any text encodes (like GPT-2/Qwen)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        padding_side="left",
        extra_special_tokens=extra or {},
    )
    fast.add_special_tokens({"additional_special_tokens": specials})
    return fast


def text_kwargs(tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": HIDDEN,
        "intermediate_size": HIDDEN * 2,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": 512,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }
