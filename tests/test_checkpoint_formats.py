"""Guard: every quantization scheme's checkpoint loads in plain transformers, in a process that never
imports this project, with every weight in place and the stage model's exact logits.

The coverage table below must name every scheme and activation mode the quantize stage accepts; a new
one added to the stage's config without a row here fails `test_every_registered_scheme_is_covered`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import torch
from helpers import LOADER
from PIL import Image

from compress.arch import get_adapter
from compress.checkpoint import load_checkpoint, save_checkpoint
from compress.stages.base import StageContext
from compress.stages.catalog import get_stage
from compress.stages.quantize import ActivationsConfig, Int4Config, QuantizeConfig, WeightsConfig
from compress.zoo.tiny import save_tiny

ALL = {"components": ["vision", "projector", "language"]}
STATIC = {"calibration": "percentile", "percentile": 99.9}

# (family, stage config) per scheme form; keys name what they cover.
CASES: dict[str, tuple[str, dict]] = {
    "int8/static/per_channel": ("llava", {"activations": STATIC, "smoothquant": {"alpha": 0.5}}),
    "int8/static/per_tensor": ("llava", {"activations": {"calibration": "minmax"},
                                         "weights": {"granularity": "per_tensor"}}),
    "int8/dynamic_per_token/per_channel": ("llava", {"activations": {"dynamic": "per_token"},
                                                     "weights": {"rounding": "gptq", "reduce_range": True},
                                                     "smoothquant": {"alpha": "auto"}, "keep_float": {"budget": 0.1}}),
    "int8/dynamic_per_tensor/per_channel": ("llava", {"activations": {"dynamic": "per_tensor"}}),
    "int8/none/per_channel": ("llava", {"activations": "none"}),
    "int8/dynamic_per_token/qwen2_vl": ("qwen2_vl", {"activations": {"dynamic": "per_token"}}),
    "int8/static/idefics3": ("idefics3", {"activations": STATIC, "smoothquant": {"alpha": 0.5}}),
    # After 2:4 pruning: the checkpoint also carries compressed-tensors' sparsity_config (dense format).
    "int8/static/2:4": ("llava", {"activations": STATIC, "_prune": "2:4"}),
    # INT4 weight-only, pack-quantized group strategy: symmetric, with zero points, and each rounding.
    "int4/symmetric/rtn": ("llava", {"int4": {"group_size": 32}}),
    "int4/zero_point/gptq": ("llava", {"int4": {"group_size": 32, "symmetric": False, "rounding": "gptq"}}),
    "int4/symmetric/awq": ("qwen2_vl", {"int4": {"group_size": 32, "rounding": "awq"}}),
    # Per-layer INT4 (group 32) / INT8 (per channel) under a 6.5-bit budget: two config groups in one folder.
    "mixed/int4+int8": ("llava", {"int4": {"group_size": 32}, "bits": {"effective_bits": 6.5}}),
    # bitsandbytes' own CPU kernel needs out_features % 32 == 0 (the tiny k/v projections have 16).
    "nf4": ("llava", {"nf4": {"blocksize": 32},
                      "targets": {"components": ["language"], "exclude": ["*k_proj", "*v_proj"]}}),
}

def test_every_registered_scheme_is_covered():
    schemes = set(typing.get_args(QuantizeConfig.model_fields["scheme"].annotation))
    act = ActivationsConfig.model_fields
    dynamic = typing.get_args(act["dynamic"].annotation)[0]  # Literal[...] | None
    modes = {"static", "none"} | {f"dynamic_{d}" for d in typing.get_args(dynamic)}
    granularities = set(typing.get_args(WeightsConfig.model_fields["granularity"].annotation))
    covered = {key.split("/")[0] for key in CASES}
    assert schemes <= covered, f"schemes without a plain-transformers load test: {schemes - covered}"
    int8 = [key.split("/") for key in CASES if key.startswith("int8/")]
    assert modes <= {k[1] for k in int8}, f"int8 activation modes not covered: {modes - {k[1] for k in int8}}"
    assert granularities <= {k[2] for k in int8}, "int8 weight granularities not covered"
    int4 = [key.split("/") for key in CASES if key.startswith("int4/")]
    assert {k[1] for k in int4} == {"symmetric", "zero_point"}, "int4 with and without zero points"
    roundings = set(typing.get_args(Int4Config.model_fields["rounding"].annotation))
    assert roundings <= {k[2] for k in int4}, f"int4 roundings not covered: {roundings - {k[2] for k in int4}}"


def _images(n: int, seed: int) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(n)]


def _stage_checkpoint(tmp_path: Path, key: str, family: str, extra: dict) -> Path:
    src = tmp_path / f"src-{family}"
    if not src.exists():
        save_tiny(family, src)
    adapter = get_adapter(json.loads((src / "config.json").read_text())["model_type"])
    model, processor = load_checkpoint(src, adapter)
    questions = ["what is it?", "which colour is this one?"]

    batches = [adapter.build_inputs(processor, _images(2, seed), questions).inputs for seed in (1, 2)]

    scheme = key.split("/")[0]
    extra = dict(extra)
    pattern = extra.pop("_prune", None)
    if pattern:
        from compress.arch import select_modules
        from compress.config import Targets
        from compress.prune.sparsity import prune_linears

        prune_linears(model, select_modules(model, adapter, Targets(**ALL)), "magnitude", 0.5, pattern, None)
    raw = {"type": "quantize", "scheme": scheme, "targets": ALL, "gate": {"min_retention": 0.5}, **extra}
    spec = get_stage("quantize")
    ctx = StageContext(adapter=adapter, processor=processor, workdir=tmp_path / "work", seed=0,
                       calibration_batches=batches)
    q = spec.apply(model, spec.config.model_validate(raw), ctx).model
    out = tmp_path / key.replace("/", "-").replace(":", "of")
    save_checkpoint(q, processor, out)
    inputs = adapter.build_inputs(processor, _images(2, 7), ["what is this?", "where is the square?"]).inputs
    with torch.no_grad():
        logits = q(**inputs).logits
    torch.save({"inputs": dict(inputs), "logits": logits}, out / "expected.pt")
    return out


def test_plain_transformers_loads_every_scheme_exactly(tmp_path):
    folders = {key: _stage_checkpoint(tmp_path, key, family, extra) for key, (family, extra) in CASES.items()}
    proc = subprocess.run([sys.executable, "-c", LOADER, *map(str, folders.values())], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results.pop("imported_compress") is False
    mixed = json.loads((folders["mixed/int4+int8"] / "config.json").read_text())["quantization_config"]
    assert sorted(g["weights"]["num_bits"] for g in mixed["config_groups"].values()) == [4, 8]
    sparse = json.loads((folders["int8/static/2:4"] / "config.json").read_text())["quantization_config"]
    assert sparse["sparsity_config"]["sparsity_structure"] == "2:4" and sparse["sparsity_config"]["format"] == "dense"
    for key, folder in folders.items():
        r = results[str(folder)]
        assert r["missing_keys"] == r["unexpected_keys"] == r["mismatched_keys"] == [], (key, r)
        if r.get("bnb_bf16_kernel"):  # this host's bitsandbytes picks its bf16 kernel: bf16-close, float-exact
            assert r["max_abs_diff"] <= 1e-2 * r["scale"], (key, r)
            assert r["float_kernel_max_abs_diff"] <= 1e-5, (key, r)
        else:
            assert r["max_abs_diff"] <= 1e-5, (key, r["max_abs_diff"])


PLAIN_GENERATE = """
import json, sys
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
folder = sys.argv[1]
saved = torch.load(folder + "/expected.pt", weights_only=False)
model = AutoModelForImageTextToText.from_pretrained(folder).eval()
out = {}
with torch.no_grad():
    try:
        model.generate(**saved["inputs"], max_new_tokens=4, do_sample=False)
        out["cold"] = "ok"
    except RuntimeError as e:
        out["cold"] = str(e)
    model(**saved["inputs"])  # the documented warm-up: one forward decompresses every layer
    out["warm"] = model.generate(**saved["inputs"], max_new_tokens=4, do_sample=False).tolist()
out["imported_compress"] = any(m == "compress" or m.startswith("compress.") for m in sys.modules)
print(json.dumps(out))
"""


def test_plain_generate_on_a_quantized_vision_tower_needs_one_forward_first(tmp_path):
    """The upstream interplay docs/deploy.md documents (and the deploy lint names): compressed-tensors decompresses
    in a pre-forward hook of the top-level model, and transformers' `generate` computes image features before
    that forward, so a plain load-then-generate of an INT8 checkpoint whose vision tower is quantized fails;
    one forward first makes it work. When this test fails on `cold`, upstream fixed it: drop the warm-up note
    (docs/deploy.md, README, tests/hf_answers.py) and the lint rule `generate_warmup`."""
    folder = _stage_checkpoint(tmp_path, "int8/static/flip", "llava", {"activations": {"calibration": "minmax"}})
    from compress.lint import lint_folder

    assert [f["rule"] for f in lint_folder(folder)] == ["generate_warmup"]
    proc = subprocess.run([sys.executable, "-c", PLAIN_GENERATE, str(folder)], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "must have the same dtype" in got["cold"], f"upstream changed: {got['cold']}"
    assert len(got["warm"]) == 2 and not got["imported_compress"]
