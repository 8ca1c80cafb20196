"""Greedy generation over a PyTorch VLM with an explicit prefill + decode loop.

The loop is written out (rather than `model.generate`) so the torch, ONNX Runtime and TensorRT
runners share one contract: left-padded prompts, position ids from the attention mask, and the
same stopping rule. That is what lets one evaluator score every artifact alike.
"""

from __future__ import annotations

from typing import Any

import torch


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class TorchRunner:
    """Runs a loaded `transformers` VLM. `inputs` are what the adapter's processor produced."""

    backend = "torch"

    def __init__(self, model: torch.nn.Module, eos_token_id: int | list[int], pad_token_id: int,
                 explicit_positions: bool = True):
        self.model = model
        self.eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
        self.pad = pad_token_id
        self.explicit_positions = explicit_positions

    @classmethod
    def for_adapter(cls, model: torch.nn.Module, adapter, processor) -> TorchRunner:
        return cls(model, adapter.eos_token_ids(model, processor), adapter.pad_token_id(processor),
                   adapter.explicit_positions)

    def _positions(self, mask: torch.Tensor, last: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if not self.explicit_positions:
            return {}
        return {"position_ids": position_ids(mask) if last is None else last}

    @torch.inference_mode()
    def logits(self, inputs: dict[str, Any]) -> torch.Tensor:
        """Teacher-forced logits for a full sequence (prompt and answer)."""
        mask = inputs["attention_mask"]
        return self.model(**inputs, **self._positions(mask), use_cache=False).logits.float()

    @torch.inference_mode()
    def generate(self, inputs: dict[str, Any], max_new_tokens: int) -> list[list[int]]:
        self.model.eval()
        mask = inputs["attention_mask"]
        out = self.model(**inputs, **self._positions(mask), use_cache=True)
        past = out.past_key_values
        next_tok = out.logits[:, -1].argmax(-1)
        batch = next_tok.shape[0]
        tokens: list[list[int]] = [[] for _ in range(batch)]
        done = torch.zeros(batch, dtype=torch.bool)
        pos = position_ids(mask)[:, -1:]
        for step in range(max_new_tokens):
            for i in range(batch):
                if not done[i]:
                    tok = int(next_tok[i])
                    if tok in self.eos:
                        done[i] = True
                    else:
                        tokens[i].append(tok)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            fed = torch.where(done, torch.full_like(next_tok, self.pad), next_tok)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            pos = pos + 1
            out = self.model(
                input_ids=fed[:, None],
                attention_mask=mask,
                **self._positions(mask, pos),
                past_key_values=past,
                use_cache=True,
            )
            past = out.past_key_values
            next_tok = out.logits[:, -1].argmax(-1)
        return tokens
