"""Architecture adapters against real (tiny, random) models of every supported family, loaded from disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from compress.arch import ADAPTERS, adapter_for_source, get_adapter, select_modules, supported
from compress.config import Targets
from compress.errors import ConfigError
from compress.runtime.torch_runner import position_ids
from compress.zoo.tiny import FAMILIES, save_tiny, tiny_model

QUESTIONS = ["what color is it?", "is the shape round or square?"]
ANSWERS = ["red", "a blue square"]


def _images() -> list[Image.Image]:
    # Different sizes and a non-square one, so the processors really resize.
    return [Image.new("RGB", (40, 40), (220, 30, 30)), Image.new("RGB", (36, 28), (30, 30, 220))]


@pytest.fixture(scope="module", params=supported())
def loaded(request, tmp_path_factory):
    """(model_type, adapter, model, processor), loaded from a saved folder like a user's model."""
    model_type = request.param
    path = save_tiny(model_type, tmp_path_factory.mktemp(model_type))
    adapter = adapter_for_source(str(path))
    model, processor = adapter.load(str(path))
    return model_type, adapter, model, processor


def test_every_supported_model_type_has_a_tiny_model():
    missing = sorted(set(supported()) - set(FAMILIES))
    assert not missing, f"registered architectures without a tiny model (so untested): {missing}"
    for cls in ADAPTERS:
        assert set(cls.model_types) <= set(FAMILIES), cls.name


def test_load_from_disk(loaded):
    model_type, adapter, model, processor = loaded
    assert adapter.model_type == model_type
    assert model_type in type(adapter).model_types
    assert model.config.model_type == model_type
    assert not model.training
    assert processor.tokenizer.padding_side == "left"
    assert next(model.parameters()).dtype == torch.float32
    layers = adapter.decoder_layers(model)
    assert len(layers) == model.config.get_text_config().num_hidden_layers
    assert adapter.decoder_layer == type(layers[0]).__name__
    assert adapter.decoder_layer == type(adapter).default_decoder_layers[model_type]


def test_tiny_models_are_seeded_and_round_trip(loaded):
    model_type, _, model, _ = loaded
    fresh, _ = tiny_model(model_type, seed=0)
    saved = model.state_dict()
    assert fresh.state_dict().keys() == saved.keys()
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    other, _ = tiny_model(model_type, seed=1)
    assert not torch.equal(other.state_dict()["lm_head.weight"], saved["lm_head.weight"])
    with pytest.raises(ConfigError, match="no tiny model"):
        tiny_model("bert")


def test_prompt_contains_image_placeholder(loaded):
    _, adapter, model, processor = loaded
    prompt = adapter.format_prompt(processor, "why?")
    assert adapter.image_token in prompt and "why?" in prompt
    # Without a chat template the family default is used; the processor must still expand it.
    template, processor.chat_template = processor.chat_template, None
    try:
        assert adapter.format_prompt(processor, "why?") == type(adapter).default_prompt.format(question="why?")
        batch = adapter.build_inputs(processor, _images(), QUESTIONS, ANSWERS)
    finally:
        processor.chat_template = template
    with torch.no_grad():
        logits = model(**batch.inputs).logits
    assert logits.shape[:2] == batch.inputs["input_ids"].shape


def test_build_inputs_forward_and_answer_positions(loaded):
    _, adapter, model, processor = loaded
    tok = processor.tokenizer
    batch = adapter.build_inputs(processor, _images(), QUESTIONS, ANSWERS)
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 2
    # Left padding: every row ends with real tokens; the shorter row starts with pad.
    assert bool(mask[:, -1].all()) and not bool(mask[0, 0]) and bool(mask[1, 0])
    assert bool((ids[mask == 0] == adapter.pad_token_id(processor)).all())

    positions = batch.answer_positions
    assert positions is not None and positions.shape == ids.shape and positions.dtype == torch.bool
    end = adapter.end_token(processor)
    for row, answer in enumerate(ANSWERS):
        expected = tok(adapter.answer_join + answer + end, add_special_tokens=False)["input_ids"]
        where = positions[row].nonzero().flatten()
        assert len(where) == len(expected)
        assert ids[row, where + 1].tolist() == expected
        assert int(where[-1]) == ids.shape[1] - 2  # the last logit predicts nothing
        assert batch.prompt_lengths[row] + len(expected) == int(mask[row].sum())
    assert ids[:, -1].tolist() == [tok.convert_tokens_to_ids(end)] * 2
    assert set(adapter.eos_token_ids(model, processor)) >= {tok.convert_tokens_to_ids(end)}

    with torch.no_grad():
        logits = model(**batch.inputs, position_ids=position_ids(mask)).logits
        assert logits.shape == (*ids.shape, model.config.get_text_config().vocab_size)
        assert bool(torch.isfinite(logits).all())
        # Padding must not change a row's answer logits: run row 0 (the padded one) alone.
        single = adapter.build_inputs(processor, _images()[:1], QUESTIONS[:1], ANSWERS[:1])
        alone = model(**single.inputs, position_ids=position_ids(single.inputs["attention_mask"])).logits
    torch.testing.assert_close(logits[0][positions[0]], alone[0][single.answer_positions[0]], atol=1e-4, rtol=1e-4)


