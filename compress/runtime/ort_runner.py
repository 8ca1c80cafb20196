"""Greedy generation over exported ONNX graphs in ONNX Runtime, with the TorchRunner contract.

Same inputs (the adapter's processor outputs, left-padded), same position ids (cumsum of the
attention mask - 1), same prefill + KV-cache decode loop and stopping rule (a row stops at its first
eos; finished rows are fed the pad token with mask 1, as TorchRunner does), so the evaluator scores
an ONNX artifact exactly like the PyTorch model it came from.

Per batch: vision graph on the real images -> features scattered, in order, into the token
embeddings (embed graph) at the image-token positions -> decoder graph with an empty cache (past 0)
-> decoder graph one token at a time, feeding back the `present.*` outputs as `past_key_values.*`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress.errors import ConfigError
from compress.export.files import read_meta
from compress.export.onnx import vision_pixels
from compress.host import cpu_features
from compress.runtime.greedy import greedy

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)
ACCELERATED = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
NP_DTYPES = {"float32": np.float32, "float16": np.float16}


def resolve_providers(providers: str | list[Any] | tuple[Any, ...] | None) -> list[Any]:
    """Requested execution providers that this onnxruntime build has, CPU always last as the fallback.

    None: CPU only. "auto": TensorRT and CUDA when available, then CPU. A list may hold names or
    (name, options) pairs, as `InferenceSession` accepts; unavailable ones are dropped, and a list with
    nothing available (not even CPU) is an error.
    """
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    if providers is None:
        return list(DEFAULT_PROVIDERS)
    if providers == "auto":
        return [p for p in ACCELERATED if p in available] + ["CPUExecutionProvider"]
    if isinstance(providers, str):
        providers = [providers]
    chosen = [p for p in providers if (p[0] if isinstance(p, tuple) else p) in available]
    if not chosen:
        raise ConfigError(f"none of the execution providers {list(providers)} is available in this onnxruntime; "
                          f"available: {sorted(available)}")
    if "CPUExecutionProvider" not in [p[0] if isinstance(p, tuple) else p for p in chosen]:
        chosen.append("CPUExecutionProvider")
    return chosen


def session_options(threads: int | None = None) -> Any:
    """ONNX Runtime session options with `threads` intra-op threads (None: ORT's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return options


class OrtRunner:
    """Runs an export folder written by `compress.export.export_onnx`. `backend` is "onnxruntime"."""

    backend = "onnxruntime"

    def __init__(self, sessions: dict[str, Any], meta: dict[str, Any]):
        if "decoder" not in sessions or "embed" not in sessions:
            raise ConfigError("an OrtRunner needs the embed and decoder graphs (export with components "
                              "including 'decoder')")
        self.sessions = sessions
        self.meta = meta
        # Filled by each `generate`, as in TorchRunner: first_token_s, decode_s, decode_steps.
        self.timings: dict[str, float] = {}
        self.family = meta["family"]
        self.eos = {int(i) for i in meta["eos_token_ids"]}
        self.pad = int(meta["pad_token_id"])
        self.image_token_id = int(meta["image_token_id"])
        self.num_layers = int(meta["num_layers"])
        self.kv_shape = (int(meta["num_kv_heads"]), int(meta["head_dim"]))
        self.dtype = NP_DTYPES[meta["dtype"]]
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        self.present_names = [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        # Cache geometry per layer from the graph itself (a pruned model may differ from its config).
        declared = {i.name: i.shape for i in sessions["decoder"].get_inputs()}
        self.past_shapes = {
            name: tuple(d if isinstance(d, int) else default
                        for d, default in zip(declared[name][1::2], self.kv_shape, strict=True))
            for name in self.past_names
        }

    @classmethod
    def from_dir(cls, path: str | Path, providers: str | list[Any] | None = None,
                 session_options: Any | None = None) -> OrtRunner:
        """Open every graph listed in `export.json` with the given execution providers."""
        import onnxruntime as ort

        meta = read_meta(path)
        chosen = resolve_providers(providers)
        options = session_options or ort.SessionOptions()
        for key, value in meta.get("session", {}).get("config", {}).items():  # what the export was measured with
            options.add_session_config_entry(key, value)
        if (meta.get("int8_kernels") or {}).get("requires") and not cpu_features()["u8s8_exact"]:
            # A `vnni` export on a host whose U8S8 kernels saturate: have ORT use its exact U8U8 kernels.
            options.add_session_config_entry("session.x64quantprecision", "1")
        disabled = list(meta.get("session", {}).get("disabled_optimizers", []))
        sessions = {
            name: ort.InferenceSession(str(Path(path) / file), sess_options=options, providers=chosen,
                                       disabled_optimizers=disabled)
            for name, file in meta["graphs"].items()
        }
        return cls(sessions, meta)

    @property
    def providers(self) -> list[str]:
        return self.sessions["decoder"].get_providers()

    # ---- pieces --------------------------------------------------------------------------------------

    def image_features(self, inputs: dict[str, Any]) -> np.ndarray:
        """[images, tokens, hidden] for the real images of the batch."""
        if "vision" not in self.sessions:
            raise ConfigError("this export has no vision graph, but the inputs carry pixel_values")
        pixels = vision_pixels(self.family, inputs).astype(self.dtype, copy=False)
        return self.sessions["vision"].run(["image_features"], {"pixel_values": pixels})[0]

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        return self.sessions["embed"].run(["inputs_embeds"], {"input_ids": input_ids.astype(np.int64)})[0]

    def prompt_embeds(self, inputs: dict[str, Any]) -> np.ndarray:
        """Token embeddings with the image features written, in order, over the image-token positions."""
        ids = _numpy(inputs["input_ids"]).astype(np.int64)
        embeds = self.embed(ids)
        if inputs.get("pixel_values") is None:
            return embeds
        feats = self.image_features(inputs)
        slots = ids == self.image_token_id
        n_slots, n_feats = int(slots.sum()), feats.shape[0] * feats.shape[1]
        if n_slots != n_feats:
            raise ConfigError(f"image features and image tokens do not match: {n_slots} image tokens in the prompts, "
                              f"{n_feats} feature vectors from {feats.shape[0]} images")
        embeds[slots] = feats.reshape(-1, feats.shape[-1]).astype(embeds.dtype, copy=False)
        return embeds

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """Past tensors of length 0 for a prefill: [batch, kv_heads, 0, head_dim] per layer."""
        return [np.zeros((batch, self.past_shapes[n][0], 0, self.past_shapes[n][1]), dtype=self.dtype)
                for n in self.past_names]

    def decode(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray,
               past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decoder call: (logits [B, S, V], presents)."""
        feeds = {"inputs_embeds": embeds, "attention_mask": mask.astype(np.int64),
                 "position_ids": positions.astype(np.int64), **dict(zip(self.past_names, past, strict=True))}
        out = self.sessions["decoder"].run(["logits", *self.present_names], feeds)
        return out[0], out[1:]

    # ---- the runner contract ------------------------------------------------------------------------

    def logits(self, inputs: dict[str, Any]) -> torch.Tensor:
        """Teacher-forced logits for a full sequence (prompt and answer), float32 [B, T, V]."""
        mask = _numpy(inputs["attention_mask"]).astype(np.int64)
        embeds = self.prompt_embeds(inputs)
        logits, _ = self.decode(embeds, mask, position_ids(mask), self.empty_past(mask.shape[0]))
        return torch.from_numpy(np.ascontiguousarray(logits)).float()

    def generate(self, inputs: dict[str, Any], max_new_tokens: int, ignore_eos: bool = False) -> list[list[int]]:
        t0 = time.perf_counter()
        mask = _numpy(inputs["attention_mask"]).astype(np.int64)
        logits, past = self.decode(self.prompt_embeds(inputs), mask, position_ids(mask), self.empty_past(len(mask)))
        state = {"mask": mask, "pos": position_ids(mask)[:, -1:], "past": past, "steps": 0}

        def step(fed: list[int]) -> list[int]:
            mask = np.concatenate([state["mask"], np.ones((len(fed), 1), dtype=np.int64)], axis=-1)
            pos = state["pos"] + 1
            logits, past = self.decode(self.embed(np.asarray(fed, dtype=np.int64)[:, None]), mask, pos, state["past"])
            state.update(mask=mask, pos=pos, past=past, steps=state["steps"] + 1)
            return logits[:, -1].argmax(-1).tolist()

        first = logits[:, -1].argmax(-1).tolist()
        t1 = time.perf_counter()
        tokens = greedy(first, step, self.eos, self.pad, max_new_tokens, ignore_eos)
        self.timings = {"first_token_s": t1 - t0, "decode_s": time.perf_counter() - t1, "decode_steps": state["steps"]}
        return tokens


def position_ids(mask: np.ndarray) -> np.ndarray:
    return np.clip(mask.astype(np.int64).cumsum(-1) - 1, 0, None)


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)
