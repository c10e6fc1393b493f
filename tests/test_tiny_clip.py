"""vtc-tiny's CLIP half (`vtcbench train-clip`): training builds the tower the language model's
losses reach, the CLIP step adds the rest without changing what the projector sees, and the
shipped model and CLIP checkpoint agree with each other."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from vtcbench import tiny_clip
from vtcbench.cli import app
from vtcbench.families import family_of
from vtcbench.families.llava import SHIPPED_CLIPS
from vtcbench.models import build_local_processor, load_config, load_model, random_model
from vtcbench.training import (
    TrainConfig,
    held_out_split,
    pixels,
    trained_config,
    vocabulary,
)


def test_training_from_scratch_builds_the_tower_up_to_the_projectors_layer():
    shipped = load_config("vtc-tiny")
    assert (shipped.vision_config.num_hidden_layers, shipped.vision_feature_layer) == (4, -2)
    built = trained_config(TrainConfig(out="unused"))
    assert (built.vision_config.num_hidden_layers, built.vision_feature_layer) == (3, -1)
    # fine-tuning from weights keeps every layer they have
    kept = trained_config(TrainConfig(out="unused", init="vtc-tiny"))
    assert kept.vision_config.num_hidden_layers == 4


def tower_state(model) -> dict[str, torch.Tensor]:
    return family_of(model).clip_transformer(model).state_dict()


@pytest.fixture(scope="module")
def extended(tmp_path_factory):
    """A random-weight vtc-tiny as `vtcbench train` builds it, then 3 steps of the CLIP step."""
    root = tmp_path_factory.mktemp("tiny-clip")
    config = trained_config(TrainConfig(out="unused"))
    model = random_model(config, seed=1)
    model.save_pretrained(root / "lm")
    build_local_processor(config, vocabulary("")).save_pretrained(root / "lm")
    result = CliRunner().invoke(app, ["train-clip", str(root / "lm"), "--out-model", str(root / "model"),
                                      "--out-clip", str(root / "clip"), "--steps", "3", "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    return root


def test_the_clip_step_keeps_the_features_the_projector_reads(extended):
    before, _ = load_model(str(extended / "lm"))
    after, _ = load_model(str(extended / "model"))
    assert after.config.vision_config.num_hidden_layers == 4 and after.config.vision_feature_layer == -2
    images = pixels([s.scene for s in held_out_split(2)])
    with torch.no_grad():
        features = [family_of(model).vision_tower(model)(images, output_hidden_states=True).hidden_states[model.config.vision_feature_layer]
                    for model in (before, after)]
    assert torch.equal(*features)


def test_the_clip_checkpoint_holds_the_models_tower_and_records_its_training(extended):
    from transformers import CLIPModel

    model, _ = load_model(str(extended / "model"))
    clip = CLIPModel.from_pretrained(extended / "clip")
    tower = tower_state(model)
    assert tower.keys() == clip.vision_model.state_dict().keys()
    assert all(torch.equal(value, clip.vision_model.state_dict()[key]) for key, value in tower.items())
    record = json.loads((extended / "clip" / "training.json").read_text())
    assert record["steps"] == 3 and 0 <= record["retrieval_top1_of_100"]["image_to_text"] <= 1
    assert "vtcbench train-clip --steps 3 --batch-size 8" in (extended / "model" / "README.md").read_text()
    assert not list(extended.glob("*.partial"))


@pytest.mark.parametrize("bad", ["read at -2", "existing out"])
def test_the_clip_step_refuses_in_one_line_before_writing(extended, tmp_path, bad):
    model, out_model = (extended / "model", tmp_path / "m") if bad == "read at -2" else (extended / "lm", extended / "clip")
    result = CliRunner().invoke(app, ["train-clip", str(model), "--out-model", str(out_model), "--out-clip", str(tmp_path / "c")])
    assert result.exit_code == 2
    (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert ("reads the tower 1 layer(s) before its last" if bad == "read at -2" else "already exists") in line
    assert not (tmp_path / "m").exists() and not (tmp_path / "c").exists()


def test_a_caption_lists_the_objects_in_raster_order_and_the_letter():
    scene = held_out_split(1)[0].scene
    text = tiny_clip.caption(scene)
    assert text.endswith(f"and the letter {scene.letter}")
    assert text.split(" , ")[0] == "a {} {}".format(*min(scene.objects)[1:])


def test_the_shipped_vtc_tiny_and_its_clip_share_the_tower():
    from transformers import CLIPModel

    model, _ = load_model("vtc-tiny")
    clip = CLIPModel.from_pretrained(SHIPPED_CLIPS["vtc-tiny-clip"])
    tower = tower_state(model)
    assert all(torch.equal(value, clip.vision_model.state_dict()[key]) for key, value in tower.items())


@pytest.mark.parametrize("method", [["prumerge_plus"], ["cdpruner", "--set", "tokens=16", "--set", "clip=vtc-tiny-clip"]])
def test_prumerge_plus_and_cdpruner_run_on_the_shipped_vtc_tiny(method):
    result = CliRunner().invoke(app, ["generate", "--model", "vtc-tiny", "--method", *method])
    assert result.exit_code == 0, result.output
