"""Quantization library on real torch / bitsandbytes and tiny random VLMs of every family (no mocks)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from compress.arch import get_adapter, select_modules
from compress.config import Targets
from compress.errors import ConfigError
from compress.quant import (
    ActQuant,
    Int8Linear,
    WeightQuant,
    fake_quant,
    make_observer,
    nf4_details,
    quantize_linears,
    quantize_nf4,
    size_summary,
    smooth,
    use_portable_nf4_kernel,
)
from compress.runtime.torch_runner import TorchRunner
from compress.zoo.tiny import FAMILIES, tiny_model

ALL = Targets(components=["vision", "projector", "language", "lm_head"])
LANGUAGE = Targets(components=["language"])


# ---- helpers -----------------------------------------------------------------------------------------


@dataclass
class Tiny:
    model: nn.Module
    adapter: Any
    batches: list[dict[str, torch.Tensor]]  # calibration
    inputs: dict[str, torch.Tensor]  # evaluation
    processor: Any = None

    @torch.inference_mode()
    def loop(self, model: nn.Module) -> None:
        for inputs in self.batches:
            model(**inputs)

    @torch.inference_mode()
    def logits(self, model: nn.Module | None = None) -> torch.Tensor:
        return (model or self.model)(**self.inputs).logits

    def generate(self, model: nn.Module, tokens: int = 4) -> list[list[int]]:
        """Greedy decoding (prefill + one-token steps): exercises the quantized layers at batch size 1 too."""
        return TorchRunner(model, eos_token_id=-1, pad_token_id=0).generate(self.inputs, max_new_tokens=tokens)


def _image(g: torch.Generator) -> Image.Image:
    return Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy())


def tiny(family: str) -> Tiny:
    """A fresh seeded tiny model with two random calibration batches and one evaluation batch."""
    model, processor = tiny_model(family)
    adapter = get_adapter(family).bind(model)
    g = torch.Generator().manual_seed(1)

    def batch(questions: list[str]) -> dict[str, torch.Tensor]:
        return adapter.build_inputs(processor, [_image(g) for _ in questions], questions).inputs

    calib = [batch(["what color is it?", "which shape?"]), batch(["how many?", "is it round?"])]
    return Tiny(model, adapter, calib, batch(["what is this?", "where is the square?"]), processor)


def _linear_types(model: nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules() if isinstance(m, nn.Linear | Int8Linear)}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---- observers ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def outlier_tensor() -> torch.Tensor:
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0))
    x[:4] = torch.tensor([40.0, -38.0, 35.0, -30.0])
    return x


def test_observers_give_distinct_sensible_scales(outlier_tensor):
    x = outlier_tensor
    a = x.abs().numpy()
    amax, p99, p9999 = float(a.max()), float(np.percentile(a, 99)), float(np.percentile(a, 99.99))
    scales = {}
    for kind in ("minmax", "percentile", "entropy", "mse"):
        obs = make_observer(kind)
        for chunk in x.chunk(4):
            obs.update(chunk)
        scales[kind] = obs.scale()
        assert obs.batches == 4 and obs.values == x.numel()
    assert scales["minmax"] == amax / 127
    width = amax / 2048
    assert abs(scales["percentile"] * 127 - p9999) <= width
    assert scales["percentile"] < scales["minmax"]
    for kind in ("entropy", "mse"):  # clip the four outliers, keep the Gaussian bulk
        assert p99 / 127 < scales[kind] < 0.5 * scales["minmax"], (kind, scales)
    assert len({round(s, 9) for s in scales.values()}) == 4, scales


def test_percentile_parameter_and_histogram_rebinning():
    g = torch.Generator().manual_seed(0)
    small, large = torch.rand(20_000, generator=g), torch.rand(20_000, generator=g) * 5.0
    obs = make_observer("percentile", percentile=50.0, bins=256)
    obs.update(small)
    first_range = obs.range
    obs.update(large)  # range grows by 2^k and 2^k old bins merge into one
    assert obs.range >= float(large.max()) and obs.range / first_range == 2 ** round(np.log2(obs.range / first_range))
    assert float(obs.hist.sum()) == 40_000
    direct = torch.histc(torch.cat([small, large]), bins=256, min=0.0, max=obs.range).double()
    assert float((obs.hist - direct).abs().sum()) <= 2  # same edges; only float ties at edges may differ
    median = float(np.percentile(torch.cat([small, large]).numpy(), 50))
    assert abs(obs.threshold() - median) <= obs.range / 256

    huge = make_observer("entropy")
    huge.update(torch.full((10,), 1e-6))
    huge.update(torch.ones(10))  # growth factor beyond the bin count: everything old lands in bin 0
    assert huge.hist[0] == 10 and huge.hist.sum() == 20


def test_observer_errors_and_degenerate_input():
    for kind in ("minmax", "percentile", "entropy", "mse"):
        with pytest.raises(RuntimeError, match="saw no data"):
            make_observer(kind).scale()
        obs = make_observer(kind)
        obs.update(torch.zeros(100))
        assert obs.scale() == 1.0 / 127  # all zeros quantize exactly with any scale
    with pytest.raises(ConfigError, match="unknown observer"):
        make_observer("kl")
    with pytest.raises(ConfigError, match="bad parameters"):
        make_observer("minmax", percentile=99.0)
    with pytest.raises(ConfigError, match="power of two"):
        make_observer("entropy", bins=1000)
    with pytest.raises(ConfigError):
        ActQuant("percentile", {"percentile": 120.0})
    with pytest.raises(ConfigError):
        WeightQuant("per_group")  # type: ignore[arg-type]


# ---- Int8Linear ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
@torch.no_grad()
def test_int8_linear_exact_grid_and_error(granularity):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    x = torch.randn(5, 7, 64)
    ref = lin(x)
    wo = Int8Linear.from_linear(lin, granularity)  # weight-only
    assert wo.weight_int8.dtype == torch.int8 and wo.input_scale is None and wo.scheme == "w8a16"
    assert wo.weight_scale.shape == ((48,) if granularity == "per_channel" else (1,))
    deq = wo.dequantized_weight()
    assert torch.equal(deq, wo.weight_int8.float() * wo.weight_scale[:, None])
    assert int(wo.weight_int8.abs().max()) == 127
    assert bool(((deq - lin.weight).abs() <= wo.weight_scale[:, None] / 2 + 1e-7).all())
    assert torch.equal(wo(x), nn.functional.linear(x, deq, lin.bias))

    s = float(x.abs().max()) / 127
    w8a8 = Int8Linear.from_linear(lin, granularity, input_scale=s)
    assert w8a8.scheme == "w8a8"
    xq = fake_quant(x, w8a8.input_scale)
    codes = torch.round(xq / w8a8.input_scale)
    assert torch.equal(codes * w8a8.input_scale, xq) and codes.abs().max() <= 128  # on the int8 grid
    out = w8a8(x)
    assert torch.equal(out, nn.functional.linear(xq, deq, lin.bias))  # exactly what an int8 kernel computes
    err = float((out - ref).abs().max())
    bound = float(x.shape[-1] * (s / 2 * lin.weight.abs().max() + x.abs().max() * wo.weight_scale.max() / 2))
    assert 0 < err < bound
    assert err < 0.05 * float(ref.abs().max())


def test_int8_scales_stay_fp32_when_model_is_cast():
    q = Int8Linear.from_linear(nn.Linear(16, 8), input_scale=0.01)
    q.to(torch.bfloat16)
    assert q.weight_scale.dtype == q.input_scale.dtype == torch.float32 and q.bias.dtype == torch.bfloat16
    assert q.weight_int8.dtype == torch.int8
    assert q(torch.randn(2, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ---- W8A8 / W8A16 on tiny VLMs -----------------------------------------------------------------------


def test_w8a8_tiny_llava_close_to_float():
    t = tiny("llava")
    ref = t.logits()
    before = _linear_types(t.model)
    vision_state = {k: v.clone() for k, v in t.model.model.vision_tower.state_dict().items()}
    mods = select_modules(t.model, t.adapter, Targets(components=["projector", "language", "lm_head"]))
    details = quantize_linears(t.model, mods, WeightQuant(), ActQuant("percentile", {"percentile": 99.99}), t.loop)
    after = _linear_types(t.model)
    assert set(details) == set(mods)
    assert all(after[n] is Int8Linear for n in mods)
    assert all(after[n] is before[n] for n in before if n not in mods)  # the vision tower is untouched
    for k, v in t.model.model.vision_tower.state_dict().items():
        assert torch.equal(v, vision_state[k])
    d = next(iter(details.values()))
    assert d["scheme"] == "w8a8" and d["bits"] == 8 and d["observer"] == "percentile" and d["input_scale"] > 0
    assert d["quantized_bytes"] < d["fp32_bytes"] / 3
    out = t.logits()
    assert float((out - ref).abs().max()) < 0.05 * float(ref.abs().max())
    assert [len(row) for row in t.generate(t.model)] == [4, 4]
    summary = size_summary(details)
    assert 0.25 < summary["ratio"] < 0.3


def test_weight_only_needs_no_calibration():
    t = tiny("llava")
    ref = t.logits()
    mods = select_modules(t.model, t.adapter, LANGUAGE)
    details = quantize_linears(t.model, mods, WeightQuant("per_tensor"), act=None, forward_loop=None)
    assert {d["scheme"] for d in details.values()} == {"w8a16"}
    assert float((t.logits() - ref).abs().max()) < 0.05 * float(ref.abs().max())


def test_calibration_without_batches_fails_before_any_change():
    t = tiny("llava")
    state = _state(t.model)
    types = _linear_types(t.model)
    mods = select_modules(t.model, t.adapter, LANGUAGE)
    with pytest.raises(ConfigError, match="observed no activations for 14 of 14 modules"):
        quantize_linears(t.model, mods, WeightQuant(), ActQuant("minmax"), forward_loop=lambda m: None)
    with pytest.raises(ConfigError, match="needs calibration data"):
        quantize_linears(t.model, mods, WeightQuant(), ActQuant("minmax"), forward_loop=None)
    with pytest.raises(ConfigError, match="no activations"):
        smooth(t.model, mods, lambda m: None, alpha=0.5)
    assert _linear_types(t.model) == types
    after = t.model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert not any(m._forward_pre_hooks for m in t.model.modules())  # hooks were removed


def test_compressed_tensors_round_trip_is_bit_exact(tmp_path):
    """Three schemes in one model -> three config groups; our loader and plain transformers both rebuild it."""
    from transformers import AutoModelForImageTextToText

    from compress.checkpoint import load_checkpoint, save_checkpoint

    t = tiny("llava")
    mlp = select_modules(t.model, t.adapter, Targets(components=["language"], include=["*mlp*"]))
    attn = select_modules(t.model, t.adapter, Targets(components=["language"], exclude=["*mlp*"]))
    vision = select_modules(t.model, t.adapter, Targets(components=["vision"]))
    smooth(t.model, mlp, t.loop, alpha=0.5, act=ActQuant("minmax"))
    quantize_linears(t.model, mlp, WeightQuant(), ActQuant("minmax"), t.loop)
    quantize_linears(t.model, attn, WeightQuant("per_tensor"), None)
    quantize_linears(t.model, vision, WeightQuant(), ActQuant(dynamic="per_token"))
    out = t.logits()
    _, processor = tiny_model("llava")
    save_checkpoint(t.model, processor, tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "mixed-precision"
    assert sorted(g["format"] for g in config["config_groups"].values()) == [
        "int-quantized", "int-quantized", "pack-quantized"]
    assert not list(tmp_path.glob("compress_quant*"))

    fresh, _ = load_checkpoint(tmp_path, get_adapter("llava"))
    assert {n for n, m in fresh.named_modules() if isinstance(m, Int8Linear)} == set(mlp) | set(attn) | set(vision)
    assert torch.equal(t.logits(fresh), out)
    assert not hasattr(fresh.config, "quantization_config") and fresh.hf_quantizer is None

    plain, info = AutoModelForImageTextToText.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert torch.equal(t.logits(plain.eval()), out)


# ---- SmoothQuant ---------------------------------------------------------------------------------------


def _with_outlier_channels(t: Tiny) -> None:
    """Give the language model's q/k/v and gate/up inputs a few large channels (as real LLMs have)."""
    with torch.no_grad():
        for layer in t.adapter.decoder_layers(t.model):
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[3, 17]] *= 40.0


