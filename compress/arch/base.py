"""What every architecture adapter shares: where the components live, how prompts and batches are built.

Stages never touch a model family's quirks directly; they ask the adapter. That keeps a new family to
one small subclass (component paths, prompt format, end-of-turn token) instead of edits everywhere.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from PIL import Image

from compress.arch.export_spec import ExportSpec
from compress.errors import ConfigError, first_line

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class Batch:
    """Model-ready inputs plus where the reference answer sits, so scoring never re-tokenizes.

    `answer_positions[b, t]` is True where the logit at position t predicts an answer token (token t+1
    belongs to the answer or to the end-of-turn token after it).
    """

    inputs: dict[str, torch.Tensor]
    answer_positions: torch.Tensor | None
    prompt_lengths: list[int]


def resolve_path(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """Follow a dotted attribute path; a ConfigError (not AttributeError) says which step is missing."""
    module = root
    for i, part in enumerate(path.split(".")):
        nxt = getattr(module, part, None)
        if not isinstance(nxt, torch.nn.Module):
            where = ".".join(path.split(".")[:i]) or type(root).__name__
            raise ConfigError(f"module path '{path}' does not resolve: '{where}' has no submodule '{part}'")
        module = nxt
    return module


class Adapter:
    """One model family. Instances are cheap; `get_adapter` hands out a fresh one per call.

    `decoder_layer` starts as the family default for the model_type and is replaced by the class
    actually found in the model when `load` (or `bind`) sees one, because e.g. LLaVA and Idefics3 can
    sit on top of different text backbones.
    """

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    components: ClassVar[dict[str, str]]
    # Default decoder-layer class per model_type, used until a model is bound.
    default_decoder_layers: ClassVar[dict[str, str]]
    # Placeholder the processor expands into image tokens, and the prompt used without a chat template.
    image_token: ClassVar[str] = "<image>"
    # The token the processor expands the placeholder into, where it differs (Gemma3's soft tokens).
    image_fill_token: ClassVar[str | None] = None
    default_prompt: ClassVar[str] = "<image>\n{question}"
    # True where `default_prompt` is the family's documented format (no chat template by design).
    native_prompt: ClassVar[bool] = False
    # Stage types this family cannot take yet, with the reason (checked before any weights load).
    refused_stages: ClassVar[dict[str, str]] = {}
    # How an answer is appended to the generation prompt, and the token that closes the turn
    # (None: the tokenizer's eos_token).
    answer_join: ClassVar[str] = " "
    end_of_turn: ClassVar[str | None] = None
    # Whether runners pass 1-D position ids (cumsum of the attention mask). Families with their own
    # multimodal positions (Qwen2-VL's 3-D M-RoPE) compute them inside the model instead.
    explicit_positions: ClassVar[bool] = True
    # What the ONNX exporter builds for this family (None: not exportable); see compress.arch.export_spec.
    export_spec: ClassVar[ExportSpec | None] = None

    def __init__(self, model_type: str | None = None):
        self.model_type = model_type or self.model_types[0]
        self.decoder_layer: str = self.default_decoder_layers[self.model_type]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_type={self.model_type!r}, decoder_layer={self.decoder_layer!r})"

    # ---- structure -------------------------------------------------------------------------------

    def component(self, model: torch.nn.Module, name: str) -> torch.nn.Module:
        if name not in self.components:
            raise ConfigError(f"{self.name} has no component '{name}'; it has: {', '.join(sorted(self.components))}")
        return resolve_path(model, self.components[name])

    def decoder_layers(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The text decoder's layers in order (what sequential, layer-by-layer stages walk)."""
        cls_name = self.find_decoder_layer(model)
        return [m for m in self.component(model, "language").modules() if type(m).__name__ == cls_name]

    def find_decoder_layer(self, model: torch.nn.Module) -> str:
        """Class name of the text decoder layer: the element type of the language model's `layers`."""
        language = self.component(model, "language")
        layers = getattr(language, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return type(layers[0]).__name__
        counts = Counter(type(m).__name__ for m in language.modules() if type(m).__name__.endswith("Layer"))
        if not counts:
            raise ConfigError(f"cannot find the decoder layers of {self.name} under {self.components['language']}")
        return counts.most_common(1)[0][0]

    def bind(self, model: torch.nn.Module) -> Adapter:
        """Record facts that vary with the checkpoint (the decoder layer class, a token reduction). Returns
        self."""
        from compress.tokens.install import record_of

        self.decoder_layer = self.find_decoder_layer(model)
        rec = record_of(model)
        self.image_tokens = (rec["tokens_in"], rec["tokens"]) if rec else None
        return self

    # Image tokens per image (as the processor expands them, as the reduced tower emits them) where a
    # `tokens` stage reduced them; None: the processor's count.
    image_tokens: tuple[int, int] | None = None

    # Positions for one decode step of a family with its own position scheme (None: the model's own).
    decode_positions: Any = None

    def refuse(self, stage: Any) -> str | None:
        """Why this family cannot take `stage` (a stage config), or None; asked before any weights load."""
        if stage.type == "tokens" and self.tokens_refused:
            return self.tokens_refused
        return self.refused_stages.get(stage.type)

    # Why a `tokens` stage cannot reduce this family's image tokens (None: it can).
    tokens_refused: ClassVar[str | None] = (
        "its image tokens are not one tower patch grid per image fed to a projector (tiles, pixel shuffle, "
        "M-RoPE positions or cross-attention); token reduction is wired for LLaVA-style towers")

    # ---- export ----------------------------------------------------------------------------------

    def block_masks(self, block_sequence_ids: torch.Tensor, **mask_kwargs: Any) -> Any:
        """The decoder's attention masks with bidirectional blocks (`export_spec.attention_blocks`), built by
        the family's own masking functions so an exported graph computes what the model computes.
        `mask_kwargs`: transformers' mask-function arguments (config, inputs_embeds, attention_mask, cache,
        position_ids)."""
        raise ConfigError(f"{self.name} declares no bidirectional attention blocks")

    def cross_attention_tokens(self, model: torch.nn.Module) -> int:
        """Vision states per tile that the decoder's cross-attention layers read (`export_spec.cross_attention`)."""
        raise ConfigError(f"{self.name} has no cross-attention layers")

    # ---- text ------------------------------------------------------------------------------------

    # A recipe's `evaluation.prompt` ("<image> question: {question} answer:"): overrides the chat template.
    prompt_template: str | None = None

    def use_prompt(self, template: str | None, where: str = "prompt") -> None:
        """Prompt every batch with `template` (None: the chat template); it must hold this model's image token."""
        if template is not None and self.image_token not in template:
            raise ConfigError(f"{where} must contain the model's image token '{self.image_token}' ({self.name}), "
                              f"got {template!r}")
        self.prompt_template = template

    def format_prompt(self, processor: Any, question: str) -> str:
        if self.prompt_template is not None:
            return self.prompt_template.format(question=question)
        if getattr(processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.default_prompt.format(question=question)

    def end_token(self, processor: Any) -> str:
        """The token that closes an answer: the family's end-of-turn token if the vocab has it."""
        tok = processor.tokenizer
        if self.end_of_turn is not None and _token_id(tok, self.end_of_turn) is not None:
            return self.end_of_turn
        if tok.eos_token is None:
            raise ConfigError(f"the {self.name} tokenizer has no eos token and no '{self.end_of_turn}' token")
        return tok.eos_token

    def eos_token_ids(self, model: torch.nn.Module, processor: Any) -> list[int]:
        """Every id that ends generation: end-of-turn, tokenizer eos, and the generation config's."""
        tok = processor.tokenizer
        ids: list[int | None] = [_token_id(tok, self.end_token(processor)), tok.eos_token_id]
        for src in (getattr(model, "generation_config", None), text_config(model)):
            eos = getattr(src, "eos_token_id", None)
            ids.extend(eos if isinstance(eos, list | tuple) else [eos])
        out: list[int] = []
        for i in ids:
            if i is not None and int(i) not in out:
                out.append(int(i))
        return out

    def pad_token_id(self, processor: Any) -> int:
        tok = processor.tokenizer
        if tok.pad_token_id is not None:
            return int(tok.pad_token_id)
        if tok.eos_token_id is not None:
            return int(tok.eos_token_id)
        raise ConfigError(f"the {self.name} tokenizer has neither a pad nor an eos token")

    # ---- batches ---------------------------------------------------------------------------------

    def images_arg(self, images: list[Image.Image]) -> list[Any]:
        """How the processor wants one image per prompt (flat list by default)."""
        return list(images)

    def _encode(self, processor: Any, images: list[Image.Image], texts: list[str]) -> dict[str, torch.Tensor]:
        processor.tokenizer.padding_side = "left"
        enc = processor(images=self.images_arg(images), text=texts, return_tensors="pt", padding=True)
        return self.follow_tokens(processor, {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)})

    def follow_tokens(self, processor: Any, enc: dict[str, Any]) -> dict[str, Any]:
        """Processor output with as many placeholders per image as the bound model's tower emits (unchanged
        where no `tokens` stage reduced them, or where they were cut already)."""
        if self.image_tokens is None:
            return enc
        from compress.tokens.prompt import shrink_placeholders

        image_id = _token_id(processor.tokenizer, self.image_fill_token or self.image_token)
        return shrink_placeholders(enc, image_id, *self.image_tokens, self.pad_token_id(processor))

    def build_inputs(
        self,
        processor: Any,
        images: list[Image.Image],
        questions: list[str],
        answers: list[str] | None = None,
        max_answer_tokens: int | None = None,
    ) -> Batch:
        """Left-padded inputs for one image + question per row, optionally teacher-forcing answers.

        The answer span is found by encoding the prompt alone and comparing unpadded lengths, so
        image-token expansion stays entirely the processor's business. Answers are forced as the model
        would emit them: joined without a space after a prompt that ends in white space (a chat
        template's "assistant\n"), and an answer longer than `max_answer_tokens` is cut there with no
        end token after it (generation could never reach one).
        """
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        if answers is not None and len(answers) != len(questions):
            raise ValueError(f"{len(answers)} answers but {len(questions)} questions")
        prompts = [self.format_prompt(processor, q) for q in questions]
        prompt_inputs = self._encode(processor, images, prompts)
        prompt_lengths = [int(n) for n in prompt_inputs["attention_mask"].sum(-1)]
        if answers is None:
            return Batch(inputs=prompt_inputs, answer_positions=None, prompt_lengths=prompt_lengths)

        forced = [self.forced_answer(processor, p, a, max_answer_tokens) for p, a in zip(prompts, answers, strict=True)]
        inputs, tails = self._encode_answers(processor, images, prompts, forced)
        full_lengths = inputs["attention_mask"].sum(-1)
        seq = inputs["input_ids"].shape[1]
        positions = torch.zeros(inputs["input_ids"].shape, dtype=torch.bool)
        for row, (full, prompt) in enumerate(zip(full_lengths.tolist(), prompt_lengths, strict=True)):
            n_answer = full - prompt - tails[row]  # answer tokens + end token
            if n_answer < 1 or n_answer >= full:
                raise ValueError(f"row {row}: answer {answers[row]!r} encodes to {n_answer} tokens")
            # Left padding: the sequence ends at seq-1; logit t predicts token t+1.
            end = seq - 1 - tails[row]
            positions[row, end - n_answer : end] = True
        return Batch(inputs=inputs, answer_positions=positions, prompt_lengths=prompt_lengths)

    def _encode_answers(self, processor: Any, images: list[Image.Image], prompts: list[str],
                        forced: list[str]) -> tuple[dict[str, torch.Tensor], list[int]]:
        """Prompts with their forced answers appended, and per row how many trailing tokens are not answer
        (0 here; families whose processor appends its own end token to a cut answer say 1)."""
        texts = [p + a for p, a in zip(prompts, forced, strict=True)]
        return self._encode(processor, images, texts), [0] * len(prompts)

    def forced_answer(self, processor: Any, prompt: str, answer: str, max_tokens: int | None = None) -> str:
        """The text appended to `prompt` to teacher-force `answer`: join + answer (+ end token)."""
        join = "" if prompt[-1:].isspace() else self.answer_join
        text = join + answer.strip()
        if max_tokens is not None:
            ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > max_tokens:  # cut where generation stops; the model never says the end token here
                return processor.tokenizer.decode(ids[:max_tokens])
        return text + self.end_token(processor)

    # ---- loading ---------------------------------------------------------------------------------

    def load_processor(self, source: str, trust_remote_code: bool = False) -> Any:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)

    def load(self, source: str, dtype: str = "float32", trust_remote_code: bool = False) -> tuple[Any, Any]:
        """Weights (safetensors only) and processor from a local folder or cached hub id; eval mode."""
        from safetensors import SafetensorError
        from transformers import AutoModelForImageTextToText
        from transformers.utils import logging as hf_logging

        if dtype not in DTYPES:
            raise ConfigError(f"unsupported dtype '{dtype}'; supported: {', '.join(DTYPES)}")
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its load report would repeat, as a table, what _check_loading says
        kwargs = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code, "use_safetensors": True,
                  "output_loading_info": True}
        try:
            try:
                model, info = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
            except RuntimeError as exc:
                if "ignore_mismatched_sizes" not in str(exc):
                    raise
                # Load again only to name the mis-shaped tensors (refused just below either way).
                model, info = AutoModelForImageTextToText.from_pretrained(source, ignore_mismatched_sizes=True,
                                                                          **kwargs)
        except (OSError, RuntimeError, ValueError, SafetensorError) as exc:
            raise ConfigError(f"cannot load the model weights in {source}: {first_line(exc)}") from exc
        finally:
            hf_logging.set_verbosity(verbosity)
        _check_loading(source, info)
        processor = self.load_processor(source, trust_remote_code=trust_remote_code)
        processor.tokenizer.padding_side = "left"
        model.eval()
        self.bind(model)
        return model, processor


def _check_loading(source: str, info: dict[str, Any]) -> None:
    """Weights that do not cover the config would be randomly initialised: refuse, naming the first few."""
    problems = []
    for key, what in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"),
                      ("mismatched_keys", "mis-shaped")):
        names = sorted(str(n[0] if isinstance(n, tuple) else n) for n in info.get(key) or [])
        if names:
            problems.append(f"{len(names)} {what} ({', '.join(names[:3])}{', …' if len(names) > 3 else ''})")
    if problems:
        raise ConfigError(f"the weights in {source} do not match its config.json: {'; '.join(problems)}")


def _token_id(tokenizer: Any, token: str) -> int | None:
    """The id of a single token, or None when the vocab lacks it (instead of the unk id)."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return int(tid)


def text_config(model: torch.nn.Module) -> Any:
    """The language model's config (`get_text_config()` of a VLM config), or None for a config-less module."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config
