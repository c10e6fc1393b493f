"""The family seam: no file outside `vtcbench/families/` names a family's modules, config fields
or prompt format (docs/architecture.md#model-families)."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

from vtcbench.families import FAMILIES, MODEL_TYPES, family_of
from vtcbench.models import MODELS, load_config

PACKAGE = Path(__file__).resolve().parent.parent / "vtcbench"

#: what only a family file may name: module paths, config fields, ids and prompt formats of one family
FAMILY_SPECIFIC = re.compile(
    r"multi_modal_projector|image_token_index|rotate_half|vision_start_token_id|deepstack|image_grid_thw"
    r"|\bvision_config\b|\btext_config\b|\binput_layernorm\b|\bq_proj\b|\bk_proj\b|\bq_norm\b|\bk_norm\b"
    r"|vision_feature_layer|\bmodel\.model\b|\.model\.language_model|\.visual\b|\bmerger\b|mrope"
    r"|vicuna_v1_prompt|<\|im_start\|>"
)
#: a family's classes, as code names (the model registry may name hub ids and descriptions)
FAMILY_CLASSES = re.compile(r"^(Llava|Qwen)\w*")

#: files outside families/ that may name one family, and why (none: convert_stf.py reads LLaVA's
#: original layout, but writes the llava-hf one through `families/llava.py`)
EXEMPT: set[str] = set()


def _code_tokens(source: str) -> list[tuple[int, int, str]]:
    """(line, type, text) of every token that is code or a non-docstring string: comments and
    docstrings explain, so they may name a family."""
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docstrings.add(first.lineno)
    tokens = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT or (token.type == tokenize.STRING and token.start[0] in docstrings):
            continue
        tokens.append((token.start[0], token.type, token.string))
    return tokens


def _offends(kind: int, text: str) -> bool:
    return bool(FAMILY_SPECIFIC.search(text) or (kind == tokenize.NAME and FAMILY_CLASSES.match(text)))


def test_no_family_specific_names_outside_families():
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "families" or str(relative) in EXEMPT:
            continue
        for line, kind, text in _code_tokens(path.read_text()):
            if _offends(kind, text):
                offences.append(f"vtcbench/{relative}:{line}: {text}")
    assert not offences, "family-specific names outside vtcbench/families/:\n" + "\n".join(offences)


def test_the_grep_finds_a_family_name_in_code_but_not_in_a_docstring():
    source = '"""Uses multi_modal_projector."""\nx = model.multi_modal_projector  # and a comment: image_token_index\ny = LlavaConfig, "Qwen/Qwen2-VL-2B"\n'
    assert [text for _, kind, text in _code_tokens(source) if _offends(kind, text)] == ["multi_modal_projector", "LlavaConfig"]


def test_every_model_type_has_one_family_and_every_alias_a_known_family():
    assert len(MODEL_TYPES) == len(set(MODEL_TYPES))
    for spec in MODELS.values():
        assert spec.family in FAMILIES, spec.alias
        assert family_of(load_config(spec.alias)).name == spec.family, spec.alias


def test_an_unknown_model_type_is_refused_with_the_valid_ones():
    from vtcbench.errors import VtcbenchError

    with pytest.raises(VtcbenchError, match="model family.*llava"):
        family_of("gpt2")
