"""What more than one test module needs: constants, builders and assertions (fixtures live in conftest.py).

Test modules import it by name (`from helpers import VALID`): pytest puts this folder on sys.path, as it
does for conftest.py. Heavy imports (torch, transformers, the toolkit) stay inside the functions, so
importing it costs nothing. `hf_answers.py` and `run_graph.py` beside it are scripts run in subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HF_ANSWERS = Path(__file__).with_name("hf_answers.py")

# ---- recipes ------------------------------------------------------------------------------------------

VALID = """\
name: t
model:
  source: zoo:shapes-vqa
evaluation:
  source: ../calibration/shapes-vqa/eval
  metrics: [exact_match, token_agreement, logit_kl]
stages:
  - type: prune
    method: l1_unstructured
    sparsity: 0.3
    targets:
      components: [language]
    gate:
      min_retention: 0.9
output:
  dir: runs/t
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def recipe_error(tmp_path: Path, stages: list[dict], calibration: bool = True) -> str:
    """The RecipeError message for VALID with these stages (and the bundled calibration set, if asked)."""
    import pytest
    import yaml

    from compress.errors import RecipeError
    from compress.recipe import load_recipe

    doc = yaml.safe_load(VALID)
    doc["stages"] = stages
    if calibration:
        doc["calibration"] = {"source": "../calibration/shapes-vqa/calib"}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    return str(e.value)


def lost_fields(written: Any, resolved: Any, where: str = "") -> list[str]:
    """Every value written in a recipe that its resolved form (defaults filled) does not keep as written."""
    if isinstance(written, dict):
        if not isinstance(resolved, dict):
            return [f"{where or '<root>'}: {resolved!r} is not a mapping"]
        return [lost for key, value in written.items()
                for lost in ([f"{where}.{key}: missing"] if key not in resolved
                             else lost_fields(value, resolved[key], f"{where}.{key}"))]
    if isinstance(written, list):
        if not isinstance(resolved, list) or len(resolved) != len(written):
            return [f"{where}: {written!r} became {resolved!r}"]
        return [lost for i, (w, r) in enumerate(zip(written, resolved, strict=True))
                for lost in lost_fields(w, r, f"{where}[{i}]")]
    return [] if written == resolved else [f"{where}: {written!r} became {resolved!r}"]


# ---- tiny models --------------------------------------------------------------------------------------


def tiny_with_batch(family: str):
    """A fresh tiny model of `family`, its bound adapter, one two-image batch and a calibration loop over it."""
    import torch
    from PIL import Image

    from compress.arch import get_adapter
    from compress.zoo.tiny import tiny_model

    model, processor = tiny_model(family)
    adapter = get_adapter(family).bind(model)
    g = torch.Generator().manual_seed(1)
    images = [Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(2)]
    batch = adapter.build_inputs(processor, images, ["what color is it?", "how many?"]).inputs

    def loop(m) -> None:
        with torch.no_grad():
            m(**batch)

    return model, adapter, batch, loop


# ---- plain transformers, in a process that never imports this project ---------------------------------

# Loads each folder given on the command line and compares its logits with the folder's expected.pt.
LOADER = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForImageTextToText
    results = {}
    for folder in sys.argv[1:]:
        model, info = AutoModelForImageTextToText.from_pretrained(folder, output_loading_info=True)
        saved = torch.load(folder + "/expected.pt")
        with torch.no_grad():
            logits = model.eval()(**saved["inputs"]).logits
        r = {**{k: sorted(map(str, v))[:5] for k, v in info.items() if k != "error_msgs"},
             "max_abs_diff": float((logits - saved["logits"]).abs().max()), "scale": float(logits.abs().max())}
        # bitsandbytes computes NF4 in bf16 on AVX512-BF16 CPUs; its float path shows the weights are exact.
        bf16 = [m for m in model.modules() if getattr(m, "support_avx512bf16_for_cpu", False)]
        if bf16:
            model = AutoModelForImageTextToText.from_pretrained(folder)
            for m in model.modules():
                if hasattr(m, "support_avx512bf16_for_cpu"):
                    m.support_avx512bf16_for_cpu = False
            with torch.no_grad():
                logits = model.eval()(**saved["inputs"]).logits
            r["bnb_bf16_kernel"] = True
            r["float_kernel_max_abs_diff"] = float((logits - saved["logits"]).abs().max())
        results[folder] = r
    results["imported_compress"] = any(m == "compress" or m.startswith("compress.") for m in sys.modules)
    print(json.dumps(results))
