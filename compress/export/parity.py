"""Prove an export folder computes what the PyTorch model computes, graph by graph and end to end.

Inputs are fresh and shaped unlike the export's tracing dummies (batch 3 instead of 2, a 9-token
left-padded prefill instead of 5 tokens on a 3-token past, an empty past, then several decode
steps), so a dimension the exporter accidentally froze shows up here rather than in production.

Compared, each against the same torch modules the graph was exported from (with the model's own
quantized modules: fake-quant Int8Linear, bnb Linear4bit):
- vision: image_features for a batch of random pixel values;
- embed: inputs_embeds for random token ids;
- decoder: logits and every present.N.key/value at prefill and at each decode step, the ONNX side
  feeding back its own presents (so cache drift accumulates as it would in generation);
- end_to_end: `OrtRunner.logits` vs `TorchRunner.logits` on processor-built image + prompt batches,
  which also checks the feature merge and, through the real model, the export wrappers.
Only positions the attention mask keeps are compared: a left-padding row attends to nothing, and
its (never used) values differ between implementations of the fully-masked softmax.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from compress.errors import CompressError
from compress.export.files import read_meta, write_meta
from compress.export.onnx import dummy_images
from compress.export.wrappers import DecoderWithPast, decoder_module, vision_module
from compress.host import cpu_features

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3
QUESTIONS = ("what is it?", "what color is the largest shape in this picture?", "where?")


class ParityError(CompressError):
    """An exported graph disagrees with PyTorch beyond its tolerance; names the output and the error.

    `errors` holds the max abs error of every compared output, `failures` one line per output that missed.
    """

    def __init__(self, message: str, errors: dict[str, float] | None = None, failures: list[str] | None = None):
        super().__init__(message)
        self.errors = errors or {}
        self.failures = failures or [message]


def _tol(value: float | dict[str, float], graph: str, default: float) -> float:
    if isinstance(value, dict):
        return float(value.get(graph, default))
    return float(value)


class _Checker:
    def __init__(self, atol: float | dict[str, float], rtol: float | dict[str, float]):
        self.atol, self.rtol = atol, rtol
        self.errors: dict[str, float] = {}
        self.failures: list[str] = []

    def compare(self, graph: str, name: str, got: np.ndarray, ref: np.ndarray, keep: np.ndarray | None = None) -> None:
        """Record max |got - ref| under `graph.name`, and a failure if any element is beyond atol + rtol*|ref|."""
        got = np.asarray(got, dtype=np.float64)
        ref = np.asarray(ref, dtype=np.float64)
        if got.shape != ref.shape:
            raise ParityError(f"{graph} output '{name}': shape {got.shape} from ONNX Runtime, {ref.shape} from torch")
        if keep is not None:
            got, ref = got[keep], ref[keep]
        diff = np.abs(got - ref)
        err = float(diff.max()) if diff.size else 0.0
        if not np.isfinite(diff).all():
            raise ParityError(f"{graph} output '{name}': non-finite values (ONNX Runtime or torch)")
        key = f"{graph}.{name}"
        self.errors[key] = max(err, self.errors.get(key, 0.0))
        atol, rtol = _tol(self.atol, graph, DEFAULT_ATOL), _tol(self.rtol, graph, DEFAULT_RTOL)
        bad = diff > atol + rtol * np.abs(ref)
        if bad.any():
            self.failures.append(
                f"{graph} output '{name}': max abs error {err:.3g} exceeds atol={atol:g} + rtol={rtol:g}*|ref| "
                f"at {int(bad.sum())} of {diff.size} compared values"
            )


def _valid_kv(mask: np.ndarray, like: np.ndarray) -> np.ndarray:
    """[B, kv_heads, total, head_dim] boolean: cache positions the mask keeps."""
    return np.broadcast_to(mask.astype(bool)[:, None, :, None], like.shape)


def _sample_images(varied: bool, seed: int) -> list[Image.Image]:
    """Three random images: square, or (for graphs that take any image size) three different shapes."""
    if not varied:
        return dummy_images(3, seed=seed)
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((64, 64), (32, 64), (72, 40))]


def _left_padded_mask(lengths: list[int], total: int) -> np.ndarray:
    mask = np.zeros((len(lengths), total), dtype=np.int64)
    for row, n in enumerate(lengths):
        mask[row, total - n :] = 1
    return mask


@torch.no_grad()
def _torch_decoder(module: DecoderWithPast, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray,
                   past: list[torch.Tensor], extra: dict[str, np.ndarray]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The wrapper on the same inputs as the graph (`extra` in the graph's input order)."""
    args = [torch.from_numpy(a) for a in (embeds, mask, positions, *extra.values())]
    out = module(*args, tuple(past))
    return out[0], list(out[1:])