def test_smoothquant_is_equivalent_and_flattens_outliers():
    t = tiny("llava")
    _with_outlier_channels(t)
    ref = t.logits()
    targets = Targets(components=["language"], include=["*q_proj", "*k_proj", "*v_proj", "*gate_proj", "*up_proj"])
    mods = select_modules(t.model, t.adapter, targets)
    norms = {k: v.clone() for k, v in t.model.state_dict().items() if "layernorm" in k}
    result = smooth(t.model, mods, t.loop, alpha=0.5)
    details = result["modules"]
    assert set(details) == set(mods) and result["not_smoothed"] == []
    assert all(type(t.model.get_submodule(n)) is nn.Linear for n in mods)  # folded: plain Linears remain
    changed = [k for k, v in t.model.state_dict().items() if k in norms and not torch.equal(v, norms[k])]
    assert len(changed) == 2 * len(t.adapter.decoder_layers(t.model))  # 1/s went into both norms of each layer
    torch.testing.assert_close(t.logits(), ref, rtol=1e-4, atol=1e-5)  # smoothing alone changes nothing
    for name, d in details.items():
        assert d["outlier_ratio_after"] < d["outlier_ratio_before"] / 3
        assert d["folded_into"].endswith("layernorm (norm)"), (name, d["folded_into"])

    # What the quantizer sees: per-tensor scales shrink, and W8A8 error drops versus the unsmoothed model.
    smoothed = quantize_linears(t.model, mods, WeightQuant(), ActQuant("minmax"), t.loop)
    plain_model = tiny("llava")
    _with_outlier_channels(plain_model)
    plain = quantize_linears(plain_model.model, list(mods), WeightQuant(), ActQuant("minmax"), plain_model.loop)
    for name in mods:
        assert smoothed[name]["input_scale"] < plain[name]["input_scale"]
    err_smooth = float((t.logits() - ref).abs().mean())
    err_plain = float((plain_model.logits() - ref).abs().mean())
    assert err_smooth < err_plain


