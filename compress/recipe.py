"""The recipe: YAML in, strict pydantic models out, every error pointing at a field and a line.

Loading does everything that can be checked without a model: schema, value ranges, ordering
rules between stages, duplicate keys and names. Nothing is written and nothing heavy is loaded.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, field_validator, model_validator

from compress.config import StageConfig, Strict
from compress.data.config import CalibrationConfig, DataConfig
from compress.errors import RecipeError
from compress.search.config import SearchConfig
from compress.stages.catalog import stages as registered_stages

Metric = Literal["exact_match", "token_agreement", "logit_kl"]


class ModelConfig(Strict):
    source: str = Field(min_length=1, description="`zoo:shapes-vqa` (bundled), a local folder with config.json + "
                        "safetensors, or a hub id (needs the hub or its local cache)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights dtype at load")
    trust_remote_code: bool = Field(False, description="run the model repository's own Python code; only for "
                                                       "models you trust")


class ExtractConfig(Strict):
    """Answer post-processing before exact match: the text after the last `after_last`, or a regex match
    (its first group if it has one). Applied to predictions and references alike; a string without a
    match is compared whole."""

    after_last: str | None = Field(None, min_length=1, description="keep the text after the last occurrence")
    regex: str | None = Field(None, min_length=1, description="keep the first match (its first group if any)")

    @model_validator(mode="after")
    def _one_rule(self) -> ExtractConfig:
        if (self.after_last is None) == (self.regex is None):
            raise ValueError("extract needs exactly one of 'after_last' or 'regex'")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"regex does not compile: {exc}") from None
        return self

    def __call__(self, text: str) -> str:
        if self.after_last is not None:
            _, sep, tail = text.rpartition(self.after_last)
            return tail if sep else text
        m = re.search(self.regex, text)  # type: ignore[arg-type]
        return (m.group(1) if m.groups() else m.group(0)) if m else text


class EvaluationConfig(DataConfig):
    max_new_tokens: int | None = Field(None, ge=1, le=512, description="greedy answer length limit (default: "
                                       "the longest reference answer in tokens + 4, so no answer is cut)")
    metrics: list[Metric] = Field(default_factory=lambda: ["exact_match", "token_agreement", "logit_kl"],
                                  description="what is measured after every stage (see Metrics above)")
    prompt: str | None = Field(None, description="prompt template with {question}, written with the model's "
                                                 "image token; overrides the chat template (also for calibration "
                                                 "and exports)")
    extract: ExtractConfig | None = Field(None, description="answer post-processing before exact match")

    @field_validator("prompt")
    @classmethod
    def _prompt_template(cls, prompt: str | None) -> str | None:
        if prompt is not None:
            fields = [f for _, f, _, _ in string.Formatter().parse(prompt) if f is not None]
            if fields != ["question"]:
                raise ValueError("must contain {question} exactly once and no other {...} field "
                                 f"(found {fields or 'none'}); write literal braces as {{{{ }}}}")
        return prompt


class OutputConfig(Strict):
    dir: str | None = Field(None, description="run folder; `--out` overrides it; one of the two is required")
    checkpoints: Literal["all", "last"] = Field("all", description="keep every kept stage's checkpoint, or only "
                                                                   "the latest (enough to resume)")
    max_shard_gb: float = Field(2.0, gt=0.0, description="largest safetensors shard a streamed run writes (its "
                                                         "checkpoints are written block by block, never assembled)")
    report: bool = Field(True, description="write report.md and retention.png")
    deploy_fix: bool = Field(True, description="apply the deploy lint's fixes to every written artifact "
                             "(use_cache: false -> true, missing eos/pad ids in generation_config.json); false: "
                             "record the findings and leave the files as the model gave them")


class ResourcesConfig(Strict):
    max_memory_gb: float | None = Field(None, gt=0.0, description="memory the run plans against: calibration "
                                        "activations beyond what the model leaves of it spill to the stage's work "
                                        "folder (default: the memory available when the run starts)")


class RecipeBase(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="shown in the report")
    seed: int = Field(0, description="seeds Python, NumPy and torch before any work")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch and ONNX Runtime (default: "
                                                         "torch's default); `run --threads` overrides it")
    model: ModelConfig = Field(description="what to compress")
    calibration: CalibrationConfig | None = Field(None, description="image + prompt batches for stages that "
                                                  "calibrate (static INT8 activations, SmoothQuant, GPTQ, AWQ, "
                                                  "Wanda, SparseGPT, keep_float, activation importance)")
    resources: ResourcesConfig = Field(ResourcesConfig(), description="what the run may use")
    evaluation: EvaluationConfig = Field(description="the held-out set every check is scored on")
    output: OutputConfig = Field(OutputConfig(), description="where and what to keep")
    search: SearchConfig | None = Field(None, description="`vlm-compress search`: which fields vary and what "
                                        "the winner minimizes (`run` ignores it and runs the recipe as written)")


@cache
def recipe_model() -> type[RecipeBase]:
    """The Recipe class, with `stages` a union over every registered stage config."""
    configs = tuple(spec.config for _, spec in sorted(registered_stages().items()))  # stable schema order
    union = Annotated[Union[configs], Field(discriminator="type")]  # noqa: UP007 (built at run time)
    return create_model(
        "Recipe",
        __base__=RecipeBase,
        stages=(list[union], Field(min_length=1, description="run in order, each gated")),  # type: ignore[valid-type]
    )


class LoadedRecipe(BaseModel):
    """A validated recipe plus where it came from."""

    recipe: Any
    path: Path
    text: str

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def resolved(self) -> dict[str, Any]:
        return self.recipe.model_dump(mode="json")

    def sha256(self) -> str:
        """Hash of the resolved recipe (defaults filled), so formatting changes do not matter; `threads` and
        `resources` change speed and memory, not results, so they are left out (a run may resume with others)."""
        resolved = {k: v for k, v in self.resolved().items() if k not in ("threads", "resources")}
        blob = json.dumps(resolved, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


# ---------------------------------------------------------------------------------------------
# YAML with line numbers


class _Loader(yaml.SafeLoader):
    pass


def _compose(text: str, path: Path) -> yaml.Node:
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise RecipeError(f"{where}: not valid YAML: {problem}") from None
    if node is None:
        raise RecipeError(f"{path}:1: the recipe is empty")
    _check_duplicates(node, path, ())
    return node


def _check_duplicates(node: yaml.Node, path: Path, loc: tuple) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            name = key.value
            if name in seen:
                raise RecipeError(f"{path}:{key.start_mark.line + 1}: {_fmt_loc((*loc, name))}: duplicate "
                                  f"key (first given on line {seen[name]})")
            seen[name] = key.start_mark.line + 1
            _check_duplicates(value, path, (*loc, name))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicates(item, path, (*loc, i))


def _node_at(root: yaml.Node, loc: tuple) -> tuple[yaml.Node, bool]:
    """The deepest node along `loc`, and whether the whole path was found.

    Pydantic puts the discriminator tag into the location of union members
    (`stages.0.prune.sparsity`); such items match no YAML key and are skipped.
    """
    node, found = root, True
    for item in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == item), None)
            if match is None:
                if isinstance(item, str) and item in registered_stages():
                    continue
                return (match[0] if match else node), False
            _key, value = match
            node = value
        elif isinstance(node, yaml.SequenceNode) and isinstance(item, int) and item < len(node.value):
            node = node.value[item]
        else:
            found = False
            break
    return node, found


def _key_node(root: yaml.Node, loc: tuple) -> yaml.Node | None:
    """The key node of the last item of `loc` (for 'extra field' errors the key is the culprit)."""
    parent, _ = _node_at(root, loc[:-1])
    if isinstance(parent, yaml.MappingNode):
        for k, _v in parent.value:
            if k.value == loc[-1]:
                return k
    return None


def _fmt_loc(loc: tuple) -> str:
    out = ""
    for item in loc:
        if isinstance(item, int):
            out += f"[{item}]"
        elif item in registered_stages():
            continue
        else:
            out += f".{item}" if out else str(item)
    return out or "(recipe)"


def _clean_loc(loc: tuple) -> tuple:
    """Drop pydantic's internal location parts: union tags and member names ("ActivationsConfig",
    "literal['none']"). Recipe field names are all lower-case, so capitalised parts are never fields."""
    return tuple(x for x in loc if not (isinstance(x, str) and (
        x in registered_stages() or "[" in x or x[:1].isupper())))


def _message(err: dict) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return "unknown field (check the spelling; see docs/recipes.md)"
    if kind == "missing":
        return "required field is missing"
    if kind == "union_tag_invalid":
        expected = ", ".join(sorted(registered_stages()))
        return f"unknown stage type {err['input'].get('type')!r}; known types: {expected}"
    if kind == "union_tag_not_found":
        return "each stage needs a 'type' (one of: " + ", ".join(sorted(registered_stages())) + ")"
    msg = msg.removeprefix("Value error, ")
    if "input" in err and not isinstance(err["input"], dict | list) and kind not in ("missing",):
        msg += f" (got {err['input']!r})"
    return msg


def _format_errors(e: ValidationError, root: yaml.Node, path: Path) -> str:
    errors = [(err, _clean_loc(tuple(err["loc"]))) for err in e.errors(include_url=False)]
    # A union reports every member's complaint; where one member got further into the value,
    # only its (deeper) errors say what is wrong.
    deeper = {loc[:i] for _, loc in errors for i in range(len(loc))}
    lines = []
    for err, loc in errors:
        if loc in deeper:
            continue
        if err["type"] == "extra_forbidden":
            node = _key_node(root, loc) or _node_at(root, loc)[0]
        else:
            node, _ = _node_at(root, loc)
        lines.append(f"{path}:{node.start_mark.line + 1}: {_fmt_loc(loc)}: {_message(err)}")
    return "\n".join(dict.fromkeys(lines))


def _check_order(recipe: Any, root: yaml.Node, path: Path) -> None:
    """Each stage declares which model states it accepts; walk the states in recipe order."""
    state, prev = "float", None
    names: dict[str, int] = {}
    for i, stage in enumerate(recipe.stages):
        node, _ = _node_at(root, ("stages", i))
        where = f"{path}:{node.start_mark.line + 1}: stages[{i}]"
        if state not in stage.accepts:
            after = f"after a '{prev}' stage " if prev else ""
            raise RecipeError(f"{where}: a '{stage.type}' stage cannot run {after}(model is {state}); "
                              f"it needs {stage.requirement}")
        name = stage.name or f"{i:02d}-{stage.type}"
        if name in names:
            raise RecipeError(f"{where}.name: stage name {name!r} is already used by stages[{names[name]}]")
        names[name] = i
        if getattr(stage, "needs_calibration", False) and recipe.calibration is None:
            raise RecipeError(f"{where}: a '{stage.type}' stage needs a 'calibration' section")
        conflict = stage.check_after(recipe.stages[:i])
        if conflict:
            raise RecipeError(f"{where}: {conflict}")
        measured = set(recipe.evaluation.metrics)
        gate_line = _node_at(root, ("stages", i, "gate"))[0].start_mark.line + 1
        if stage.gate.min_retention is not None and stage.gate.metric not in measured:
            raise RecipeError(f"{path}:{gate_line}: stages[{i}].gate.metric: {stage.gate.metric!r} is not "
                              f"measured; add it to evaluation.metrics {sorted(measured)}")
        if stage.gate.max_kl is not None and "logit_kl" not in measured:
            raise RecipeError(f"{path}:{gate_line}: stages[{i}].gate.max_kl: needs 'logit_kl' in "
                              "evaluation.metrics")
        state, prev = stage.output_state(state), stage.type


def parse_recipe(text: str, path: Path) -> LoadedRecipe:
    root = _compose(text, path)
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise RecipeError(f"{path}:1: the recipe must be a mapping with model, evaluation and stages")
    try:
        recipe = recipe_model().model_validate(data)
    except ValidationError as e:
        raise RecipeError(_format_errors(e, root, path)) from None
    _check_order(recipe, root, path)
    if recipe.search is not None:
        from compress.search.space import check_space

        lines = {k: n.start_mark.line + 1 for k in recipe.search.space
                 if (n := _key_node(root, ("search", "space", k))) is not None}
        check_space(recipe.search, data, path, _key_node(root, ("search",)).start_mark.line + 1, lines,
                    lambda text: parse_recipe(text, path))
    return LoadedRecipe(recipe=recipe, path=path.resolve(), text=text)


def load_recipe(path: str | Path) -> LoadedRecipe:
    """Read and validate a recipe file; raises RecipeError with file:line on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: cannot read recipe: {e}") from None
    return parse_recipe(text, path)


def stage_name(stage: StageConfig, index: int) -> str:
    return stage.name or f"{index:02d}-{stage.type}"