def _decoder_extras(runner: Any, meta: dict[str, Any], mask: np.ndarray, rng: np.random.Generator,
                    dtype: Any) -> dict[str, np.ndarray]:
    """A prefill's extra decoder inputs: PaliGemma/Gemma3 blocks (a prefix block, a block inside the prompt,
    a causal row); Mllama vision states of two tiles per row, attended by every token after the first two."""
    extra: dict[str, np.ndarray] = {}
    batch, total = mask.shape
    if runner.blocks:
        blocks = np.full((batch, total), -1, dtype=np.int64)
        blocks[0, total - 6:total - 2], blocks[1, 2:5] = 0, 3
        extra["block_sequence_ids"] = blocks
    if runner.cross:
        patches = int(meta["cross_attention_tokens"])
        extra["cross_attention_states"] = rng.standard_normal((2 * batch, patches, meta["hidden_size"])).astype(dtype)
        cross = np.ones((batch, total, 1, 2), dtype=np.int64)
        cross[:, :2] = 0
        extra["cross_attention_mask"] = cross
    return extra


def _embed_pair(embedding: torch.nn.Module, runner: Any, meta: dict[str, Any],
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(graph output, PyTorch reference) for the embed graph: random ids, and where the graph scatters image
    features, three image tokens in two rows with random feature rows written over them."""
    image_id = int(meta["image_token_id"])
    ids = rng.integers(0, meta["vocab_size"], (3, 7))
    ids[ids == image_id] = 0
    feats = None
    if runner.scatters:
        ids[0, 2:4] = ids[2, 5] = image_id
        feats = rng.standard_normal((3, meta["hidden_size"])).astype(runner.dtype)
    slots = ids == image_id
    with torch.no_grad():
        ref = embedding(torch.from_numpy(np.where(slots, 0, ids))).float().numpy()
    if feats is not None:
        ref[slots] = feats
    return runner.embed(ids, feats), ref


def _vision_pair(model: torch.nn.Module, adapter: Any, processor: Any, runner: Any, samples: list[tuple[Any, str]],
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(graph output, PyTorch reference) for the vision graph: Qwen2-VL patches of three unseen image sizes
    and Mllama tiles come through the processor; image-batch graphs take random pixels at the export size."""
    if runner.mrope or runner.cross:
        batch = adapter.build_inputs(processor, [s[0] for s in samples], [s[1] for s in samples]).inputs
        with torch.no_grad():
            if runner.mrope:
                out = model.model.get_image_features(batch["pixel_values"].to(model.dtype), batch["image_grid_thw"])
                return runner.image_features(batch), torch.cat(list(out.pooler_output)).float().numpy()
            ref = vision_module(model, adapter, ())(batch["pixel_values"].to(model.dtype), batch["aspect_ratio_ids"],
                                                     batch["aspect_ratio_mask"])
        return runner.image_features(batch), ref.float().numpy()
    pixels = rng.standard_normal((3, *runner.meta["pixel_shape"])).astype(runner.dtype)
    with torch.no_grad():
        ref = vision_module(model, adapter, pixels.shape)(torch.from_numpy(pixels)).float().numpy()
    return runner.sessions["vision"].run(["image_features"], {"pixel_values": pixels})[0], ref


def _check_decoder(check: _Checker, decoder: DecoderWithPast, embedding: torch.nn.Module, runner: Any,
                   meta: dict[str, Any], rng: np.random.Generator, decode_steps: int) -> None:
    """Decoder graph vs wrapper: a left-padded prefill on an empty past, then `decode_steps` greedy steps, the
    graph feeding back its own presents (so cache drift accumulates as it would in generation)."""
    from compress.runtime.ort_runner import position_ids

    np_dtype = runner.dtype
    lengths, total = [6, 9, 4], 9
    mask = _left_padded_mask(lengths, total)
    ids = rng.integers(0, meta["vocab_size"], (3, total))
    with torch.no_grad():
        embeds = embedding(torch.from_numpy(ids)).numpy().astype(np_dtype)
    positions = position_ids(mask)
    if runner.mrope:  # three different M-RoPE axes, as an image's tokens have
        positions = np.stack([positions, positions // 2, positions + 1])
    extra = _decoder_extras(runner, meta, mask, rng, np_dtype)
    empty = runner.empty_past(3)
    ref_logits, ref_past = _torch_decoder(decoder, embeds, mask, positions, [torch.from_numpy(p) for p in empty],
                                          extra)
    logits, past = runner.decode(embeds, mask, positions, empty, extra)
    keep = mask.astype(bool)
    check.compare("decoder", "prefill.logits", logits, ref_logits.float().numpy(), keep)
    for got, ref in zip(past, ref_past, strict=True):
        check.compare("decoder", "prefill.present", got, ref.float().numpy(), _valid_kv(mask, got))
    if runner.selects_logits:  # what generation asks for: the last position's logits only
        last, _ = runner.decode(embeds, mask, positions, empty, extra, last_only=True)
        check.compare("decoder", "prefill.last_logits", last, ref_logits[:, -1:].float().numpy())
    next_tok = ref_logits[:, -1].argmax(-1).numpy()
    pos = positions[..., -1:]
    for _ in range(decode_steps):
        mask = np.concatenate([mask, np.ones((3, 1), dtype=np.int64)], axis=-1)
        pos = pos + 1
        with torch.no_grad():
            step = embedding(torch.from_numpy(next_tok[:, None])).numpy().astype(np_dtype)
        step_extra = runner.step_extras(extra)
        ref_logits, ref_past = _torch_decoder(decoder, step, mask, pos, ref_past, step_extra)
        logits, past = runner.decode(step, mask, pos, past, step_extra)
        check.compare("decoder", "decode.logits", logits, ref_logits.float().numpy())
        for got, ref in zip(past, ref_past, strict=True):
            check.compare("decoder", "decode.present", got, ref.float().numpy(), _valid_kv(mask, got))
        next_tok = ref_logits[:, -1].argmax(-1).numpy()


def check_parity(
    model: torch.nn.Module,
    adapter: Any,
    processor: Any,
    out_dir: str | Path,
    atol: float | dict[str, float] = DEFAULT_ATOL,
    rtol: float | dict[str, float] = DEFAULT_RTOL,
    samples: list[tuple[Image.Image, str]] | None = None,
    decode_steps: int = 3,
    providers: Any = None,
    seed: int = 0,
    record: bool = True,
    session_options: Any = None,
) -> dict[str, float]:
    """Max abs error per graph output (keys like "decoder.prefill.logits"); raises ParityError on a miss.

    `atol` / `rtol` are one number or a dict by graph name (vision, embed, decoder, end_to_end).
    `samples` are (image, question) pairs for the end-to-end check (default: 3 random images with
    questions of different lengths). `record=True` also stores the errors in export.json.
    `session_options` (an onnxruntime.SessionOptions) e.g. lowers the optimization level to compare
    the graph's float QDQ semantics instead of ORT's integer kernels.
    """
    from compress.runtime.ort_runner import OrtRunner
    from compress.runtime.torch_runner import TorchRunner

    meta = read_meta(out_dir)
    runner = OrtRunner.from_dir(out_dir, providers=providers, session_options=session_options)
    check = _Checker(atol, rtol)
    rng = np.random.default_rng(seed)
    model.eval()

    if samples is None:
        samples = list(zip(_sample_images(runner.mrope, seed + 1), QUESTIONS, strict=True))
    if "vision" in runner.sessions:
        check.compare("vision", "image_features", *_vision_pair(model, adapter, processor, runner, samples, rng))

    embedding = adapter.component(model, "language").get_input_embeddings()
    check.compare("embed", "inputs_embeds", *_embed_pair(embedding, runner, meta, rng))

    _check_decoder(check, decoder_module(model, adapter), embedding, runner, meta, rng, decode_steps)

    if "vision" in runner.sessions:
        images, questions = [s[0] for s in samples], [s[1] for s in samples]
        batch = adapter.build_inputs(processor, images, questions)
        torch_runner = TorchRunner.for_adapter(model, adapter, processor)
        ref = torch_runner.logits(batch.inputs).numpy()
        got = runner.logits(batch.inputs).numpy()
        keep = batch.inputs["attention_mask"].numpy().astype(bool)
        check.compare("end_to_end", "logits", got, ref, keep)

    errors = dict(sorted(check.errors.items()))
    if record:
        meta = read_meta(out_dir)
        meta["parity"] = {"max_abs_error": errors, "atol": atol, "rtol": rtol, "providers": runner.providers,
                          "failures": check.failures, "host_cpu": cpu_features()}
        write_meta(out_dir, meta)
    if check.failures:
        more = f" (+{len(check.failures) - 1} more)" if len(check.failures) > 1 else ""
        raise ParityError(check.failures[0] + more, errors, check.failures)
    return errors


def distribution_parity(ref: Any, got: Any) -> dict[str, float]:
    """Mean next-token KL(ref || got) in nats and the top-1 agreement of two `Reference`s (teacher-forced top-1
    tokens and log-probabilities at the same positions), and how many positions they cover.

    What a gate cares about, and what holds for quantized graphs: an activation on a rounding boundary that
    integer kernels and PyTorch's float fake-quant round one step apart moves a few logits by whole units on
    real weights while the distribution does not move; a wrong scale or a dropped op moves it."""
    from compress.checks import metrics as M

    return {"kl": M.logit_kl(ref.logprobs, got.logprobs), "top1": M.token_agreement(ref.top1, got.top1),
            "positions": int(ref.top1.numel())}