def test_build_inputs_without_answers(loaded):
    _, adapter, model, processor = loaded
    batch = adapter.build_inputs(processor, _images(), QUESTIONS)
    assert batch.answer_positions is None
    mask = batch.inputs["attention_mask"]
    assert batch.prompt_lengths == mask.sum(-1).tolist()
    assert batch.prompt_lengths[0] < batch.prompt_lengths[1]  # shorter question, same image tokens
    with torch.no_grad():
        logits = model(**batch.inputs, position_ids=position_ids(mask)).logits
    assert logits.shape[:2] == batch.inputs["input_ids"].shape
    with pytest.raises(ValueError):
        adapter.build_inputs(processor, _images(), QUESTIONS[:1])


def test_components_resolve_and_partition_linears(loaded):
    _, adapter, model, _ = loaded
    assert set(adapter.components) == {"vision", "projector", "language", "lm_head"}
    for name in adapter.components:
        assert isinstance(adapter.component(model, name), torch.nn.Module)
    with pytest.raises(ConfigError, match="no component"):
        adapter.component(model, "audio")
    # Every Linear belongs to exactly one component, nested ones (Qwen's merger) to the innermost.
    parts = {c: _linears(model, adapter, c) for c in adapter.components}
    all_linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set().union(*parts.values()) == all_linear
    assert sum(len(p) for p in parts.values()) == len(all_linear)
    assert parts["lm_head"] == {adapter.components["lm_head"]}
    root = adapter.components["projector"]
    if adapter.name == "gemma3":  # its projection is a bare parameter (mm_input_projection_weight), no Linear
        assert not parts["projector"] and hasattr(adapter.component(model, "projector"), "mm_input_projection_weight")
    else:
        assert parts["projector"] and all(n == root or n.startswith(root + ".") for n in parts["projector"])


def _linears(model, adapter, component: str) -> set[str]:
    try:
        return set(select_modules(model, adapter, Targets(components=[component])))
    except ConfigError:  # a component without Linear layers
        return set()


def test_select_modules_include_exclude(loaded):
    _, adapter, model, _ = loaded
    root = adapter.components["language"]
    layers = model.config.get_text_config().num_hidden_layers

    mlp = select_modules(model, adapter, Targets(components=["language"], include=["*.mlp.*"], exclude=["*down_proj"]))
    assert list(mlp) == [f"{root}.layers.{i}.mlp.{p}" for i in range(layers) for p in ("gate_proj", "up_proj")]
    assert all(isinstance(m, torch.nn.Linear) for m in mlp.values())

    # A glob relative to the component root, and order following named_modules().
    first = select_modules(model, adapter, Targets(components=["language"], include=["layers.0.*"]))
    assert list(first) == [
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(f"{root}.layers.0.")
    ]
    assert len(first) == 7  # q, k, v, o, gate, up, down

    both = select_modules(model, adapter, Targets(components=["language", "lm_head"], exclude=["layers.*"]))
    assert list(both) == [adapter.components["lm_head"]]

    with pytest.raises(ConfigError, match=r"language .*no_such_module"):
        select_modules(model, adapter, Targets(components=["language"], include=["no_such_module*"]))
    with pytest.raises(ConfigError, match="projector"):
        select_modules(model, adapter, Targets(components=["projector"], exclude=["*"]))


def test_unknown_architecture_lists_supported():
    with pytest.raises(ConfigError) as info:
        get_adapter("bert")
    message = str(info.value)
    assert "'bert'" in message
    for model_type in supported():
        assert model_type in message
    assert {"llava", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm"} <= set(supported())


def test_adapter_for_source_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"config\.json"):
        adapter_for_source(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match="unsupported architecture 'bert'"):
        adapter_for_source(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "not_a_transformers_model"}))
    with pytest.raises(ConfigError, match="unsupported architecture 'not_a_transformers_model'"):
        adapter_for_source(str(tmp_path))
    with pytest.raises(ConfigError, match="does not exist"):
        adapter_for_source(str(tmp_path / "missing"))


def test_load_rejects_unknown_dtype(tmp_path: Path):
    with pytest.raises(ConfigError, match="dtype"):
        get_adapter("llava").load(str(tmp_path), dtype="float8")
