"""Greedy generation over a PyTorch VLM with an explicit prefill + decode loop.

The loop is written out (rather than `model.generate`) so the torch, ONNX Runtime and TensorRT
runners share one contract: left-padded prompts, position ids from the attention mask, and the
same stopping rule. That is what lets one evaluator score every artifact alike.
"""

from __future__ import annotations

import inspect
import time
from typing import Any

import torch

from compress.runtime.cache import cache_kwargs, output_cache
from compress.runtime.greedy import greedy


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class TorchRunner:
    """Runs a loaded `transformers` VLM. `inputs` are what the adapter's processor produced."""

    backend = "torch"

    def __init__(self, model: torch.nn.Module, eos_token_id: int | list[int], pad_token_id: int,
                 explicit_positions: bool = True, decode_positions: Any = None):
        self.model = model
        # Families with their own positions (M-RoPE) that the model cannot continue itself at a decode step.
        self.decode_positions = decode_positions
        self.eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
        self.pad = pad_token_id
        self.explicit_positions = explicit_positions
        # Filled by each `generate`: seconds to the first token (vision + prefill + argmax), seconds
        # spent in the decode steps after it, and how many steps ran. Benchmarks read it.
        self.timings: dict[str, float] = {}

    @classmethod
    def for_adapter(cls, model: torch.nn.Module, adapter, processor) -> TorchRunner:
        return cls(model, adapter.eos_token_ids(model, processor), adapter.pad_token_id(processor),
                   adapter.explicit_positions, adapter.decode_positions)

    def _positions(self, mask: torch.Tensor, last: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if not self.explicit_positions:
            if last is not None and self.decode_positions is not None:
                return self.decode_positions(self.model, mask)
            return {}
        return {"position_ids": position_ids(mask) if last is None else last}

    @torch.inference_mode()
    def logits(self, inputs: dict[str, Any]) -> torch.Tensor:
        """Teacher-forced logits for a full sequence (prompt and answer)."""
        mask = inputs["attention_mask"]
        return self.model(**inputs, **self._positions(mask), use_cache=False).logits.float()

    @torch.inference_mode()
    def image_features(self, inputs: dict[str, Any]) -> Any:
        """The vision tower + projector alone on the batch's images (what benchmarks time as "vision")."""
        get = self.model.model.get_image_features
        accepted = inspect.signature(get).parameters
        return get(**{k: v for k, v in inputs.items() if k in accepted and k not in ("input_ids", "attention_mask")})

    @torch.inference_mode()
    def generate(self, inputs: dict[str, Any], max_new_tokens: int, ignore_eos: bool = False) -> list[list[int]]:
        self.model.eval()
        t0 = time.perf_counter()
        state = {"mask": inputs["attention_mask"], "pos": position_ids(inputs["attention_mask"])[:, -1:], "steps": 0}
        out = self.model(**inputs, **self._positions(state["mask"]), use_cache=True)
        state["past"] = output_cache(out)
        # Mllama: a decode step attends to the images its last prompt token attended to (as `generate` does).
        cross = inputs.get("cross_attention_mask")
        step_inputs = {} if cross is None else {"cross_attention_mask": cross[:, -1:]}

        def step(fed: list[int]) -> list[int]:
            mask = torch.cat([state["mask"], torch.ones_like(state["mask"][:, :1])], dim=-1)
            pos = state["pos"] + 1
            out = self.model(input_ids=torch.tensor(fed)[:, None], attention_mask=mask, **step_inputs,
                             **self._positions(mask, pos), **cache_kwargs(self.model, state["past"]), use_cache=True)
            state.update(mask=mask, pos=pos, past=output_cache(out), steps=state["steps"] + 1)
            return out.logits[:, -1].argmax(-1).tolist()

        first = out.logits[:, -1].argmax(-1).tolist()
        t1 = time.perf_counter()
        tokens = greedy(first, step, self.eos, self.pad, max_new_tokens, ignore_eos)
        self.timings = {"first_token_s": t1 - t0, "decode_s": time.perf_counter() - t1, "decode_steps": state["steps"]}
        return tokens
