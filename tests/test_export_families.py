"""Family facts live on the adapters, not in the exporter: `compress/export/` names no family.

A new family should be one adapter file (with its `export_spec`) and a row in the test matrix; a family
name compared inside the exporter would silently leave the new family on some other family's path.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from torch import nn

from compress.arch import ADAPTERS, get_adapter
from compress.arch.export_spec import ExportSpec

EXPORT = Path(__file__).resolve().parents[1] / "compress" / "export"
FAMILY_NAMES = {n.lower() for cls in ADAPTERS for n in (cls.name, *cls.model_types)}


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring constants (module, class, function), which may say which family code serves."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def family_strings(source: str) -> list[str]:
    """String constants in code (not docstrings) holding a family name as a word, in any case."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            words = set(re.findall(r"[a-z0-9_]+", node.value.lower()))
            if words & FAMILY_NAMES:
                hits.append(f"line {node.lineno}: {node.value!r}")
    return hits


def test_the_exporter_names_no_family():
    found = {path.name: hits for path in sorted(EXPORT.glob("*.py")) if (hits := family_strings(path.read_text()))}
    assert found == {}


def test_the_scan_sees_family_names_in_code_but_not_in_docstrings():
    source = '"""Serves LLaVA and Gemma3."""\ndef f(family):\n    """For Mllama."""\n    return family == "Qwen2_VL"\n'
    assert family_strings(source) == ["line 4: 'Qwen2_VL'"]
    assert family_strings('x = f"{y} is not smolvlm"\n') == ["line 1: ' is not smolvlm'"]


@pytest.mark.parametrize("cls", ADAPTERS, ids=lambda cls: cls.name)
def test_every_family_declares_what_export_needs(cls):
    spec = cls.export_spec
    assert isinstance(spec, ExportSpec)
    adapter = get_adapter(cls.model_types[0])
    if spec.attention_blocks is None:  # only families with blocks build block masks
        with pytest.raises(Exception, match="no bidirectional attention blocks"):
            adapter.block_masks(None)
    if not spec.cross_attention:
        with pytest.raises(Exception, match="no cross-attention layers"):
            adapter.cross_attention_tokens(nn.Module())


def test_a_decoder_takes_blocks_or_cross_attention_not_both():
    with pytest.raises(ValueError, match="not both"):
        ExportSpec(vision="image_features", attention_blocks="prefix", cross_attention=True)
    assert not ExportSpec(vision="flat_patches").fixed_image_tokens
    assert ExportSpec(vision="image_features").fixed_image_tokens
