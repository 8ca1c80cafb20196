"""Every registered family × every registered stage, each on the family's tiny model.

A cell either runs through the real pipeline (apply, gate, save) and the saved artifact is loaded back
and scored again by `vlm-compress eval`, or the family refuses the stage before anything is written,
naming both. A family or stage registered without a row here fails `test_matrix_covers_the_registries`.
The tiny models are random, so the gate (logit KL <= 1000) checks nothing about accuracy; the
exports' parity checks run as part of their stage.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from compress.arch import ADAPTERS, get_adapter
from compress.cli import main
from compress.errors import RecipeError
from compress.pipeline import run
from compress.stages.catalog import stages
from compress.zoo.tiny import save_tiny

ROOT = Path(__file__).parent.parent
GATE = {"max_kl": 1000.0, "on_fail": "warn"}  # random models: the gate passes; stage checks (parity) decide
LANGUAGE = {"components": ["language"]}
# One representative configuration per stage type (more variants live in each stage's own tests).
STAGES: dict[str, list[dict]] = {
    "prune": [{"type": "prune", "method": "wanda", "pattern": "2:4", "targets": LANGUAGE}],
    "shrink": [{"type": "shrink", "mlp": 0.5, "heads": 0.5}],
    "distill": [{"type": "distill", "steps": 2, "batch_size": 4, "max_answer_tokens": 8}],
    "quantize": [{"type": "quantize", "scheme": "int8", "targets": LANGUAGE,
                  "activations": {"calibration": "minmax"}}],
    # INT4 is the one quantize scheme with its own ONNX op (MatMulNBits): quantized, then exported. The
    # float export of every family is tested on its own in test_export / test_family_exports / test_qwen_export.
    # AWQ folds into every family's norms (Gemma's scale by 1 + weight); the lm_head too, untied where the
    # family ties it to the input embeddings.
    "export": [{"type": "quantize", "scheme": "int4", "targets": {"components": ["language", "lm_head"]},
                "int4": {"group_size": 32, "rounding": "awq"}},
               {"type": "export", "format": "onnx"}],
    "engine": [{"type": "export", "format": "onnx", "target": "tensorrt"},
               {"type": "engine", "compute_capabilities": ["sm86"],
                "profiles": {"max_batch": 2, "max_prompt_tokens": 128, "max_new_tokens": 8}}],
}
TIED = {"gemma3", "paligemma"}  # tiny models whose lm_head is the input embedding table
# What each family refuses (at load time, with the reason); everything else must run.
REFUSED = {
    "qwen2_vl": {"shrink"},
    "qwen2_5_vl": {"shrink"},
    "mllama": {"shrink"},
}
FAMILIES = [mt for cls in ADAPTERS for mt in cls.model_types]


def test_matrix_covers_the_registries():
    assert set(stages()) <= set(STAGES), "a registered stage type has no row in the matrix"
    assert set(STAGES) == set(stages()), "a matrix row names no registered stage"
    assert set(REFUSED) <= set(FAMILIES)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {f: save_tiny(f, root / f) for f in FAMILIES}


def _recipe(tmp: Path, model: Path, stages: list[dict]) -> Path:
    doc = {"name": "matrix", "seed": 0, "model": {"source": str(model)},
           "calibration": {"source": str(ROOT / "calibration/shapes-vqa/calib"), "num_samples": 4, "batch_size": 4},
           "evaluation": {"source": str(ROOT / "calibration/shapes-vqa/eval"), "num_samples": 4, "batch_size": 4,
                          "max_new_tokens": 4},
           "stages": [{**s, "name": f"s{i}", "gate": GATE} for i, s in enumerate(stages)]}
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.mark.parametrize("stage", sorted(STAGES))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_takes_every_stage_or_refuses_it_up_front(family, stage, models, tmp_path):
    recipe, out = _recipe(tmp_path, models[family], STAGES[stage]), tmp_path / "run"
    if stage in REFUSED.get(family, ()):
        with pytest.raises(RecipeError) as e:
            run(recipe, out=out)
        first = next(s["type"] for s in STAGES[stage] if s["type"] in REFUSED[family])  # engine: its export
        assert f"'{first}' stage cannot run on {get_adapter(family).name} ({family})" in str(e.value)
        assert not out.exists()  # refused before anything was written
        return
    result = run(recipe, out=out)
    assert result.status == "completed", [(s["name"], s["status"], s.get("message")) for s in result.manifest["stages"]]
    last = result.manifest["stages"][-1]
    assert last["status"] == "completed", last  # its own checks (export parity) passed too
    folder = out / (last.get("checkpoint") or last["artifacts"])
    if stage == "engine":
        assert (folder / "llm.engine").stat().st_size > 0 and last["details"]["executed"] is False
        # opset-23 source graphs (the export's parity passed above): every attention one standard Attention
        # node, none left as Softmax, and TensorRT takes each one; at decode steps into its gemv MHA kernel
        # (prefill decomposes: these tiny models' head size 8 is below its fused prefill kernels)
        for graph, engine in last["details"]["engines"].items():
            ops, fusion = engine["fusion"]["source_ops"], engine["fusion"]
            assert "Softmax" not in ops and ops["Attention"]["nodes"] == ops["Attention"]["absorbed"] > 0, graph
            assert fusion["attention_decomposable"] == ops["Attention"]["nodes"], graph
            if graph == "decoder":
                assert fusion["attention_ops_in_mha"] == ops["Attention"]["nodes"], graph
        return
    if stage == "export":
        quantized = result.manifest["stages"][0]["details"]
        assert ("untied" in quantized) == (family in TIED), quantized.get("untied")
        assert quantized["awq"], "AWQ folded nothing"
    # Loaded back from disk and scored again, as a user would: the same answers as the stage's own gate.
    from compress.evaluate import evaluate

    again = evaluate(folder, recipe=str(recipe), reference=str(out))["metrics"]
    assert again["token_agreement"] == pytest.approx(last["metrics"]["token_agreement"], abs=1e-6)
    assert again["logit_kl"] == pytest.approx(last["metrics"]["logit_kl"], rel=1e-3, abs=1e-5)


def test_a_refused_stage_exits_2_with_one_line(models, tmp_path, capsys):
    recipe = _recipe(tmp_path, models["mllama"], STAGES["shrink"])
    assert main(["run", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = "\n".join(line for line in capsys.readouterr().err.splitlines() if not line.startswith("[vlm-compress]"))
    assert len(err.splitlines()) == 1 and "cannot run on mllama (mllama) models: its cross-attention" in err


def test_zoo_tiny_writes_a_loadable_folder(tmp_path, capsys):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = tmp_path / "gemma3"
    assert main(["zoo", "tiny", "gemma3", "--out", str(out)]) == 0
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert model.config.model_type == "gemma3" and AutoProcessor.from_pretrained(out) is not None
    assert main(["zoo", "tiny", "gemma3", "--out", str(out)]) == 2  # never overwrites
    assert main(["zoo", "tiny", "bert", "--out", str(tmp_path / "b")]) == 2
    assert not (tmp_path / "b").exists()
    assert "not an empty folder" in capsys.readouterr().err


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_runner_decodes_exactly_like_hf_generate(family):
    """The runner contract's explicit prefill + decode loop (what every backend follows) is greedy
    `generate`: Qwen2-VL's M-RoPE decode positions, PaliGemma's prefix-LM, Mllama's cached cross-attention."""
    import torch
    from PIL import Image

    from compress.runtime.torch_runner import TorchRunner
    from compress.zoo.tiny import tiny_model

    model, processor = tiny_model(family)
    adapter = get_adapter(family).bind(model)
    g = torch.Generator().manual_seed(1)
    images = [Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(2)]
    inputs = adapter.build_inputs(processor, images, ["what color?", "how many shapes are there?"]).inputs
    ours = TorchRunner.for_adapter(model, adapter, processor).generate(inputs, 6, ignore_eos=True)
    hf = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert ours == hf[:, inputs["input_ids"].shape[1]:].tolist()
