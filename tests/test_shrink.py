"""`type: shrink`: structured pruning that removes weights; exact on dead parts, reloadable, recoverable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import LOADER, tiny_with_batch

from compress.arch import get_adapter
from compress.checkpoint import save_checkpoint
from compress.cli import main
from compress.errors import ConfigError
from compress.prune.structured import kept_width
from compress.stages.base import StageContext
from compress.stages.catalog import get_stage
from compress.stages.shrink import ShrinkConfig
from compress.zoo.tiny import FAMILIES

ROOT = Path(__file__).parent.parent
M_ROPE = ("qwen2_vl", "qwen2_5_vl")  # head_dim = hidden // heads: heads cannot be pruned
# Mllama's cross-attention layers are refused by its adapter (before any weights load; see helpers.REFUSED).
SHRINKABLE = [f for f in FAMILIES if "shrink" not in get_adapter(f).refused_stages]
GATE = {"min_retention": 0.01, "on_fail": "warn"}


def _shrink(model, adapter, batch, tmp: Path, **fields):
    cfg = ShrinkConfig(type="shrink", gate=GATE, **fields)
    ctx = StageContext(adapter=adapter, processor=None, workdir=tmp, seed=0, calibration_batches=[batch])
    return get_stage("shrink").apply(model, cfg, ctx)


def _kill(model, adapter, family: str) -> None:
    """Make the parts a shrink should find first contribute exactly nothing."""
    layers = adapter.component(model, "language").layers
    with torch.no_grad():
        for layer in layers:
            mlp = layer.mlp
            mlp.up_proj.weight[1::2] = 0.0  # odd channels: zero activation into down_proj
            if family not in M_ROPE:
                a = layer.self_attn
                hd = a.head_dim
                a.v_proj.weight[hd:2 * hd] = 0.0  # KV group 1: its query heads output zero
        last = layers[-1]  # the last layer becomes the identity: block importance 0
        last.self_attn.o_proj.weight.zero_()
        last.mlp.down_proj.weight.zero_()


@pytest.mark.parametrize("family", SHRINKABLE)
def test_dead_parts_are_found_and_removed_exactly(family, tmp_path):
    model, adapter, batch, _ = tiny_with_batch(family)
    _kill(model, adapter, family)
    with torch.no_grad():
        ref = model(**batch).logits
    heads = {} if family in M_ROPE else {"heads": 0.5, "heads_from": "groups"}
    r = _shrink(model, adapter, batch, tmp_path, mlp=0.5, layers=0.5, round_to=1, **heads)
    d = r.details
    assert d["layers"] == {"before": 2, "after": 1, "removed": [1]}
    assert d["mlp_width"] == {"before": 64, "after": 32}
    if heads:
        assert d["heads"]["after"] == 2 and d["kv_heads"] == {"before": 2, "after": 1}
    with torch.no_grad():
        out = r.model(**batch).logits
    assert torch.allclose(out, ref, atol=1e-5), float((out - ref).abs().max())
    text = r.model.config.get_text_config()
    assert text.num_hidden_layers == 1 and text.intermediate_size == 32


@pytest.mark.parametrize("family", [f for f in SHRINKABLE if f not in M_ROPE])
def test_magnitude_removes_query_heads_within_each_group(family, tmp_path):
    model, adapter, batch, _ = tiny_with_batch(family)
    with torch.no_grad():
        for layer in adapter.component(model, "language").layers:
            a = layer.self_attn
            hd = a.head_dim
            for h in (1, 2):  # one query head of each KV group (2 per group)
                a.o_proj.weight[:, h * hd:(h + 1) * hd] = 0.0
        ref = model(**batch).logits
    r = _shrink(model, adapter, None, tmp_path, importance="magnitude", heads=0.5)
    assert r.details["heads"]["after"] == 2 and r.details["kv_heads"]["after"] == 2  # the KV cache is unchanged
    with torch.no_grad():
        out = r.model(**batch).logits
    assert torch.allclose(out, ref, atol=1e-5), float((out - ref).abs().max())


def test_m_rope_heads_are_refused_with_the_reason(tmp_path):
    model, adapter, batch, _ = tiny_with_batch("qwen2_vl")
    with pytest.raises(ConfigError, match="derives head_dim from hidden_size // num_attention_heads"):
        _shrink(model, adapter, batch, tmp_path, heads=0.5)


def test_every_family_reloads_in_plain_transformers(tmp_path):
    folders = {}
    for family in SHRINKABLE:
        model, adapter, batch, _ = tiny_with_batch(family)
        heads = {} if family in M_ROPE else {"heads": 0.5}
        r = _shrink(model, adapter, batch, tmp_path / f"{family}.work", mlp=0.5, layers=0.5, **heads)
        folder = tmp_path / family
        save_checkpoint(r.model, _processor(family), folder)
        with torch.no_grad():
            torch.save({"inputs": batch, "logits": r.model(**batch).logits}, folder / "expected.pt")
        dense = tmp_path / f"{family}.dense"
        save_checkpoint(model, _processor(family), dense)
        folders[family] = (folder, dense, r.details)
    proc = subprocess.run([sys.executable, "-c", LOADER, *(str(f) for f, _, _ in folders.values())],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results.pop("imported_compress") is False
    for family, (folder, dense, details) in folders.items():
        r = results[str(folder)]
        assert r["missing_keys"] == r["unexpected_keys"] == r["mismatched_keys"] == [], (family, r)
        assert r["max_abs_diff"] <= 1e-5, (family, r)
        size = (folder / "model.safetensors").stat().st_size
        assert size < (dense / "model.safetensors").stat().st_size, family
        # PaliGemma's 1,412-token vocabulary (loc/seg tokens) is most of a tiny language model
        assert details["language_parameters"]["removed_fraction"] > (0.2 if family == "paligemma" else 0.4), family
        text = json.loads((folder / "config.json").read_text())["text_config"]
        assert text["num_hidden_layers"] == 1 and text["intermediate_size"] == 32 and text["head_dim"] == 8


def _processor(family: str):
    from compress.zoo.tiny import tiny_model

    return tiny_model(family)[1]


def test_kept_width_rounds_and_never_empties():
    assert kept_width(384, 0.625, 8) == 144
    assert kept_width(384, 0.5, 128) == 256  # 192 rounds to the nearest multiple
    assert kept_width(64, 0.99, 8) == 8


BASE = {"type": "shrink", "gate": {"min_retention": 0.5}}


@pytest.mark.parametrize(("stages", "calibration", "needle"), [
    ([{**BASE}], True, "set at least one of mlp, heads, layers"),
    ([{**BASE, "layers": 0.25, "importance": "magnitude"}], True, "use importance: activation"),
    ([{**BASE, "mlp": 1.0}], True, "stages[0].mlp"),
    ([{**BASE, "heads": 0.5, "heads_from": "kv"}], True, "stages[0].heads_from"),
    ([{**BASE, "mlp": 0.5}], False, "needs a 'calibration' section"),
    ([{"type": "quantize", "scheme": "int8", "targets": {"components": ["language"]}, "activations": "none",
       "gate": {"min_retention": 0.5}}, {**BASE, "mlp": 0.5}], True,
     "'shrink' stage cannot run after a 'quantize' stage"),
])
def test_shrink_recipe_errors(recipe_error, stages, calibration, needle):
    assert needle in recipe_error(stages, calibration)


def test_ratios_that_remove_nothing_fail_the_stage(tmp_path):
    model, adapter, batch, _ = tiny_with_batch("llava")
    with pytest.raises(ConfigError, match="removes nothing"):
        _shrink(model, adapter, batch, tmp_path, mlp=0.01)
    with pytest.raises(ConfigError, match="query heads per KV group keeps 2"):
        _shrink(model, adapter, batch, tmp_path, heads=0.2)


def test_shrink_recipe_end_to_end(tmp_path):
    """recipes/shrink.yaml (evaluation cut to 100 records): shrink loses the task, distillation wins it back,
    INT8 ONNX keeps it."""
    doc = yaml.safe_load((ROOT / "recipes/shrink.yaml").read_text())
    for section in (doc["calibration"], doc["evaluation"], doc["stages"][1]["data"]):
        section["source"] = str(ROOT / section["source"].removeprefix("../"))
    doc["evaluation"]["num_samples"] = 100
    recipe = tmp_path / "shrink.yaml"
    recipe.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    shrink, onnx = m["stages"][0], m["stages"][-1]
    d = shrink["details"]
    assert d["language_parameters"]["removed_fraction"] >= 0.25
    src = ROOT / "compress/zoo/shapes_vqa/model.safetensors"
    assert (out / shrink["checkpoint"] / "model.safetensors").stat().st_size <= 0.8 * src.stat().st_size
    base = m["baseline"]["metrics"]["exact_match"]
    retention = {s["name"]: s["metrics"]["exact_match"] / base for s in m["stages"]}
    assert retention["shrink-mlp-heads"] < 0.5  # alone it loses the task
    assert retention["distill"] >= 0.97 and retention["int8-w8a8"] >= 0.97 and retention["onnx-int8"] >= 0.97
    assert onnx["backend"].startswith("onnxruntime") and m["status"] == "completed"
    assert m["data"]["stages.1.data"]["records"] == 2048  # distillation trained on its own set


def test_tied_embeddings_stay_tied(tmp_path):
    """SmolLM2-style tie_word_embeddings: one tensor before and after, so nothing doubles on disk."""
    model, adapter, batch, _ = tiny_with_batch("llava")
    model.config.tie_word_embeddings = model.config.text_config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    r = _shrink(model, adapter, batch, tmp_path, mlp=0.5)
    assert r.model.lm_head.weight is r.model.get_input_embeddings().weight
    lang = r.details["language_parameters"]["before"] - r.details["language_parameters"]["after"]
    assert r.details["parameters"]["before"] - r.details["parameters"]["after"] == lang
