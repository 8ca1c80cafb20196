"""What an export folder needs to run in onnxruntime-genai as it is: `genai_config.json`, and a decoder whose
`logits_index` input is optional.

onnxruntime-genai (`og.Model(folder)`) drives a multimodal folder as vision -> embedding -> decoder with its
own KV cache and search. Its multimodal pipeline hands the vision graph's `image_features` rows to the
embedding graph next to `input_ids` (ours scatters them in-graph, `compress.export.trace.with_image_scatter`),
feeds the decoder our input names already (`inputs_embeds`, `attention_mask`, `position_ids`,
`past_key_values.N.key`), and cannot feed a logits selector: `logits_index` gets an empty default here,
which the graph reads as "every position" (genai then takes the last one itself). Its config parser rejects
unknown keys, so only keys it knows are written; our own facts stay in export.json. Families whose decoder
takes more than embeddings, mask and positions (bidirectional image blocks, cross-attention states), and
windowed Qwen2.5-VL-style towers (their tokens come out in window order), get no genai_config.json, and
`genai_support` says why.

Its model type (the adapter's `ExportSpec.genai_model_type`) chooses the native image processor and the
position scheme: the plain pipeline gives default positions; its Qwen type computes M-RoPE positions from
the image grids, as HF's get_rope_index does. The vision graph is fed through `generator.set_inputs` (pixel
values or patches with their extra inputs, and `num_image_tokens`); its native processors are each one
model's own (fixed tokens and sizes), so prompts are built with the folder's processor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

CONFIG_FILE = "genai_config.json"


def genai_support(meta: dict[str, Any]) -> str | None:
    """None where onnxruntime-genai can run this export folder; otherwise the reason it cannot."""
    if "decoder" not in meta.get("graphs", {}):
        return "the export has no decoder graph"
    if meta.get("cross_attention"):
        return "the decoder reads cross-attention vision states on every call, which genai does not feed"
    if meta.get("attention_blocks"):
        return "the decoder takes bidirectional image blocks (block_sequence_ids), which genai does not feed"
    if meta.get("positions") == "mrope" and (meta.get("vision_inputs") or {}).get("window_size"):
        return ("windowed vision attention: the vision graph emits its tokens in window order and our runner "
                "puts them back in image order; genai hands them on as they come")
    if meta.get("precision") == "fp16":
        return "an engine's fp16 source graphs (build engines, or run the export folder)"
    return None


def optional_logits_index(proto: Any) -> bool:
    """Give the decoder's `logits_index` an empty default that means every position, so a runtime that does not
    know the input (genai) gets full logits and ours still asks for the last position. False: no such input."""
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    if "logits_index" not in {i.name for i in graph.input} or any(
            i.name == "logits_index" for i in graph.initializer):
        return False
    for node in graph.node:
        node.input[:] = ["logits.index" if x == "logits_index" else x for x in node.input]
    graph.initializer.extend([
        numpy_helper.from_array(np.zeros((0,), np.int64), "logits_index"),  # an input with a default (IR >= 4)
        numpy_helper.from_array(np.array(0, np.int64), "logits.zero"),
        numpy_helper.from_array(np.array(1, np.int64), "logits.one"),
    ])
    node = helper.make_node
    # index = logits_index ++ range(seq * (len(logits_index) == 0)): the given positions, or all of them
    head = [
        node("Size", ["logits_index"], ["logits.asked"]),
        node("Equal", ["logits.asked", "logits.zero"], ["logits.none_asked"]),
        node("Cast", ["logits.none_asked"], ["logits.all"], to=TensorProto.INT64),
        node("Shape", ["inputs_embeds"], ["logits.embeds_shape"]),
        node("Gather", ["logits.embeds_shape", "logits.one"], ["logits.seq"], axis=0),
        node("Mul", ["logits.seq", "logits.all"], ["logits.stop"]),
        node("Range", ["logits.zero", "logits.stop", "logits.one"], ["logits.every"]),
        node("Concat", ["logits_index", "logits.every"], ["logits.index"], axis=0),
    ]
    nodes = [*head, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    return True


def _session_options(meta: dict[str, Any]) -> dict[str, Any]:
    """The session settings the export was measured with, as genai's session_options keys (unknown string keys
    go to ONNX Runtime's session config)."""
    session = meta.get("session", {})
    # Errors only: ORT warns at every load that logits_index, an input with a default, is not constant-folded.
    out: dict[str, Any] = {"log_id": "onnxruntime-genai", "log_severity_level": 3, "provider_options": []}
    if session.get("disabled_optimizers"):
        out["optimization.disable_specified_optimizers"] = ",".join(session["disabled_optimizers"])
    out.update({k: str(v) for k, v in session.get("config", {}).items()})
    return out


