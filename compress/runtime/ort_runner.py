"""Greedy generation over exported ONNX graphs in ONNX Runtime, with the TorchRunner contract.

Same inputs (the adapter's processor outputs, left-padded), same position ids (cumsum of the
attention mask - 1), same prefill + KV-cache decode loop and stopping rule (a row stops at its first
eos; finished rows are fed the pad token with mask 1, as TorchRunner does), so the evaluator scores
an ONNX artifact exactly like the PyTorch model it came from.

Per batch: vision graph on the real images -> features scattered, in order, into the token
embeddings (embed graph) at the image-token positions -> decoder graph with an empty cache (past 0)
-> decoder graph one token at a time, feeding back the `present.*` outputs as `past_key_values.*`.

Exports whose decoder runs GroupQueryAttention with mask-derived lengths (`past_buffer: shared` in
export.json) generate on the CPU provider with one preallocated cache buffer per layer bound as both past
and present (ONNX Runtime's past_present_share_buffer): the kernel writes each new key/value in place, and
nothing copies the cache between steps.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from compress.errors import ConfigError
from compress.export.files import read_meta
from compress.host import cpu_features
from compress.runtime.greedy import greedy
from compress.runtime.mrope import VisionSpec, rope_index
from compress.runtime.vision_inputs import block_sequence_ids, vision_feeds_for
from compress.runtime.vision_inputs import numpy as _numpy

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
    """ONNX Runtime session options with `threads` intra-op threads (None: ORT's default), errors logged only:
    ORT warns at every load that logits_index, an input with a default, is not constant-folded (by design)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    return options


_new_options = session_options  # from_dir's parameter of that name shadows it


class OrtRunner:
    """Runs an export folder written by `compress.export.onnx.export_onnx`. `backend` is "onnxruntime"."""

    backend = "onnxruntime"

    def __init__(self, sessions: dict[str, Any], meta: dict[str, Any]):
        if "decoder" not in sessions or "embed" not in sessions:
            raise ConfigError("an OrtRunner needs the embed and decoder graphs (export with components "
                              "including 'decoder')")
        self.sessions = sessions
        self.meta = meta
        # An INT4 export's int8 prefill graph (compress.export.prefill) takes every call of more than one position.
        self.prefill = sessions.get("prefill")
        # Filled by each `generate`, as in TorchRunner: first_token_s, decode_s, decode_steps.
        self.timings: dict[str, float] = {}
        self.family = meta["family"]
        self.eos = {int(i) for i in meta["eos_token_ids"]}
        self.pad = int(meta["pad_token_id"])
        self.image_token_id = int(meta["image_token_id"])
        self.num_layers = int(meta["num_layers"])
        self.kv_shape = (int(meta["num_kv_heads"]), int(meta["head_dim"]))
        self.dtype = NP_DTYPES[meta["dtype"]]
        # Qwen2-VL's M-RoPE: [3, batch, seq] positions from the image grid, and patch-level vision feeds.
        self.mrope = meta.get("positions") == "mrope"
        self.vision_spec = VisionSpec.from_meta(meta["vision_inputs"]) if meta.get("vision_inputs") else None
        # PaliGemma / Gemma3: the decoder graph takes the prompt's bidirectional blocks (-1 at decode steps).
        self.blocks = meta.get("attention_blocks")
        # Mllama: the decoder graph takes the vision states and the cross-attention mask on every call.
        self.cross = bool(meta.get("cross_attention"))
        layers = meta.get("cache_layers", list(range(self.num_layers)))  # Mllama: self-attention layers only
        self.past_names = [f"past_key_values.{i}.{kv}" for i in layers for kv in ("key", "value")]
        self.present_names = [f"present.{i}.{kv}" for i in layers for kv in ("key", "value")]
        # Cache geometry per layer from the graph itself (a pruned model may differ from its config).
        declared = {i.name: i.shape for i in sessions["decoder"].get_inputs()}
        # Exports that take `logits_index` compute logits only where asked (the last position when generating;
        # optional in the graph, so a runtime that does not know it gets every position).
        self.selects_logits = bool(meta.get("logits_index"))
        # The embed graph writes image feature rows over the image tokens (every family but Mllama's).
        self.scatters = "image_features" in {i.name for i in sessions["embed"].get_inputs()}
        self.no_features = np.zeros((0, int(meta["hidden_size"])), dtype=self.dtype)
        # One preallocated past/present buffer per layer while generating (CPU provider only: a GPU provider
        # would copy CPU-bound buffers to the device on every call).
        self.shared_past = (meta.get("past_buffer") == "shared"
                            and sessions["decoder"].get_providers() == ["CPUExecutionProvider"])
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
        options = session_options or _new_options()
        for key, value in meta.get("session", {}).get("config", {}).items():  # what the export was measured with
            options.add_session_config_entry(key, value)
        if ((meta.get("int8_kernels") or {}).get("requires") and not cpu_features()["u8s8_exact"]
                and meta.get("precision") != "fp16"):
            # A `vnni` export on a host whose U8S8 kernels saturate: have ORT use its exact U8U8 kernels. Not
            # for fp16 graphs (an engine's source graphs): their Q/DQ run as dequantize + fp16 math, with no
            # integer GEMM to saturate, and ORT 1.32's S8 -> U8 rewrite breaks per-axis fp16 DequantizeLinear.
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
        """Image-token rows [tokens, hidden] of the batch's real images, in order (Mllama: its cross-attention
        states, [tiles, patches, hidden])."""
        if "vision" not in self.sessions:
            raise ConfigError("this export has no vision graph, but the inputs carry pixel_values")
        fed = vision_feeds_for(self.family, inputs, self.dtype, self.vision_spec)
        feats = self.sessions["vision"].run(["image_features"], fed.feeds)[0]
        return feats if fed.restore is None else feats[fed.restore]  # Qwen: window order back to image order

    def embed(self, input_ids: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        """Token embeddings, with `features` rows written over the image tokens in order (none: no rows)."""
        feeds = {"input_ids": input_ids.astype(np.int64)}
        if self.scatters:
            feeds["image_features"] = features if features is not None else self.no_features
        return self.sessions["embed"].run(["inputs_embeds"], feeds)[0]

    def prompt_embeds(self, inputs: dict[str, Any]) -> np.ndarray:
        """Token embeddings with the image features written, in order, over the image-token positions."""
        ids = _numpy(inputs["input_ids"]).astype(np.int64)
        if inputs.get("pixel_values") is None or not self.scatters:  # Mllama's image token is an ordinary token
            return self.embed(ids)
        feats = self.image_features(inputs)
        n_slots, n_feats = int((ids == self.image_token_id).sum()), feats.shape[0]
        if n_slots != n_feats:
            raise ConfigError(f"image features and image tokens do not match: {n_slots} image tokens in the prompts, "
                              f"{n_feats} feature vectors from the images")
        return self.embed(ids, feats.astype(self.dtype, copy=False))

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """Past tensors of length 0 for a prefill: [batch, kv_heads, 0, head_dim] per layer."""
        return [np.zeros((batch, self.past_shapes[n][0], 0, self.past_shapes[n][1]), dtype=self.dtype)
                for n in self.past_names]

    def prompt_extras(self, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        """A prefill's decoder inputs beyond embeddings, mask, positions and cache: PaliGemma/Gemma3's
        bidirectional blocks (from token types), Mllama's cross-attention states and mask."""
        extra: dict[str, np.ndarray] = {}
        if self.blocks:
            types = inputs.get("token_type_ids")
            ids = _numpy(inputs["input_ids"])
            # As upstream: without token types the prompt is plain causal.
            extra["block_sequence_ids"] = (np.full(ids.shape, -1, dtype=np.int64) if types is None
                                           else block_sequence_ids(self.blocks, _numpy(types)))
        if self.cross:
            if inputs.get("cross_attention_mask") is None or inputs.get("pixel_values") is None:
                raise ConfigError("this Mllama export needs an image per prompt (pixel_values and "
                                  "cross_attention_mask from the processor)")
            extra["cross_attention_states"] = self.image_features(inputs)
            extra["cross_attention_mask"] = _numpy(inputs["cross_attention_mask"]).astype(np.int64)
        return extra

    @staticmethod
    def step_extras(extra: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The same inputs at a decode step: causal blocks, the same vision states, the mask's last row."""
        out = dict(extra)
        if "block_sequence_ids" in out:
            out["block_sequence_ids"] = np.full((len(out["block_sequence_ids"]), 1), -1, dtype=np.int64)
        if "cross_attention_mask" in out:
            out["cross_attention_mask"] = out["cross_attention_mask"][:, -1:]
        return out

    def decode(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list[np.ndarray],
               extra: dict[str, np.ndarray] | None = None,
               last_only: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decoder call: (logits [B, S, V], or [B, 1, V] for the last position only when `last_only` and the
        graph can; presents). `extra`: see `prompt_extras` (blocks default to causal)."""
        feeds = {**self._feeds(embeds, mask, positions, extra, last_only),
                 **dict(zip(self.past_names, past, strict=True))}
        out = self._decoder(embeds).run(["logits", *self.present_names], feeds)
        return out[0], out[1:]

    def _decoder(self, embeds: np.ndarray) -> Any:
        """The session for a call of these positions: the prefill graph for prompts where the export has one."""
        return self.prefill if self.prefill is not None and embeds.shape[1] > 1 else self.sessions["decoder"]

    def _feeds(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray,
               extra: dict[str, np.ndarray] | None, last_only: bool) -> dict[str, np.ndarray]:
        """A decoder call's inputs other than the cache (blocks default to causal)."""
        feeds = {"inputs_embeds": embeds, "attention_mask": mask.astype(np.int64),
                 "position_ids": positions.astype(np.int64)}
        if self.selects_logits:
            seq = embeds.shape[1]
            feeds["logits_index"] = np.arange(seq - 1 if last_only else 0, seq, dtype=np.int64)
        if self.blocks:
            feeds["block_sequence_ids"] = np.full(embeds.shape[:2], -1, np.int64)
        return {**feeds, **(extra or {})}

    def positions(self, inputs: dict[str, Any], mask: np.ndarray) -> np.ndarray:
        """Prompt positions: cumsum of the mask - 1 ([batch, seq]), or M-RoPE's [3, batch, seq]."""
        if not self.mrope:
            return position_ids(mask)
        grid = inputs.get("image_grid_thw")
        return rope_index(_numpy(inputs["input_ids"]), mask, None if grid is None else _numpy(grid),
                          self.image_token_id, self.vision_spec.spatial_merge_size if self.vision_spec else 1)

    # ---- the runner contract ------------------------------------------------------------------------

    def logits(self, inputs: dict[str, Any]) -> Any:
        """Teacher-forced logits for a full sequence (prompt and answer), a float32 torch tensor [B, T, V].

        The evaluator's call, in the runner contract's type; torch is imported here, so generating with
        an export folder never loads it."""
        import torch

        mask = _numpy(inputs["attention_mask"]).astype(np.int64)
        embeds = self.prompt_embeds(inputs)
        logits, _ = self.decode(embeds, mask, self.positions(inputs, mask), self.empty_past(mask.shape[0]),
                                self.prompt_extras(inputs))
        return torch.from_numpy(np.ascontiguousarray(logits)).float()

    def shared_buffers(self, batch: int, length: int) -> list[Any]:
        """Zeroed [batch, kv_heads, length, head_dim] OrtValues, one per past input, for `decode_shared`."""
        import onnxruntime as ort

        return [ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, self.past_shapes[n][0], length,
                                                           self.past_shapes[n][1]), dtype=self.dtype))
                for n in self.past_names]

    def decode_shared(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray, buffers: list[Any],
                      extra: dict[str, np.ndarray] | None = None, bindings: dict[int, Any] | None = None) -> np.ndarray:
        """`decode` with the cache in `buffers` (see `shared_buffers`), bound as past and present: the kernel
        appends the new keys/values in place. Returns the last position's logits [B, 1, V].

        `bindings`, kept by the caller across the steps of one generation over the same buffers, holds each
        session's binding: the cache is bound once, and a step rebinds only its own few inputs (binding the
        48 cache tensors of a 24-layer decoder again costs ~0.2 ms a step)."""
        import onnxruntime as ort

        session = self._decoder(embeds)
        binding = None if bindings is None else bindings.get(id(session))
        if binding is None:
            binding = session.io_binding()
            binding.bind_output("logits")  # bound first: outputs come back in binding order
            for past, present, buffer in zip(self.past_names, self.present_names, buffers, strict=True):
                binding.bind_ortvalue_input(past, buffer)
                binding.bind_ortvalue_output(present, buffer)
            if bindings is not None:
                bindings[id(session)] = binding
        # As OrtValues: bind_cpu_input cannot bind an input with a default (logits_index, compress.export.genai).
        fed = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))
               for name, value in self._feeds(embeds, mask, positions, extra, last_only=True).items()}
        for name, value in fed.items():
            binding.bind_ortvalue_input(name, value)
        session.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()
        return logits if self.selects_logits else logits[:, -1:]

    def generate(self, inputs: dict[str, Any], max_new_tokens: int, ignore_eos: bool = False) -> list[list[int]]:
        t0 = time.perf_counter()
        mask = _numpy(inputs["attention_mask"]).astype(np.int64)
        positions = self.positions(inputs, mask)
        extra = self.prompt_extras(inputs)
        embeds = self.prompt_embeds(inputs)
        if self.shared_past:
            past = self.shared_buffers(len(mask), mask.shape[1] + max(max_new_tokens - 1, 0))
            logits = self.decode_shared(embeds, mask, positions, past, extra)
        else:
            logits, past = self.decode(embeds, mask, positions, self.empty_past(len(mask)), extra, last_only=True)
        # A decode step continues from the last prompt position + 1 (on every M-RoPE axis).
        state = {"mask": mask, "pos": positions[..., -1:], "past": past, "steps": 0}
        bindings: dict[int, Any] = {}  # the decode steps' binding of the shared cache, made once
        extra = self.step_extras(extra)

        def step(fed: list[int]) -> list[int]:
            mask = np.concatenate([state["mask"], np.ones((len(fed), 1), dtype=np.int64)], axis=-1)
            pos = state["pos"] + 1
            embeds = self.embed(np.asarray(fed, dtype=np.int64)[:, None])
            if self.shared_past:
                logits, past = self.decode_shared(embeds, mask, pos, state["past"], extra, bindings), state["past"]
            else:
                logits, past = self.decode(embeds, mask, pos, state["past"], extra)
            state.update(mask=mask, pos=pos, past=past, steps=state["steps"] + 1)
            return logits[:, -1].argmax(-1).tolist()

        first = logits[:, -1].argmax(-1).tolist()
        t1 = time.perf_counter()
        tokens = greedy(first, step, self.eos, self.pad, max_new_tokens, ignore_eos)
        self.timings = {"first_token_s": t1 - t0, "decode_s": time.perf_counter() - t1, "decode_steps": state["steps"]}
        return tokens


def position_ids(mask: np.ndarray) -> np.ndarray:
    return np.clip(mask.astype(np.int64).cumsum(-1) - 1, 0, None)
