"""Methods: hyperparameter parsing and validation, and the analytic per-layer plans."""

from __future__ import annotations

import re

import pytest

from vtcbench.errors import VtcbenchError
from vtcbench.methods import METHODS, get_method, parse_set_options
from vtcbench.methods.kinds import KINDS


def test_every_method_documents_itself():
    for name, cls in METHODS.items():
        assert cls.description, name
        assert cls.kind in KINDS


# A paper section, table or equation; an official code file or repository; or an explicit "none".
SECTION = re.compile(r"\b(Sec\.|[Ss]ections?\b|Table\b|Eq\.)|§")
CODE = re.compile(r"\b[\w/.-]+\.py\b|`[\w.-]+/[\w.-]+`|github\.com/[\w.-]+/[\w.-]+")
NO_CODE = re.compile(r"\bNo official code\b", re.IGNORECASE)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_class_cites_its_source(name):
    """A dataclass without a docstring gets a generated one (`Name(field: type = ...)`), so the
    docstring must be written by hand and, but for vanilla, name the paper's section and the
    official code (or say there is none)."""
    cls = METHODS[name]
    doc = cls.__doc__ or ""
    assert doc.strip() and not doc.startswith(f"{cls.__name__}("), f"{name}: no hand-written class docstring"
    if name == "vanilla":
        return
    assert SECTION.search(doc), f"{name}: the class docstring names no paper section, table or equation"
    assert CODE.search(doc) or NO_CODE.search(doc), f"{name}: the class docstring names no official code"


def test_defaults_follow_the_design_table():
    assert get_method("fastv").params() == {"layer": 2, "drop_ratio": 0.5}
    assert get_method("pdrop").params() == {"layers": (), "keep_ratio": 0.5}
    assert get_method("pdrop").stage_layers(32) == (8, 16, 24)  # the paper's setting
    assert get_method("pdrop").stage_layers(6) == (1, 3, 4)
    assert get_method("vico").params() == {"stages": 4, "keep_ratio": 0.5}
    assert get_method("llavolta").params() == {"layer": 2, "stride": 8}
    assert get_method("random").params() == {"layer": 2, "drop_ratio": 0.5, "seed": 0}
    assert get_method("kmeans").params()["clusters"] == 72
    assert get_method("avgpool").params() == {"kernel": 2}
    assert get_method("voco").params() == {"voco_tokens": 2}
    # dvlab-research/VisionZip README.md: `model = visionzip(model, dominant=54, contextual=10)` (LLaVA-1.5, 64 tokens)
    assert get_method("visionzip").params() == {"dominant": 54, "contextual": 10}
    # ZichenWen1/DART scripts/v1_5/eval/textvqa.sh: --pruned_layer 2 --pivot_image_token 4 --pivot_text_token 4,
    # and the README's `bash scripts/v1_5/eval/textvqa.sh 0.778 128` (max_num_trunction 128)
    assert get_method("dart").params() == {"layer": 2, "pivot_image_tokens": 4, "pivot_text_tokens": 4, "truncation": 128}
    # Theia-4869/VisPruner README.md: `bash scripts/v1_5/eval/mme.sh 64 0.75` ("48 important tokens and 16
    # diverse tokens"); its argparse default (model_vqa_loader.py: --visual_token_num 576) prunes nothing
    assert get_method("vispruner").params() == {"tokens": 64, "important_ratio": 0.75}
    # Gumpest/SparseVLMs score.py: RETAIN_TOKN = int(os.getenv("RETAIN_TOKN", "192")), and its v2.0 table
    assert get_method("sparsevlm").params() == {"tokens": 192}
    from vtcbench.methods.sparsevlm import COUNTS, HEADS, LAYERS
    assert COUNTS == {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)}
    assert LAYERS == (2, 6, 15) and HEADS == 14  # modelling_sparse_llama.py pruning_loc; score.py topk(14)
    # vbdi/divprune run_Divprune.sh: SUBSET_RATIO=0.098
    assert get_method("divprune").params() == {"ratio": 0.098}
    # Theia-4869/CDPruner README.md: `bash scripts/v1_5/eval/mme.sh 64` (--visual_token_num; its argparse default 576
    # prunes nothing); clip_encoder.py load_text_tower reads the text tower from the vision tower's own checkpoint
    assert get_method("cdpruner").params() == {"tokens": 64, "clip": "openai/clip-vit-large-patch14-336"}
    # 42Shawn/LLaVA-PruMerge clip_encoder.py: forward calls token_prune_merge_advanced_plus(images, if_adaptive=True),
    # whose count comes from the image; its k=int(32) neighbours
    from vtcbench.methods.prumerge_plus import NEIGHBOURS
    assert get_method("prumerge_plus").params() == {} and NEIGHBOURS == 32


