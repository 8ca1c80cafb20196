"""Deploy lint: settings in an artifact folder that make it slow, wrong or unusable where users run it.

Each rule names the file and key it found, and whether the fix was applied (or why not). Applied when a
run writes an artifact (recorded in the stage's manifest record as `deploy_lint`; `output.deploy_fix:
false` reports without fixing) and by `vlm-compress verify` (report only). The rules:

- `use_cache`: `use_cache: false` in config.json / generation_config.json (often carried over from a
  fine-tuning run that turned it off for gradient checkpointing) makes `generate` recompute the whole
  sequence at every step: minutes instead of seconds. Fixed: set to true.
- `generation_ids`: a generation_config.json without `eos_token_id` or `pad_token_id`: generation never
  stops at the end of an answer, or warns and guesses the pad. Fixed from the model config's ids.
- `chat_template`: no chat template in a folder whose family formats prompts with one: users cannot build
  the prompt the model was scored with. Not fixable here (say which template the run used).
- `image_tokens`: an export whose tower emits fewer tokens per image than the processor expands (a
  `tokens` stage): prompts built by the plain processor do not fit. Not fixable in the processor files.
- `generate_warmup`: a compressed-tensors checkpoint whose quantized layers include the vision side: plain
  `from_pretrained` + `generate` fails until one forward has run (compressed-tensors decompresses in a
  pre-forward hook of the top-level model; transformers' `generate` computes image features before that
  forward). Not fixable in the files without dropping activation quantization; docs/deploy.md.
- `dtypes`: tensors handed from one graph to the next (image features, embeddings, the cache) in different
  dtypes: onnxruntime-genai shares those buffers and refuses the folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compress.artifacts import atomic_write

_HANDOFFS = (("vision", "outputs", "image_features"), ("embed", "inputs", "image_features"),
             ("embed", "outputs", "inputs_embeds"), ("decoder", "inputs", "inputs_embeds"))


def _finding(rule: str, file: str, key: str, detail: str, fixed: bool, why_not: str | None = None) -> dict[str, Any]:
    return {"rule": rule, "file": file, "key": key, "detail": detail, "fixed": fixed,
            **({"not_fixed": why_not} if why_not and not fixed else {})}


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None


def _use_cache(folder: Path, fix: bool) -> list[dict[str, Any]]:
    found = []
    for name in ("config.json", "generation_config.json"):
        doc = _read(folder / name)
        if doc is None:
            continue
        places = [(doc, "use_cache")]
        if isinstance(doc.get("text_config"), dict):  # a VLM config: its language model's own setting
            places.append((doc["text_config"], "text_config.use_cache"))
        hits = [(d, key) for d, key in places if d.get("use_cache") is False]
        for d, key in hits:
            if fix:
                d["use_cache"] = True
            found.append(_finding("use_cache", name, key, "use_cache: false makes generate recompute every "
                                  "token's attention over the whole sequence at each step", fix,
                                  "output.deploy_fix is false"))
        if hits and fix:
            atomic_write(folder / name, json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return found


def _generation_ids(folder: Path, fix: bool) -> list[dict[str, Any]]:
    gen, config = _read(folder / "generation_config.json"), _read(folder / "config.json")
    if gen is None or config is None:
        return []
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    found = []
    for key in ("eos_token_id", "pad_token_id"):
        if gen.get(key) is not None:
            continue
        value = config.get(key, text.get(key))
        fixable = fix and value is not None
        if fixable:
            gen[key] = value
        why = "output.deploy_fix is false" if not fix else f"config.json has no {key} either"
        found.append(_finding("generation_ids", "generation_config.json", key,
                              f"no {key}: generation " + ("does not stop at the end of an answer"
                                                          if key == "eos_token_id" else "guesses the pad token"),
                              fixable, why))
    if any(f["fixed"] for f in found):
        atomic_write(folder / "generation_config.json", json.dumps(gen, indent=2, sort_keys=True) + "\n")
    return found


def _chat_template(folder: Path, model_type: str | None) -> list[dict[str, Any]]:
    from compress.arch import get_adapter

    if model_type is None or not any((folder / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json")):
        return []
    try:
        adapter = get_adapter(model_type)
    except Exception:  # an architecture this toolkit does not know: no expectation to check
        return []
    if adapter.native_prompt:  # the family formats prompts itself (no chat template expected)
        return []
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return []
    if any("chat_template" in (_read(folder / f) or {}) for f in ("tokenizer_config.json", "processor_config.json")):
        return []
    return [_finding("chat_template", "chat_template.jinja", "chat_template",
                     f"no chat template, but {adapter.name} prompts are built with one: users cannot rebuild the "
                     "prompt the run scored (the manifest's 'prompt' shows it)", False,
                     "a template cannot be inferred from the weights")]


def _generate_warmup(folder: Path) -> list[dict[str, Any]]:
    config = _read(folder / "config.json") or {}
    q = config.get("quantization_config") or {}
    if q.get("quant_method") != "compressed-tensors" or q.get("quantization_status") != "compressed":
        return []
    targets = [t for group in (q.get("config_groups") or {}).values() for t in group.get("targets", [])]
    encoder_side = [t for t in targets if "language_model" not in t and "lm_head" not in t]
    if not encoder_side:
        return []
    return [_finding("generate_warmup", "config.json", "quantization_config",
                     f"layers outside the language model are quantized ({len(encoder_side)} targets): plain "
                     "from_pretrained + generate fails until one forward has run (upstream: compressed-tensors "
                     "decompresses in a pre-forward hook of the top-level model, generate computes image features "
                     "before it); run "
                     "model(**inputs) once first", False, "only upstream can fix it without dropping activation "
                     "quantization")]


def _export_rules(folder: Path, meta: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    rec = meta.get("token_reduction")
    if rec:
        found.append(_finding(
            "image_tokens", "export.json", "token_reduction",
            f"the vision graph emits {rec['tokens']} tokens per image, the processor expands {rec['tokens_in']}: "
            "prompts from the plain processor do not fit (OrtRunner and verify cut them; cut each image's "
            f"placeholder run to {rec['tokens']} before onnxruntime-genai's set_inputs)", False,
            "the processor's expansion is computed from the image size, not a setting"))
    io = meta.get("io", {})
    dtypes = {f"{g}.{name}": next((v["dtype"] for v in io.get(g, {}).get(side, []) if v["name"] == name), None)
              for g, side, name in _HANDOFFS}
    dtypes.update({f"decoder.{v['name']}": v["dtype"] for v in io.get("decoder", {}).get("inputs", [])
                   if v["name"].startswith("past_key_values.")})
    seen = {d for d in dtypes.values() if d is not None}
    if len(seen) > 1:
        found.append(_finding("dtypes", "export.json", "io",
                              "tensors handed between graphs differ in dtype: " + ", ".join(
                                  f"{k} {d}" for k, d in sorted(dtypes.items()) if d is not None),
                              False, "re-export in one dtype"))
    return found


def lint_folder(folder: str | Path, fix: bool = False) -> list[dict[str, Any]]:
    """The findings for one artifact folder (a checkpoint or an export); fixes applied where `fix`."""
    folder = Path(folder)
    config, meta = _read(folder / "config.json"), _read(folder / "export.json")
    model_type = (config or {}).get("model_type") or (meta or {}).get("model_type")
    found = (_use_cache(folder, fix) + _generation_ids(folder, fix) + _chat_template(folder, model_type)
             + _generate_warmup(folder))
    if meta is not None:
        found += _export_rules(folder, meta)
    return found


def describe(finding: dict[str, Any]) -> str:
    state = "fixed" if finding["fixed"] else f"not fixed: {finding.get('not_fixed', '')}"
    return f"{finding['rule']}: {finding['file']}:{finding['key']}: {finding['detail']} ({state})"
