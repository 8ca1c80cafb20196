"""Score a model folder the way a user of plain transformers would: no import of this project.

    python tests/hf_answers.py MODEL_DIR EVAL_DIR MAX_NEW_TOKENS [PROMPT_TEMPLATE]

Loads the folder with `AutoModelForImageTextToText` / `AutoProcessor`, formats each question with
the processor's chat template (or PROMPT_TEMPLATE, a `{question}` template, as a recipe's prompt
does), answers greedily with `generate` (KV cache), and prints one JSON line: loading info, exact
match (case, white space and trailing punctuation ignored) and the answers. Tests run it through
`helpers.score_in_fresh_process`; a script, never imported, so it stays a file of its own.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor


def normalize(text: str) -> str:
    return re.sub(r"[\s.!?,;:]+$", "", " ".join(text.lower().split()))


def main() -> None:
    model_dir, eval_dir, max_new = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    template = sys.argv[4] if len(sys.argv) > 4 else None
    model, info = AutoModelForImageTextToText.from_pretrained(model_dir, output_loading_info=True)
    model.eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    processor.tokenizer.padding_side = "left"
    records = [json.loads(line) for line in (eval_dir / "metadata.jsonl").read_text().splitlines() if line.strip()]
    answers: list[str] = []
    for start in range(0, len(records), 50):
        batch = records[start:start + 50]
        prompts = [template.format(question=r["prompt"]) if template else processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["prompt"]}]}],
            add_generation_prompt=True, tokenize=False) for r in batch]
        images = [Image.open(eval_dir / r["file_name"]).convert("RGB") for r in batch]
        enc = processor(images=images, text=prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            if start == 0:  # compressed-tensors decompresses in a pre-hook of the model's forward, which
                model(**enc)  # generate's image-encoder pre-pass skips (transformers 5.24): one forward first
            out = model.generate(**enc, max_new_tokens=max_new, do_sample=False)
        new = out[:, enc["input_ids"].shape[1]:]
        answers += [processor.tokenizer.decode(t, skip_special_tokens=True).strip() for t in new]
    hits = [normalize(a) == normalize(r["answer"]) for a, r in zip(answers, records, strict=True)]
    print(json.dumps({
        "loading": {k: [str(x) for x in v][:5] for k, v in info.items() if k != "error_msgs"},
        "exact_match": sum(hits) / len(hits),
        "answers": answers,
        "imported_compress": any(m == "compress" or m.startswith("compress.") for m in sys.modules),
    }))


if __name__ == "__main__":
    main()