""")


def score_in_fresh_process(model_dir: Path, eval_dir: Path, max_new_tokens: int, prompt: str | None = None) -> dict:
    """Run hf_answers.py (a new interpreter that never imports `compress`) on a model folder; its JSON result."""
    args = [str(model_dir), str(eval_dir), str(max_new_tokens), *([prompt] if prompt else [])]
    proc = subprocess.run([sys.executable, str(HF_ANSWERS), *args],
                          capture_output=True, text=True, timeout=900, cwd=model_dir,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["imported_compress"] is False
    return result


# ---- `vlm-compress verify` ----------------------------------------------------------------------------


def assert_verify_catches_damage(run: Path, tmp: Path, capsys) -> None:
    """Damage a copy of a finished run folder in each way `vlm-compress verify` must catch (used by the tests
    that already make such a folder, so no extra pipeline run is paid for)."""
    from compress.cli import main

    capsys.readouterr()
    assert main(["verify", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"verify {run.resolve()}: ok") and "checkpoints loaded" in out, out
    weights = next(run.glob("stages/*/model.safetensors"))
    graphs = sorted(run.glob("stages/*/*.onnx"))
    assert graphs

    def damaged(name: str, harm) -> str:
        copy = tmp / f"verify-{name}"
        shutil.copytree(run, copy)
        harm(copy)
        assert main(["verify", str(copy)]) == 1
        printed = capsys.readouterr()
        assert "Traceback" not in printed.err
        assert printed.out.startswith(f"verify {copy.resolve()}: FAILED"), printed.out
        return printed.out

    def flip(path: Path) -> None:
        blob = bytearray(path.read_bytes())
        blob[len(blob) // 2] ^= 0x01  # one bit inside the tensor data: every loader still accepts the file
        path.write_bytes(bytes(blob))

    rel_w, rel_g = weights.relative_to(run), graphs[0].relative_to(run)
    found = damaged("flip", lambda c: flip(c / rel_w))
    problems = [line for line in found.splitlines()[1:-1] if not line.startswith(("  note ", "  lint "))]
    assert f"changed  {rel_w}: sha256 differs" in found and len(problems) == 1, found
    found = damaged("delete", lambda c: (c / rel_g).unlink())
    assert f"missing  {rel_g}" in found, found
    found = damaged("extra", lambda c: (c / rel_g.parent / "notes.txt").write_text("x"))
    assert f"extra    {rel_g.parent}/notes.txt" in found, found
    found = damaged("corrupt", lambda c: (c / rel_g).write_bytes((c / rel_g).read_bytes()[:200]))
    assert f"changed  {rel_g}" in found and f"onnx     {rel_g}" in found, found


# ---- the family x stage matrix (test_matrix_a.py and test_matrix_b.py run half of it each) --------------

MATRIX_GATE = {"max_kl": 1000.0, "on_fail": "warn"}  # random models: the gate passes; stage checks (parity) decide
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
    # 16 patch tokens per image pooled to 4, then the reduced vision graph exported (parity checked)
    "tokens": [{"type": "tokens", "method": "pool", "keep": 4}, {"type": "export", "format": "onnx"}],
    "engine": [{"type": "export", "format": "onnx", "target": "tensorrt"},
               {"type": "engine", "compute_capabilities": ["sm86"],
                "profiles": {"max_batch": 2, "max_prompt_tokens": 128, "max_new_tokens": 8}}],
}
TIED = {"gemma3", "paligemma"}  # tiny models whose lm_head is the input embedding table
# What each family refuses (at load time, with the reason); everything else must run.
REFUSED = {
    "qwen2_vl": {"shrink", "tokens"},
    "qwen2_5_vl": {"shrink", "tokens"},
    "mllama": {"shrink", "tokens"},
    **{f: {"tokens"} for f in ("idefics3", "smolvlm", "paligemma", "gemma3", "internvl")},
}


def matrix_families() -> list[str]:
    """Every registered family (config.model_type), in registry order."""
    from compress.arch import ADAPTERS

    return [mt for cls in ADAPTERS for mt in cls.model_types]


def matrix_cells(part: int) -> list:
    """The (family, stage) cells matrix file `part` (1: test_matrix_a, 0: test_matrix_b) runs: a checkerboard
    over families x sorted stage types, so the two files split every cell exactly once, each runs half of every
    stage's and every family's cells, and a slow stage (export and engine are ~80% of the time) or a slow family
    weighs on both files alike."""
    import pytest

    families, stages = matrix_families(), sorted(STAGES)
    return [pytest.param(f, s, id=f"{f}-{s}") for i, f in enumerate(families) for j, s in enumerate(stages)
            if (i + j) % 2 == part]


def matrix_recipe(tmp: Path, model: Path, stages: list[dict]) -> Path:
    """A recipe running `stages` (each under the lenient matrix gate) on a tiny model folder, 4 samples."""
    import yaml

    doc = {"name": "matrix", "seed": 0, "model": {"source": str(model)},
           "calibration": {"source": str(ROOT / "calibration/shapes-vqa/calib"), "num_samples": 4, "batch_size": 4},
           "evaluation": {"source": str(ROOT / "calibration/shapes-vqa/eval"), "num_samples": 4, "batch_size": 4,
                          "max_new_tokens": 4},
           "stages": [{**s, "name": f"s{i}", "gate": MATRIX_GATE} for i, s in enumerate(stages)]}
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run_matrix_cell(family: str, stage: str, model: Path, tmp: Path) -> None:
    """One cell: the family refuses the stage before anything is written, naming both; or the stage runs through
    the real pipeline (apply, gate, save) and its artifact, loaded back from disk, scores what the gate scored."""
    import pytest

    from compress.arch import get_adapter
    from compress.errors import RecipeError
    from compress.evaluate import evaluate
    from compress.pipeline import run

    recipe, out = matrix_recipe(tmp, model, STAGES[stage]), tmp / "run"
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
    if stage == "tokens":
        meta = json.loads((folder / "export.json").read_text())
        assert meta["image_tokens_per_image"] == 4 and meta["token_reduction"]["tokens_in"] == 16, meta
    if stage == "export":
        quantized = result.manifest["stages"][0]["details"]
        assert ("untied" in quantized) == (family in TIED), quantized.get("untied")
        assert quantized["awq"], "AWQ folded nothing"
    # Loaded back from disk and scored again, as a user would: the same answers as the stage's own gate.
    again = evaluate(folder, recipe=str(recipe), reference=str(out))["metrics"]
    assert again["token_agreement"] == pytest.approx(last["metrics"]["token_agreement"], abs=1e-6)
    assert again["logit_kl"] == pytest.approx(last["metrics"]["logit_kl"], rel=1e-3, abs=1e-5)