class _Block(nn.Module):
    """A pre-norm attention + gated MLP block named like Llama's (the names smoothing rules match)."""

    def __init__(self, heads: int = 4, kv_heads: int = 2, head_dim: int = 8):
        super().__init__()
        hidden = heads * head_dim
        self.input_layernorm = nn.LayerNorm(hidden)
        self.self_attn = nn.Module()
        self.self_attn.head_dim, self.self_attn.num_key_value_groups = head_dim, heads // kv_heads
        self.self_attn.q_proj = nn.Linear(hidden, hidden)
        self.self_attn.k_proj = nn.Linear(hidden, kv_heads * head_dim)
        self.self_attn.v_proj = nn.Linear(hidden, kv_heads * head_dim)
        self.self_attn.o_proj = nn.Linear(hidden, hidden)
        self.mlp = nn.Module()
        self.mlp.gate_proj, self.mlp.up_proj = nn.Linear(hidden, 64), nn.Linear(hidden, 64)
        self.mlp.down_proj = nn.Linear(64, hidden)
        self.shape = (heads, kv_heads, head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads, kv, hd = self.shape
        a = self.self_attn
        h = self.input_layernorm(x)
        b, s, _ = h.shape
        q = a.q_proj(h).view(b, s, heads, hd).transpose(1, 2)
        k = a.k_proj(h).view(b, s, kv, hd).transpose(1, 2).repeat_interleave(heads // kv, dim=1)
        v = a.v_proj(h).view(b, s, kv, hd).transpose(1, 2).repeat_interleave(heads // kv, dim=1)
        o = torch.softmax(q @ k.transpose(-1, -2) / hd**0.5, -1) @ v
        x = x + a.o_proj(o.transpose(1, 2).reshape(b, s, heads * hd))
        return x + self.mlp.down_proj(torch.nn.functional.silu(self.mlp.gate_proj(x)) * self.mlp.up_proj(x))


def test_smoothquant_folds_every_mapping_exactly_and_flattens_outliers():
    torch.manual_seed(0)
    block = _Block().eval()
    with torch.no_grad():
        block.input_layernorm.weight[[3, 9]] *= 50.0  # outlier channels into q/k/v
        block.self_attn.v_proj.weight[[2, 11]] *= 30.0  # ... into o_proj (through attention, under GQA)
        block.mlp.up_proj.weight[[5]] *= 40.0  # ... into down_proj (through the gated product)
    x = torch.randn(4, 6, 32)
    ref = block(x)
    names = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]

    def loop(m: nn.Module) -> None:
        with torch.no_grad():
            m(x)

    result = smooth(block, names, loop, alpha=0.5)
    details = result["modules"]
    assert result["not_smoothed"] == ["mlp.gate_proj", "mlp.up_proj"]  # no post-attention norm in this block
    assert {d["folded_into"] for d in details.values()} == {
        "input_layernorm (norm)", "self_attn.v_proj (heads)", "mlp.up_proj (rows)"}
    torch.testing.assert_close(block(x), ref, rtol=1e-4, atol=1e-4)
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
        assert details[name]["act_amax_after"] < details[name]["act_amax_before"] / 4, name
    with pytest.raises(ConfigError, match="alpha"):
        smooth(block, names, loop, alpha=1.5)


def test_smoothquant_without_a_producer_to_fold_into_changes_nothing():
    lin = nn.Linear(32, 16)
    model = nn.Sequential(lin)
    x = torch.randn(8, 32)
    before = lin.weight.clone()
    result = smooth(model, ["0"], lambda m: m(x), alpha=0.5)
    assert result == {"modules": {}, "not_smoothed": ["0"]}
    assert torch.equal(lin.weight, before)


# ---- NF4 ---------------------------------------------------------------------------------------------


def test_nf4_tiny_llava_and_checkpoint_round_trip(tmp_path):
    import bitsandbytes as bnb
    from transformers import AutoModelForImageTextToText

    t = tiny("llava")
    ref = t.logits()
    original = _state(t.model)
    mods = select_modules(t.model, t.adapter, LANGUAGE)
    q = quantize_nf4(t.model, list(mods), blocksize=32, double_quant=True, workdir=tmp_path / "work")
    assert not any((tmp_path / "work").iterdir())  # scratch copy removed
    assert all(torch.equal(v, original[k]) for k, v in t.model.state_dict().items())  # input untouched
    for name, m in q.named_modules():
        if name in mods:
            assert isinstance(m, bnb.nn.Linear4bit) and m.weight.quant_state.blocksize == 32
            assert m.weight.quant_state.quant_type == "nf4" and m.weight.quant_state.nested
        elif isinstance(m, nn.Linear):
            assert type(m) is nn.Linear and torch.equal(m.weight, original[f"{name}.weight"])
    out = t.logits(q)
    # a sanity bound on random weights: 4-bit everywhere in the tiny Gemma3 (scaled embeddings) measured 0.27
    assert not torch.equal(out, ref) and float((out - ref).abs().max()) < 0.3 * float(ref.abs().max())

    details = nf4_details(q)
    assert set(details) == set(mods)
    d = details["model.language_model.layers.0.mlp.down_proj"]
    assert (d["bits"], d["blocksize"], d["double_quant"], d["shape"]) == (4, 32, True, [32, 64])
    assert d["packed_bytes"] == 32 * 64 // 2 and d["fp32_bytes"] == 32 * 64 * 4
    assert size_summary(details)["ratio"] < 0.5

    q.save_pretrained(tmp_path / "nf4")
    assert json.loads((tmp_path / "nf4" / "config.json").read_text())["quantization_config"]["load_in_4bit"]
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "nf4")
    assert use_portable_nf4_kernel(reloaded) == len(mods)
    assert reloaded.model.language_model.layers[1].self_attn.k_proj.weight.quant_state.blocksize == 32
    assert type(reloaded.lm_head) is nn.Linear
    assert torch.equal(t.logits(reloaded.eval()), out)
    assert t.generate(reloaded) == t.generate(q)


def test_nf4_shape_errors_name_the_module_before_any_change(tmp_path):
    t = tiny("llava")
    mods = select_modules(t.model, t.adapter, LANGUAGE)
    with pytest.raises(ConfigError, match=r"'model\.language_model\.layers\.0\.self_attn\.q_proj' has in_features=32"):
        quantize_nf4(t.model, list(mods), blocksize=64, workdir=tmp_path)
    with pytest.raises(ConfigError, match="blocksize 48 is not supported"):
        quantize_nf4(t.model, list(mods), blocksize=48, workdir=tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        quantize_nf4(t.model, ["model.nope"], blocksize=32, workdir=tmp_path)
    assert not any(tmp_path.iterdir())
    quantize_linears(t.model, ["lm_head"], WeightQuant(), None)
    with pytest.raises(ConfigError, match=r"plain float nn\.Linear"):
        quantize_nf4(t.model, ["lm_head"], blocksize=32, workdir=tmp_path)


def test_tied_weights_are_refused(tmp_path):
    model, _ = tiny_model("llava")
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    for attempt in (
        lambda: quantize_nf4(model, ["lm_head"], blocksize=32, workdir=tmp_path),
        lambda: quantize_linears(model, ["lm_head"]),
        lambda: smooth(model, ["lm_head"], lambda m: None),
    ):
        with pytest.raises(ConfigError, match=r"'lm_head' shares its weight with model\.language_model\.embed_tokens"):
            attempt()
    assert type(model.lm_head) is nn.Linear


# ---- every family ------------------------------------------------------------------------------------


def _all(model: nn.Module) -> Targets:
    """Every component; a tied lm_head (PaliGemma, Gemma3 share it with the embeddings) is left out."""
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return Targets(components=["vision", "projector", "language"]) if tied else ALL


@pytest.mark.parametrize("family", FAMILIES)
def test_w8a8_every_family(family):
    t = tiny(family)
    ref = t.logits()
    mods = select_modules(t.model, t.adapter, _all(t.model))
    details = quantize_linears(t.model, mods, WeightQuant(), ActQuant("minmax"), t.loop)
    assert len(details) == len(mods) and all(type(t.model.get_submodule(n)) is Int8Linear for n in mods)
    out = t.logits()
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert float((out - ref).abs().max()) < 0.1 * float(ref.abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_nf4_every_family(family, tmp_path: Path):
    t = tiny(family)
    ref = t.logits()
    mods = select_modules(t.model, t.adapter, _all(t.model))
    q = quantize_nf4(t.model, list(mods), blocksize=32, double_quant=False, workdir=tmp_path)
    assert set(nf4_details(q)) == set(mods)
    assert not any(d["double_quant"] for d in nf4_details(q).values())
    out = t.logits(q)
    # a sanity bound on random weights: 4-bit everywhere in the tiny Gemma3 (scaled embeddings) measured 0.27
    assert not torch.equal(out, ref) and float((out - ref).abs().max()) < 0.5 * float(ref.abs().max())


# ---- Gemma-family models: (1 + weight) norms, a pre-feedforward norm, a tied lm_head ------------------


def test_norm_offset_is_probed_from_the_module():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from compress.quant.smooth_rules import norm_offset

    layer_norm = nn.LayerNorm(16)
    with torch.no_grad():
        layer_norm.weight.uniform_(0.5, 2.0)
        layer_norm.bias.uniform_(-1.0, 1.0)
    for norm, want in ((Gemma3RMSNorm(16), 1.0), (LlamaRMSNorm(16), 0.0), (layer_norm, 0.0)):
        before = {k: v.clone() for k, v in norm.state_dict().items()}
        assert norm_offset(norm) == want, type(norm).__name__
        assert all(torch.equal(v, norm.state_dict()[k]) for k, v in before.items())  # probing restores them


@pytest.mark.parametrize("method", ["smoothquant", "awq"])
@pytest.mark.parametrize("family", ["gemma3", "paligemma"])
def test_smoothing_folds_into_gemma_norms(family, method):
    """Gemma's RMSNorm scales by (1 + weight): folding 1/s into the weight as for Llama moved the outputs and
    the fold was refused. Gemma 2 / 3 also read the MLP from pre_feedforward_layernorm."""
    from compress.quant.int4 import Int4Quant

    t = tiny(family)
    ref = t.logits()
    mods = select_modules(t.model, t.adapter, LANGUAGE)
    result = smooth(t.model, mods, t.loop, **({"int4": Int4Quant(group_size=32)} if method == "awq"
                                              else {"alpha": 0.5}))
    folded = {n: d["folded_into"] for n, d in result["modules"].items()}
    assert any(n.endswith("q_proj") and "input_layernorm" in f for n, f in folded.items())
    mlp_norm = "pre_feedforward_layernorm" if family == "gemma3" else "post_attention_layernorm"
    assert any(n.endswith("gate_proj") and mlp_norm in f for n, f in folded.items()), folded
    torch.testing.assert_close(t.logits(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_tied_lm_head_is_untied_then_quantized(scheme, tmp_path):
    from transformers import AutoModelForImageTextToText

    from compress.checkpoint import save_checkpoint
    from compress.quant.int4 import Int4Quant
    from compress.quant.linears import quantize_int4_linears
    from compress.quant.untie import untie_heads

    t = tiny("gemma3")
    embed = t.model.get_input_embeddings().weight
    assert t.model.get_output_embeddings().weight is embed  # Gemma 3 ties them
    table = embed.detach().clone()
    names = list(select_modules(t.model, t.adapter, Targets(components=["language", "lm_head"])))
    assert untie_heads(t.model, names) == {"lm_head": "model.language_model.embed_tokens.weight"}
    assert t.model.config.tie_word_embeddings is False and untie_heads(t.model, names) == {}
    if scheme == "int8":
        quantize_linears(t.model, names, WeightQuant())
    else:
        quantize_int4_linears(t.model, names, Int4Quant(group_size=32))
    assert type(t.model.lm_head).__name__ == {"int8": "Int8Linear", "int4": "Int4Linear"}[scheme]
    assert torch.equal(t.model.get_input_embeddings().weight, table)  # the table is not rounded
    want = t.logits()
    save_checkpoint(t.model, t.processor, tmp_path)
    plain = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()  # what a user without us loads
    assert torch.equal(plain.get_input_embeddings().weight, table)
    torch.testing.assert_close(t.logits(plain), want, rtol=1e-5, atol=1e-5)
