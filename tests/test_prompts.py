"""Prompt and answer formats a user can set in the recipe, and teacher forcing of exactly what a model emits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from compress.arch import get_adapter
from compress.checkpoint import model_bytes
from compress.cli import main
from compress.errors import RecipeError
from compress.recipe import ExtractConfig, load_recipe
from compress.zoo import MODELS
from compress.zoo.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
EVAL = str(ROOT / "calibration" / "shapes-vqa" / "eval")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _recipe(tmp_path: Path, source: str, evaluation: dict | None = None, name: str = "p") -> Path:
    doc = {"name": name, "model": {"source": source},
           "evaluation": {"source": EVAL, "num_samples": 100, "batch_size": 50, "max_new_tokens": 24,
                          **(evaluation or {})},
           "stages": [{"type": "prune", "method": "l1_unstructured", "sparsity": 0.05,
                       "targets": {"components": ["language"]}, "gate": {"min_retention": 0.5}}]}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def no_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled model as a user's local folder whose processor has no chat template."""
    folder = tmp_path_factory.mktemp("local") / "llava-no-template"
    shutil.copytree(MODELS["shapes-vqa"], folder)
    (folder / "chat_template.jinja").unlink()
    return folder


def test_recipe_prompt_scores_a_model_without_chat_template(tmp_path: Path, no_template: Path, capsys):
    out = tmp_path / "guessed"
    assert main(["run", str(_recipe(tmp_path, str(no_template), name="guessed")), "--out", str(out),
                 "--threads", "1"]) == 0
    err = capsys.readouterr().err
    guess = "the processor has no chat template and the recipe sets no evaluation.prompt"
    assert guess in err and "USER: <image>\\n" in err  # the warning shows the prompt actually used
    guessed = json.loads((out / "manifest.json").read_text())
    assert guessed["prompt"]["source"] == "adapter default"
    assert guessed["runtime"]["threads"] == 1 and guessed["runtime"]["threads_requested"] == 1

    out = tmp_path / "set"
    prompt = {"prompt": "<image> {question} answer :"}
    assert main(["run", str(_recipe(tmp_path, str(no_template), prompt, name="set")), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert guess not in err
    assert "deploy lint: chat_template" in err  # the artifact still has none: the deploy lint says so
    set_ = json.loads((out / "manifest.json").read_text())
    assert set_["prompt"] == {"source": "recipe", "example": set_["prompt"]["example"]}
    assert set_["prompt"]["example"].startswith("<image> ") and set_["prompt"]["example"].endswith(" answer :")
    assert set_["baseline"]["metrics"]["exact_match"] >= 0.95
    assert guessed["baseline"]["metrics"]["exact_match"] < set_["baseline"]["metrics"]["exact_match"] - 0.3


def test_extract_scores_the_final_answer_and_reports_the_raw_one(tmp_path: Path):
    extract = {"extract": {"after_last": " ; "}}
    out = tmp_path / "run"
    assert main(["run", str(_recipe(tmp_path, "zoo:shapes-vqa", extract)), "--out", str(out)]) == 0
    metrics = json.loads((out / "manifest.json").read_text())["baseline"]["metrics"]
    assert {"exact_match", "exact_match_raw"} <= set(metrics)
    assert metrics["exact_match"] >= metrics["exact_match_raw"] >= 0.95
    assert ExtractConfig(after_last=" so ")("it is round so red") == "red"
    assert ExtractConfig(regex=r"answer: (\w+)")("the answer: blue.") == "blue"
    assert ExtractConfig(regex=r"\d+")("no digits") == "no digits"


@pytest.mark.parametrize(
    ("evaluation", "needle"),
    [
        ({"prompt": "<image> what is shown? answer:"}, "evaluation.prompt"),
        ({"prompt": "<image> {question} {answer}"}, "no other {...} field"),
        ({"extract": {"after_last": " so ", "regex": "x"}}, "exactly one of"),
        ({"extract": {"regex": "("}}, "regex does not compile"),
    ],
)
def test_prompt_and_extract_errors_name_the_field(tmp_path: Path, evaluation: dict, needle: str):
    with pytest.raises(RecipeError) as e:
        load_recipe(_recipe(tmp_path, "zoo:shapes-vqa", evaluation))
    assert needle in str(e.value) and ".yaml:" in str(e.value)


def test_prompt_without_the_image_token_fails_before_writing(tmp_path: Path, capsys):
    out = tmp_path / "run"
    path = _recipe(tmp_path, "zoo:shapes-vqa", {"prompt": "question: {question} answer:"})
    assert main(["run", str(path), "--out", str(out)]) == 2
    assert "image token '<image>'" in capsys.readouterr().err
    assert not out.exists()


def test_forced_answers_are_the_tokens_the_model_would_emit():
    model, processor = tiny_model("llava")
    adapter = get_adapter("llava").bind(model)
    end = adapter.end_token(processor)
    assert adapter.forced_answer(processor, "<image> q answer:", "red") == " red" + end
    assert adapter.forced_answer(processor, "<|im_start|>assistant\n", "red") == "red" + end  # no space after \n
    long = "a red circle and a blue square in the top left corner"
    cut = adapter.forced_answer(processor, "q:", long, max_tokens=5)
    assert not cut.endswith(end) and len(processor.tokenizer(cut, add_special_tokens=False)["input_ids"]) == 5
    assert adapter.forced_answer(processor, "q:", "red", max_tokens=5).endswith(end)


def test_model_bytes_counts_tied_tensors_once():
    emb = nn.Embedding(100, 16)
    head = nn.Linear(16, 100, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    assert model_bytes(model) == 100 * 16 * 4
    untied = nn.ModuleDict({"emb": nn.Embedding(100, 16), "head": nn.Linear(16, 100, bias=False)})
    assert model_bytes(untied) == 2 * 100 * 16 * 4
    assert torch.equal(model["head"].weight, model["emb"].weight)