@pytest.mark.parametrize(
    ("name", "params", "expected"),
    [
        ("vanilla", {}, [576] * 32),
        ("fastv", {}, [576] * 2 + [288] * 30),
        ("pdrop", {}, [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8),
        ("pdrop", {"keep_ratio": 0.4}, [576] * 8 + [230] * 8 + [92] * 8 + [36] * 8),
        ("vico", {"stages": 3}, [576] * 10 + [288] * 10 + [144] * 12),
        ("vico", {}, [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8),
        ("llavolta", {}, [576] * 2 + [72] * 30),
        ("llavolta", {"layer": 16, "stride": 2}, [576] * 16 + [288] * 16),
        ("random", {"drop_ratio": 0.25}, [576] * 2 + [432] * 30),
        ("kmeans", {}, [576] * 2 + [72] * 30),
        ("avgpool", {}, [144] * 32),
    ],
)
def test_image_tokens_per_layer_on_llava_1_5(name, params, expected):
    assert get_method(name, **params).image_tokens_per_layer(576, 32) == expected


@pytest.mark.parametrize(
    ("layer", "stride", "total", "cr_percent"),
    [(2, 8, 3312, 557), (2, 2, 9792, 188), (16, 8, 10368, 178), (16, 2, 13824, 133)],
)
def test_llavolta_visual_token_totals_match_table_5(layer, stride, total, cr_percent):
    """LLaVolta Table 5: visual tokens summed over layers, CR = N*L / total (none: 18432)."""
    per_layer = get_method("llavolta", layer=layer, stride=stride).image_tokens_per_layer(576, 32)
    assert sum(per_layer) == total
    assert round(100 * 32 * 576 / total) == cr_percent


def test_set_options_are_typed_from_the_dataclass_fields():
    params = parse_set_options(["layers=8,16", "keep_ratio=0.4"])
    method = get_method("pdrop", **params)
    assert method.layers == (8, 16) and method.keep_ratio == 0.4


@pytest.mark.parametrize(
    ("name", "params", "fragment"),
    [
        ("nosuch", {}, "valid choices: avgpool, cdpruner, dart, divprune, fastv"),
        ("fastv", {"ratio": "0.5"}, "valid: layer, drop_ratio"),
        ("fastv", {"drop_ratio": "1.0"}, "valid range: [0, 1)"),
        ("fastv", {"drop_ratio": "-0.1"}, "drop_ratio=-0.1"),
        ("fastv", {"layer": "two"}, "layer='two' is not a valid int"),
        ("pdrop", {"keep_ratio": "0"}, "valid range: (0, 1]"),
        ("pdrop", {"layers": "16,8"}, "strictly increasing"),
        ("llavolta", {"stride": "0"}, "integer >= 1"),
        ("vanilla", {"layer": "2"}, "no hyperparameters"),
    ],
)
def test_bad_hyperparameters_name_the_value_and_the_valid_choices(name, params, fragment):
    with pytest.raises(VtcbenchError, match=None) as error:
        get_method(name, **params)
    assert fragment in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("name", "params", "fragment"),
    [
        ("fastv", {"layer": 32}, "valid range: 1..31"),
        ("fastv", {"layer": 0}, "valid range: 1..31"),
        ("pdrop", {"layers": (8, 40)}, "layers=40"),
        ("llavolta", {"stride": 7}, "valid strides: 1, 2, 3, 4, 6, 8, 9"),
        ("kmeans", {"clusters": 600}, "valid range: 1..576"),
        ("avgpool", {"kernel": 5}, "valid kernels: 1, 2, 3, 4, 6, 8, 12, 24"),
        ("vico", {"stages": 33}, "valid range: 1..32"),
    ],
)
def test_model_dependent_ranges_are_checked(name, params, fragment):
    with pytest.raises(VtcbenchError) as error:
        get_method(name, **params).validate_for(576, 32)
    assert fragment in str(error.value)


def test_set_option_without_equals_sign_is_rejected():
    with pytest.raises(VtcbenchError, match="key=value"):
        parse_set_options(["layer2"])
