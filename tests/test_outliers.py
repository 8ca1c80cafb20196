"""INT8 on a model with real-LLM activation outliers: the test model, each outlier-aware technique, and the
recipe-level proof that the default W8A8 recipe fails while the outlier-aware one holds in PyTorch and
in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from compress.observe import Hessian
from compress.pipeline import run
from compress.quant import ActQuant, Int8Linear, KeepFloat, WeightQuant, quantize_linears, smooth
from compress.quant.gptq import gptq_quantize
from compress.quant.int8 import dynamic_scale, fake_quant, quantize_weight
from compress.quant.smooth_rules import Mapping
from compress.quant.smoothquant import _Factors, int8_output, search_alpha
from compress.zoo import MODELS
from compress.zoo.outliers import build

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _input_amax(model: nn.Module, module: nn.Module, inputs: dict) -> torch.Tensor:
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].abs().amax(dim=(0, 1))))
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return seen[0]


def test_outlier_model_regenerates_exactly_and_has_llm_like_outliers(tmp_path: Path):
    check = build(MODELS["shapes-vqa"], tmp_path / "m")  # raises if fp32 logits moved by more than 1e-3
    assert check["max_logit_change"] < 1e-3
    shipped = load_file(MODELS["shapes-vqa-outliers"] / "model.safetensors")
    rebuilt = load_file(tmp_path / "m" / "model.safetensors")
    assert shipped.keys() == rebuilt.keys()
    assert all(torch.equal(shipped[k], rebuilt[k]) for k in shipped)

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from compress.zoo import shapes

    model = AutoModelForImageTextToText.from_pretrained(MODELS["shapes-vqa-outliers"]).eval()
    processor = AutoProcessor.from_pretrained(MODELS["shapes-vqa-outliers"])
    tasks = list(shapes.samples(0, 8))
    inputs = processor(images=[t.image for t in tasks], text=[f"<image> {t.question} answer :" for t in tasks],
                       return_tensors="pt", padding=True)
    down = _input_amax(model, model.model.language_model.layers[1].mlp.down_proj, inputs)
    q = _input_amax(model, model.model.language_model.layers[1].self_attn.q_proj, inputs)
    assert float(down.max() / down.median()) > 100  # SmolLM2-135M's down_proj: absmax ~200x the bulk
    assert float(q.max() / q.median()) > 10


def _layer_with_outliers(seed: int = 0) -> tuple[nn.Linear, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(64, 32, bias=False)
    nn.init.normal_(layer.weight, std=0.1, generator=gen)
    mix = torch.randn(64, 64, generator=gen) * 0.3 + torch.eye(64)  # correlated input channels
    x = torch.randn(512, 64, generator=gen) @ mix
    x[:, [3, 17]] *= 60.0  # two outlier channels in every token
    return layer, x


def test_dynamic_per_token_fake_quant_follows_compressed_tensors():
    layer, x = _layer_with_outliers()
    q = Int8Linear.from_linear(layer, act_dynamic="per_token")
    assert q.scheme == "w8a8" and q.activations == "dynamic_per_token" and q.input_scale is None
    tokens = x.reshape(8, 64, 64)  # [batch, seq, hidden]: one scale per token, max|x| / 127.5
    scale = tokens.abs().amax(-1, keepdim=True) / 127.5
    expected = torch.nn.functional.linear(fake_quant(tokens, scale), q.dequantized_weight())
    assert torch.equal(q(tokens), expected)
    # compressed-tensors keeps the first two axes: a 2-D [tokens, hidden] input gets one scale per call.
    assert torch.equal(dynamic_scale(x, "per_token"), x.abs().max() / 127.5)
    assert torch.equal(dynamic_scale(x, "per_tensor"), x.abs().max() / 127.5)
    zero = dynamic_scale(torch.zeros(1, 2, 4), "per_token")
    assert torch.equal(zero, torch.full((1, 2, 1), torch.finfo(torch.float32).eps))  # never 0, never NaN


def test_gptq_rounding_beats_round_to_nearest_on_correlated_inputs():
    layer, x = _layer_with_outliers()
    h = Hessian(64)
    for chunk in x.split(128):
        h.update(chunk)
    _, scale = quantize_weight(layer.weight, "per_channel")
    rtn, _ = quantize_weight(layer.weight, "per_channel")
    gptq = gptq_quantize(layer.weight, h.value(), scale, 127)
    ref = x @ layer.weight.T

    def err(q: torch.Tensor) -> float:
        return float(((x @ (q.float() * scale[:, None]).T - ref) ** 2).mean())

    assert gptq.abs().max() <= 127 and err(gptq) < 0.8 * err(rtn)


def test_smoothquant_alpha_search_scores_each_candidate_and_picks_the_best():
    layer, x = _layer_with_outliers()
    act = ActQuant(dynamic="per_token")
    mapping = Mapping("norm", ("layer",), "norm", slice(None))
    best, errors = search_alpha(_Factors(mapping, x.abs().amax(0), [layer.weight]), [layer.weight], x,
                                int8_output(act, 127))
    assert errors[best] == min(errors.values()) and errors[best] < 0.5 * errors[0.0]


def test_keep_float_takes_the_most_sensitive_layers_within_its_budget():
    keep = KeepFloat(budget=0.3)
    sens = {"a": 1e-2, "b": 5e-3, "c": 1e-4, "d": 2e-2}
    params = {"a": 100, "b": 100, "c": 100, "d": 300}  # d is worst but alone exceeds 30% of 600
    assert keep.choose(sens, params) == {"a"}
    assert KeepFloat(budget=0.9).choose(sens, params) == {"d", "a", "b"}


def test_outlier_aware_quantize_on_a_model_keeps_outputs_where_static_collapses():
    from compress.arch import get_adapter, select_modules
    from compress.config import Targets
    from compress.export.onnx import dummy_images
    from compress.zoo.outliers import add_outliers
    from compress.zoo.tiny import tiny_model

    model, processor = tiny_model("llava")
    add_outliers(model)
    adapter = get_adapter("llava").bind(model)
    batches = [adapter.build_inputs(processor, dummy_images(4, seed=s), ["what is it?"] * 4).inputs for s in (1, 2)]

    def loop(m: nn.Module) -> None:
        with torch.inference_mode():
            for b in batches:
                m(**b)

    with torch.no_grad():
        ref = model(**batches[0]).logits
    names = list(select_modules(model, adapter, Targets(components=["language"])))
    smooth(model, names, loop, alpha="auto", act=ActQuant(dynamic="per_token"))
    details = quantize_linears(model, names, WeightQuant(rounding="gptq"), ActQuant(dynamic="per_token"), loop,
                               KeepFloat(budget=0.05))
    with torch.no_grad():
        got = model(**batches[0]).logits
    # Each layer's INT8 output error was measured on its own inputs, and the layers kept float are the most
    # sensitive that fit the 5% budget (greedily: a quantized layer worse than a kept one did not fit).
    size = {n: d["shape"][0] * d["shape"][1] for n, d in details.items()}
    kept = {n for n, d in details.items() if d["kept_float"]}
    assert all(isinstance(d["output_rel_error"], float) and d["output_rel_error"] > 0 for d in details.values())
    assert kept and sum(size[n] for n in kept) <= 0.05 * sum(size.values())
    for name, d in details.items():
        assert type(model.get_submodule(name)) is (nn.Linear if name in kept else Int8Linear), name
        worse_kept = [k for k in kept if details[k]["output_rel_error"] < d["output_rel_error"]]
        assert name in kept or all(size[name] > size[k] for k in worse_kept), (name, worse_kept)
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()


# ---- the recipe-level proof (the bundled recipe on the outlier model) ----------------------------------


def _recipe(tmp_path: Path, name: str, stages: list[dict]) -> Path:
    data = yaml.safe_load((ROOT / "recipes" / "int8-outliers.yaml").read_text())
    data.update(name=name, stages=stages)
    for section in ("calibration", "evaluation"):
        data[section]["source"] = str(ROOT / "calibration" / "shapes-vqa" / data[section]["source"].split("/")[-1])
    data.pop("output")
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_default_int8_fails_its_gate_on_outliers_and_outlier_aware_holds_in_torch_and_ort(tmp_path: Path):
    recipe = yaml.safe_load((ROOT / "recipes" / "int8-outliers.yaml").read_text())
    default = {**yaml.safe_load((ROOT / "recipes" / "int8.yaml").read_text())["stages"][0]}
    stopped = run(_recipe(tmp_path, "percentile", [default]), out=tmp_path / "percentile")
    assert stopped.status == "stopped"
    rec = stopped.manifest["stages"][0]
    assert rec["status"] == "failed" and rec["checks"][0]["retention"] < 0.5

    result = run(_recipe(tmp_path, "aware", recipe["stages"]), out=tmp_path / "aware")
    assert result.ok, result.manifest["stages"]
    base = result.manifest["baseline"]["metrics"]
    for rec in result.manifest["stages"]:  # the quantized torch model, then the exported graphs in ORT
        assert rec["metrics"]["exact_match"] / base["exact_match"] >= 0.99
        assert rec["metrics"]["token_agreement"] >= 0.98
    torch_rec, ort_rec = result.manifest["stages"]
    assert torch_rec["backend"] == "torch" and ort_rec["backend"] == "onnxruntime"
    assert torch_rec["details"]["activations"] == "dynamic per_token"
    assert ort_rec["details"]["int8_kernels"]["requires"] is None  # portable graphs
    assert (result.run_dir / "sensitivity-int8-outlier-aware.png").is_file()
    # Plain transformers (a process that never imports this project) loads the INT8 stage and scores the same.
    from helpers import score_in_fresh_process

    plain = score_in_fresh_process(result.run_dir / torch_rec["checkpoint"], ROOT / "calibration/shapes-vqa/eval", 24)
    assert plain["loading"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    assert plain["exact_match"] == pytest.approx(torch_rec["metrics"]["exact_match"], abs=1e-9)
