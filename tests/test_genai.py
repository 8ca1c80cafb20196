"""Export folders run in onnxruntime-genai as they are: its own KV cache and search over our graphs give the
tokens our runner gives, at fp32, INT8 (W8A8 everywhere) and INT4, with and without an image, in a process
that imports neither torch nor this toolkit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT

from compress.arch import get_adapter
from compress.export.files import read_meta
from compress.runtime.ort_runner import OrtRunner
from compress.zoo import shapes

og = pytest.importorskip("onnxruntime_genai")

LENIENT = {"min_retention": 0.5, "on_fail": "warn"}
EXPORT = {"type": "export", "name": "onnx", "format": "onnx", "gate": LENIENT}
RECIPES = {
    "fp32": [EXPORT],
    "int8": [{"type": "quantize", "name": "int8", "scheme": "int8",
              "targets": {"components": ["vision", "projector", "language", "lm_head"]},
              "weights": {"granularity": "per_channel", "reduce_range": True},
              "activations": {"calibration": "percentile", "percentile": 99.99}, "gate": LENIENT}, EXPORT],
    "int4": [{"type": "quantize", "name": "int4", "scheme": "int4", "targets": {"components": ["language"]},
              "int4": {"group_size": 32}, "gate": LENIENT}, EXPORT],
}


@pytest.fixture(scope="module", params=list(RECIPES))
def exported(request, tmp_path_factory) -> tuple[str, Path]:
    from compress.pipeline import run

    tmp = tmp_path_factory.mktemp(request.param)
    doc = {"name": request.param, "seed": 0, "model": {"source": "zoo:shapes-vqa"},
           "calibration": {"source": str(ROOT / "calibration/shapes-vqa/calib"), "num_samples": 32},
           "evaluation": {"source": str(ROOT / "calibration/shapes-vqa/eval"), "num_samples": 8, "batch_size": 8,
                          "max_new_tokens": 24},
           "stages": RECIPES[request.param]}
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    result = run(tmp / "recipe.yaml", out=tmp / "run")
    assert [s["status"] for s in result.manifest["stages"]][-1] in ("completed", "warned")
    return request.param, tmp / "run" / result.manifest["stages"][-1]["artifacts"]


def _inputs(folder: Path, count: int, text_only: bool = False) -> dict:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    adapter = get_adapter("llava")
    batch = list(shapes.samples(70_000, count))
    if text_only:  # the prompt without its image: the embed graph gets 0 feature rows
        prompts = [adapter.format_prompt(processor, s.question).replace("<image>", "") for s in batch]
        processor.tokenizer.padding_side = "left"
        return dict(processor.tokenizer(prompts, return_tensors="pt", padding=True))
    return adapter.build_inputs(processor, [s.image for s in batch], [s.question for s in batch]).inputs


@pytest.mark.parametrize("text_only", [False, True], ids=["image", "text"])
def test_genai_generates_what_our_runner_generates(exported, text_only):
    from compress.runtime.genai_runner import GenaiRunner

    _, folder = exported
    meta = read_meta(folder)
    assert meta["genai"] == {"config": "genai_config.json", "model_type": "gemma3"}
    config = json.loads((folder / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] == (meta["past_buffer"] == "shared")
    inputs = _inputs(folder, 6, text_only)
    ours = OrtRunner.from_dir(folder).generate(inputs, 24)
    theirs = GenaiRunner(folder).generate(inputs, 24)
    assert theirs == ours
    assert sum(map(len, ours)) > 6 * 4  # real answers, not empty ones


GENAI_ONLY = """
import json, sys
sys.modules["torch"] = None  # as on a deployment host without torch: importing it fails
import numpy as np
import onnxruntime_genai as og
from PIL import Image
from transformers import AutoProcessor
folder, prompt, image = sys.argv[1:4]
processor = AutoProcessor.from_pretrained(folder)
enc = processor(images=[Image.open(image)], text=[prompt], return_tensors="np")
model = og.Model(folder)
params = og.GeneratorParams(model)
params.set_search_options(max_length=enc["input_ids"].shape[1] + 24)
generator = og.Generator(model, params)
named = og.NamedTensors()
named["input_ids"] = enc["input_ids"].astype(np.int32)
named["pixel_values"] = enc["pixel_values"].astype(np.float32)
image_id = json.load(open(folder + "/genai_config.json"))["model"]["image_token_id"]
named["num_image_tokens"] = np.array([int((enc["input_ids"] == image_id).sum())], dtype=np.int64)
generator.set_inputs(named)
tokens = []
while not generator.is_done():
    generator.generate_next_token()
    tokens.append(int(generator.get_next_tokens()[0]))
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "compress") and sys.modules[m] is not None)
print(json.dumps({"tokens": tokens, "loaded": loaded}))
"""


def test_a_folder_runs_in_genai_without_torch_or_this_toolkit(exported, tmp_path):
    """The user's side: the folder's own processor (transformers, no torch) and onnxruntime-genai only."""
    name, folder = exported
    if name != "int8":  # one precision is enough for what the process loads
        pytest.skip("checked on the INT8 folder")
    from transformers import AutoProcessor

    sample = next(shapes.samples(70_100, 1))
    image = tmp_path / "scene.png"
    sample.image.save(image)
    processor = AutoProcessor.from_pretrained(folder)
    prompt = get_adapter("llava").format_prompt(processor, sample.question)
    want = OrtRunner.from_dir(folder).generate(_inputs_for(processor, prompt, sample.image), 24)[0]
    out = subprocess.run([sys.executable, "-c", GENAI_ONLY, str(folder), prompt, str(image)],
                         capture_output=True, text=True, check=True, cwd=tmp_path)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["loaded"] == []
    eos = set(read_meta(folder)["eos_token_ids"])
    assert [t for t in got["tokens"] if t not in eos] == want and got["tokens"][-1] in eos


def _inputs_for(processor, prompt: str, image) -> dict:
    return dict(processor(images=[image], text=[prompt], return_tensors="np"))


def test_verify_runs_the_folder_through_genai(exported, capsys):
    """`vlm-compress verify` compares onnxruntime-genai's tokens with onnxruntime's on probe prompts and says
    so; a folder whose graphs genai rejects is a finding."""
    from compress.cli import main
    from compress.verify import verify

    name, folder = exported
    if name != "fp32":
        pytest.skip("checked on the fp32 folder")
    run_dir = folder.parent.parent
    assert main(["verify", str(run_dir)]) == 0
    said = capsys.readouterr().out
    assert "runs in onnxruntime-genai: the same tokens as onnxruntime on 3 of 3 probe prompts" in said
    config = folder / "genai_config.json"
    saved = config.read_text()
    try:
        config.write_text(saved.replace('"embed.onnx"', '"missing.onnx"'))
        result = verify(run_dir)
        assert ("genai", "stages/onnx") in [(k, p) for k, p, _ in result.problems]
    finally:
        config.write_text(saved)