def genai_config(meta: dict[str, Any], context_length: int, bos_token_id: int | None) -> dict[str, Any]:
    """genai_config.json for an export folder `genai_support` accepts, from its export.json."""
    hidden = int(meta["hidden_size"])
    decoder = {
        "filename": meta["graphs"]["decoder"],
        "hidden_size": hidden,
        "num_attention_heads": int(meta["num_heads"]),
        "num_hidden_layers": int(meta["num_layers"]),
        "num_key_value_heads": int(meta["num_kv_heads"]),
        "head_size": int(meta["head_dim"]),
        "session_options": _session_options(meta),
        "inputs": {"inputs_embeds": "inputs_embeds", "attention_mask": "attention_mask",
                   "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                   "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
    }
    model: dict[str, Any] = {
        "type": meta["genai_model_type"],
        "context_length": int(context_length),
        "vocab_size": int(meta["vocab_size"]),
        "eos_token_id": [int(i) for i in meta["eos_token_ids"]],
        "pad_token_id": int(meta["pad_token_id"]),
        "image_token_id": int(meta["image_token_id"]),
        "decoder": decoder,
        "embedding": {"filename": meta["graphs"]["embed"],
                      "inputs": {"input_ids": "input_ids", "image_features": "image_features"},
                      "outputs": {"inputs_embeds": "inputs_embeds"}},
    }
    if bos_token_id is not None:
        model["bos_token_id"] = int(bos_token_id)
    if "vision" in meta["graphs"]:
        # The HF processor's own processor_config.json sits in the folder: genai's native-processor file is
        # given another name, so neither reader meets the other's file.
        model["vision"] = {"filename": meta["graphs"]["vision"], "config_filename": "ortx_processor_config.json",
                           "inputs": {"pixel_values": "pixel_values"},
                           "outputs": {"image_features": "image_features"}}
    if meta.get("positions") == "mrope":  # genai computes the [3, batch, seq] positions from the image grids
        model.update(meta.get("token_ids", {}))
        spec = meta["vision_inputs"]
        model["vision"].update(spatial_merge_size=int(spec["spatial_merge_size"]), patch_size=int(spec["patch_size"]))
        model["vision"]["inputs"]["image_grid_thw"] = "image_grid_thw"
    search = {"max_length": int(context_length), "do_sample": False, "top_k": 1, "num_beams": 1,
              # GroupQueryAttention reads lengths from the mask: one max-length buffer serves as past and present
              "past_present_share_buffer": meta.get("past_buffer") == "shared"}
    return {"model": model, "search": search}


def write_genai_config(out_dir: str | Path, meta: dict[str, Any], context_length: int,
                       bos_token_id: int | None) -> Path | None:
    """Write (atomically) or remove genai_config.json; the path written, or None where genai cannot run it."""
    path = Path(out_dir) / CONFIG_FILE
    if genai_support(meta) is not None:
        path.unlink(missing_ok=True)
        return None
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(genai_config(meta, context_length, bos_token_id), indent=2) + "\n")
    tmp.replace(path)
    return path
