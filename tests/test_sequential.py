"""Layer-sequential calibration on real tiny models of every family (no mocks): replay is exact, the walk
gives the whole-model pass's numbers where the algorithm is unchanged, and spilling changes nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_with_batch
from safetensors.torch import save

from compress.arch import select_modules
from compress.config import Targets
from compress.errors import ConfigError
from compress.quant import ActQuant, WeightQuant, quantize_linears
from compress.sequential import ActivationStore, Sequencer, block_lists
from compress.stages.base import StageContext
from compress.stages.catalog import get_stage
from compress.zoo.tiny import FAMILIES

ALL = Targets(components=["vision", "projector", "language", "lm_head"])


def _batches(family: str):
    model, adapter, batch, _ = tiny_with_batch(family)
    g = torch.Generator().manual_seed(2)
    second = {k: v.clone() for k, v in batch.items()}
    if "pixel_values" in second:
        second["pixel_values"] = torch.randn(second["pixel_values"].shape, generator=g)
    return model.eval(), adapter, [batch, second]


def _whole_model_loop(batches):
    def loop(m):
        with torch.inference_mode():
            for b in batches:
                m(**b)

    return loop


@pytest.mark.parametrize("family", FAMILIES)
def test_a_sweep_then_replay_answers_exactly_like_the_model(family, tmp_path):
    """Capture, block-by-block propagation and replay reproduce the model's logits bit for bit, and every
    block sequence of the family (vision encoder, decoder) is found and walked."""
    model, _, batches = _batches(family)
    seq = Sequencer(model, batches, ActivationStore(tmp_path, 0))  # budget 0: every activation spills to disk
    seq.sweep()
    assert seq.done == block_lists(model) and len(seq.done) == 2, seq.done
    assert seq.store.stats()["spilled_bytes"] > 0
    for b, batch in enumerate(batches):
        with seq._patched(record=False), torch.inference_mode():
            seq._batch = b
            replayed = model(**batch, use_cache=False).logits
        with torch.inference_mode():
            assert torch.equal(replayed, model(**batch).logits), family


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "mllama"])
def test_int8_walk_with_original_inputs_equals_one_whole_model_pass(family, tmp_path):
    """Static INT8 with GPTQ over every component: block by block on the original blocks' outputs gives the
    same codes, scales and input scales as one calibration pass of the whole model."""
    model, adapter, batches = _batches(family)
    names = list(select_modules(model, adapter, ALL, kinds=(torch.nn.Linear,)))
    weight, act = WeightQuant(rounding="gptq"), ActQuant(observer="minmax")
    whole = copy.deepcopy(model)
    expected = quantize_linears(whole, names, weight, act, _whole_model_loop(batches))
    walked = Sequencer(model, batches, ActivationStore(tmp_path, 1 << 30), "original")
    got = {}
    for unit in walked.units(names):
        found = quantize_linears(unit.root, unit.names, weight, act, unit.loop)
        got.update({unit.full(n): d for n, d in found.items()})
    assert got.keys() == expected.keys()
    for name in names:
        assert got[name]["input_scale"] == expected[name]["input_scale"], name
        a, b = model.get_submodule(name), whole.get_submodule(name)
        assert torch.equal(a.weight_int8, b.weight_int8) and torch.equal(a.weight_scale, b.weight_scale), name


def _stage(model, adapter, batches, tmp_path, raw, **ctx_fields):
    spec = get_stage(raw["type"])
    ctx = StageContext(adapter=adapter, processor=None, workdir=tmp_path, seed=0, calibration_batches=batches,
                       **ctx_fields)
    return spec.apply(model, spec.config.model_validate({"gate": {"min_retention": 0.1}, **raw}), ctx)


def _state(model) -> bytes:
    return save({k: v.contiguous() for k, v in model.state_dict().items()})


SMOOTH_GPTQ = {"type": "quantize", "scheme": "int8", "targets": {"components": ["language"]},
               "activations": {"calibration": "minmax"}, "weights": {"rounding": "gptq"},
               "smoothquant": {"alpha": 0.5}, "keep_float": {"budget": 0.1}}


@pytest.mark.parametrize("raw", [
    SMOOTH_GPTQ,
    {"type": "quantize", "scheme": "int4", "targets": {"components": ["language"]},
     "int4": {"group_size": 32, "rounding": "awq"}},
    {"type": "prune", "method": "sparsegpt", "pattern": "2:4", "targets": {"components": ["language"]}},
], ids=["int8-smoothquant-gptq-keep-float", "int4-awq", "sparsegpt-2-4"])
def test_spilling_every_activation_to_disk_changes_no_weight(raw, tmp_path):
    model, adapter, batches = _batches("llava")
    other = copy.deepcopy(model)
    held = _stage(model, adapter, batches, tmp_path / "memory", raw)
    spilled = _stage(other, adapter, batches, tmp_path / "disk", raw, activation_budget=0)
    assert spilled.details["sequential"]["spilled_bytes"] > 0 and held.details["sequential"]["spilled_bytes"] == 0
    assert _state(held.model) == _state(spilled.model)
    held.details.pop("sequential"), spilled.details.pop("sequential")
    assert held.details == spilled.details


def test_pruning_walk_equals_the_group_by_group_passes_of_the_whole_model(tmp_path):
    """SparseGPT pruned one decoder layer per whole-model pass with later layers seeing the pruned ones: the
    walk with compressed inputs is that algorithm, one block pass instead of one model pass per layer."""
    from compress.prune.sparsity import prune_linears

    model, adapter, batches = _batches("llava")
    whole = copy.deepcopy(model)
    mods = select_modules(whole, adapter, Targets(components=["language"]), kinds=(torch.nn.Linear,))
    prune_linears(whole, mods, "sparsegpt", 0.5, "unstructured", _whole_model_loop(batches))
    _stage(model, adapter, batches, tmp_path, {"type": "prune", "method": "sparsegpt", "sparsity": 0.5,
                                               "targets": {"components": ["language"]}}, layer_inputs="compressed")
    assert _state(model) == _state(whole)


def test_keep_float_is_chosen_over_the_whole_model_and_inputs_can_be_original(tmp_path):
    model, adapter, batches = _batches("llava")
    other = copy.deepcopy(model)
    a = _stage(model, adapter, batches, tmp_path / "c", SMOOTH_GPTQ, layer_inputs="compressed").details
    b = _stage(other, adapter, batches, tmp_path / "o", SMOOTH_GPTQ).details
    assert a["kept_float"] and a["kept_float"] == b["kept_float"]  # chosen before anything was quantized
    assert a["sequential"]["layer_inputs"] == "compressed" and b["sequential"]["layer_inputs"] == "original"
    late = [n for n in a["modules"] if ".layers.1." in n and n not in a["kept_float"]]
    assert any(a["modules"][n]["input_scale"] != b["modules"][n]["input_scale"] for n in late)


def test_a_stage_that_calibrates_without_data_says_so(tmp_path):
    model, adapter, _ = _batches("llava")
    with pytest.raises(ConfigError, match="needs a 'calibration' data section"):
        _stage(model, adapter, None, tmp_path, SMOOTH_GPTQ)


@pytest.mark.parametrize("family,raw", [
    ("llava", SMOOTH_GPTQ),
    ("qwen2_5_vl", {**SMOOTH_GPTQ, "targets": {"components": ["vision", "projector", "language", "lm_head"]}}),
    ("mllama", {"type": "quantize", "scheme": "int4", "targets": {"components": ["language"]},
                "int4": {"group_size": 32, "rounding": "awq"}}),
    ("llava", {"type": "prune", "method": "sparsegpt", "pattern": "2:4",
               "targets": {"components": ["vision", "language"]}}),
], ids=["llava-int8-smoothquant-gptq-keep-float", "qwen2_5_vl-int8-all", "mllama-int4-awq", "llava-sparsegpt"])
def test_units_restored_from_saved_progress_equal_computed_ones(family, raw, tmp_path):
    """A stage killed after some units resumes from its journal: the finished units are put back (INT8 / INT4
    layers rebuilt, tensors loaded), the rest computed on the inputs an uninterrupted walk gives them; weights
    and details are those of the uninterrupted stage. A file from another stage config is not used, and a
    damaged one is recomputed."""
    import shutil

    model, adapter, batches = _batches(family)
    fresh = [copy.deepcopy(model) for _ in range(3)]
    done = _stage(model, adapter, batches, tmp_path / "a", raw, stage_key="k")
    saved = sorted((tmp_path / "a" / "progress").glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)
    assert len(saved) >= 3, saved
    for dest in ("b", "c"):
        shutil.copytree(tmp_path / "a" / "progress", tmp_path / dest / "progress")
        (tmp_path / dest / "progress" / saved[-1].name).unlink()  # the unit a kill left unsaved
    damaged = tmp_path / "b" / "progress" / saved[0].name
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF  # the last byte of the last tensor
    damaged.write_bytes(bytes(data))
    resumed = _stage(fresh[0], adapter, batches, tmp_path / "b", raw, stage_key="k")
    other = _stage(fresh[1], adapter, batches, tmp_path / "c", raw, stage_key="other")
    assert resumed.details["sequential"].get("restored_units") == len(saved) - 2  # damaged + unsaved: computed
    assert "restored_units" not in other.details["sequential"]
    for got in (resumed, other):
        assert _state(got.model) == _state(done.model)
        assert [type(m).__name__ for m in got.model.modules()] == [type(m).__name__ for m in done.model.modules()]
        got.details.pop("sequential")
    done.details.pop("sequential")
    assert resumed.details == done.details and other.details == done.details
