"""STF / TokenConcat: the projector math, the official checkpoint's conversion, trained-weight
refusals, training round trips, and STF's FLOPs figures (calflops' convention)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from vtcbench.cli import app
from vtcbench.convert_stf import check_source, convert_stf, hf_config
from vtcbench.engine import compress
from vtcbench.errors import VtcbenchError
from vtcbench.families.llava import converted_image_processor, image_processor_classes
from vtcbench.methods import METHODS, get_method
from vtcbench.methods.stf import PAPER_FEATURE_LAYERS, default_feature_layers
from vtcbench.models import build_local_processor, load_config, load_model, random_model
from vtcbench.projectors import install_projector, unfold_tokens
from vtcbench.training import TrainConfig, train
from vtcbench.transformers_seam import save_checkpoint

runner = CliRunner()
gelu = torch.nn.functional.gelu


def windows_by_hand(x: torch.Tensor) -> torch.Tensor:
    """[images, n, c] -> [images, n/4, 4c], channel c*4 + dy*2 + dx, windows in raster order."""
    images, n, c = x.shape
    side = int(n**0.5)
    grid = x.reshape(images, side, side, c)
    corners = torch.stack([grid[:, 0::2, 0::2], grid[:, 0::2, 1::2], grid[:, 1::2, 0::2], grid[:, 1::2, 1::2]], dim=-1)
    return corners.reshape(images, n // 4, 4 * c)


def test_unfold_uses_the_official_channel_order():
    x = torch.arange(2 * 16 * 3, dtype=torch.float32).reshape(2, 16, 3)
    assert torch.equal(unfold_tokens(x, 2), windows_by_hand(x))
    # token 0 of image 0: cells (0,0), (0,1), (1,0), (1,1) = rows 0, 1, 4, 5; channel c first
    assert unfold_tokens(x, 2)[0, 0].tolist() == [0, 3, 12, 15, 1, 4, 13, 16, 2, 5, 14, 17]
    assert torch.equal(unfold_tokens(x, 2, 2), windows_by_hand(x).reshape(2, 8, 6))  # E = 2: consecutive halves
    assert torch.equal(unfold_tokens(x, 1), x)


def test_feature_layer_rule_gives_the_paper_list_for_24_layers_and_scales_down():
    assert default_feature_layers(24, -2) == PAPER_FEATURE_LAYERS
    assert default_feature_layers(12, -2) == (-2, 10, 8, 6, 4, 2)  # every 2nd of 12, as every 3rd of 24
    assert default_feature_layers(3, -1) == (-1, 2, 1)  # vtc-tiny as trained: all three layers
    assert default_feature_layers(4, -2) == (-2, 2, 1)  # the shipped vtc-tiny (its CLIP layer 4 after): the same three
    assert default_feature_layers(2, -2) == (-2,)  # the tiny test tower: -2 is hidden state 1, the only other one


# -- the official checkpoint ----------------------------------------------------------------------------

VOCAB, WIDTH, DEPTH, TEXT = 40, 32, 24, 64


def _official_parts(seed: int = 0):
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=TEXT, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )).eval()
    clip = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=WIDTH, intermediate_size=48, num_hidden_layers=DEPTH, num_attention_heads=1, image_size=56,
        patch_size=7, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )).eval()
    projector = {
        "model.mm_projector_crosslayer.0.weight": torch.randn(4 * WIDTH, 8 * WIDTH) * 0.05,
        "model.mm_projector_crosslayer.0.bias": torch.randn(4 * WIDTH) * 0.05,
        "model.mm_projector_crosslayer.2.weight": torch.randn(WIDTH, 4 * WIDTH) * 0.05,
        "model.mm_projector_crosslayer.2.bias": torch.randn(WIDTH) * 0.05,
        "model.mm_projector.0.weight": torch.randn(16 * WIDTH, 4 * WIDTH) * 0.05,
        "model.mm_projector.0.bias": torch.randn(16 * WIDTH) * 0.05,
        "model.mm_projector.2.weight": torch.randn(TEXT, 16 * WIDTH) * 0.05,
        "model.mm_projector.2.bias": torch.randn(TEXT) * 0.05,
    }
    return llama, clip, projector


def write_official(folder, llama, clip, projector) -> None:
    """LLaVA's original layout in two shards with an index, and LLaVA's config.json."""
    folder.mkdir()
    # CLIPVisionModel's own keys lose `vision_model.` in transformers 5.23+; LLaVA's checkpoints have it
    tower = {f"model.vision_tower.vision_tower.vision_model.{k.removeprefix('vision_model.')}": v for k, v in clip.state_dict().items()}
    language = {k: v for k, v in llama.state_dict().items()}
    shards = {"model-00001-of-00002.safetensors": language, "model-00002-of-00002.safetensors": {**tower, **projector}}
    weight_map = {}
    for name, tensors in shards.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / name))
        weight_map.update(dict.fromkeys(tensors, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    text = llama.config
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "vocab_size": VOCAB,
        "hidden_size": TEXT, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": text.rms_norm_eps, "max_position_embeddings": 256,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "mm_hidden_size": WIDTH, "mm_projector_type": "mlp2x_gelu",
        "image_aspect_ratio": "pad", "mm_patch_merge_type": "flat",
    }))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("stf")
    parts = _official_parts()
    write_official(root / "official", *parts)
    out = convert_stf(root / "official", root / "converted")
    return parts, out


def projector_by_hand(clip, projector: dict, pixel_values: torch.Tensor) -> torch.Tensor:
    """The official `encode_images`, written out: hidden states -2, 21, ..., 3 without CLS, MBTF,
    2x2 windows, STF."""
    hidden = clip(pixel_values, output_hidden_states=True).hidden_states
    features = torch.cat([hidden[i][:, 1:] for i in (-2, 21, 18, 15, 12, 9, 6, 3)], dim=-1)
    w = {k.split("model.")[1]: v for k, v in projector.items()}
    mbtf = gelu(features @ w["mm_projector_crosslayer.0.weight"].T + w["mm_projector_crosslayer.0.bias"])
    mbtf = mbtf @ w["mm_projector_crosslayer.2.weight"].T + w["mm_projector_crosslayer.2.bias"]
    fused = gelu(windows_by_hand(mbtf) @ w["mm_projector.0.weight"].T + w["mm_projector.0.bias"])
    return fused @ w["mm_projector.2.weight"].T + w["mm_projector.2.bias"]


@torch.no_grad()
def test_converted_checkpoint_equals_the_official_computation(converted):
    (llama, clip, projector), out = converted
    model, processor = load_model(str(out))
    config = model.config
    assert config.vtcbench_projector == {"type": "stf", "kernel": 2, "fused_tokens": 1}
    assert list(config.vision_feature_layer) == list(PAPER_FEATURE_LAYERS)
    assert config.image_token_index == VOCAB and config.text_config.vocab_size == VOCAB + 1
    pixel_values = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    expected = projector_by_hand(clip, projector, pixel_values)  # [2, 16, TEXT]
    from vtcbench.transformers_seam import image_features

    got = torch.stack(image_features(model.model, pixel_values, vision_feature_layer=config.vision_feature_layer,
                                     vision_feature_select_strategy="default"))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    # the full model: the prompt carries 16 image tokens (64 patches / 4); logits equal LLaMA on
    # embeddings assembled by hand (image features in the image positions)
    ids = torch.tensor([[1, 7, 8, *[VOCAB] * 16, 9, 10, 11]] * 2)
    logits = model(input_ids=ids, pixel_values=pixel_values).logits
    embeds = llama.model.embed_tokens(ids.clamp(max=VOCAB - 1))
    embeds[:, 3:19] = expected
    reference = llama(inputs_embeds=embeds).logits
    torch.testing.assert_close(logits[..., :VOCAB], reference, rtol=1e-4, atol=1e-4)
    # <image>'s new embedding and LM-head rows are the mean of the old ones
    torch.testing.assert_close(model.get_input_embeddings().weight[VOCAB], llama.model.embed_tokens.weight.mean(0))
    torch.testing.assert_close(model.lm_head.weight[VOCAB], llama.lm_head.weight.mean(0))
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == VOCAB


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """LLaVA's `llava/mm_utils.py` `expand2square`: paste centred on a square of the long side."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


@torch.no_grad()
def test_converted_processor_pads_to_a_square_as_llava_stf_does(converted):
    """The source says image_aspect_ratio: pad, so a non-square image becomes expand2square's square
    (image-mean background), then CLIP's processor, not a centre crop."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    _, out = converted
    model, processor = load_model(str(out))
    assert model.config.vtcbench_image_aspect_ratio == "pad"
    clip_cls, _ = image_processor_classes()
    clip = clip_cls(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                    image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD), do_convert_rgb=True)
    background = tuple(int(x * 255) for x in clip.image_mean)
    noise = torch.randint(0, 256, (30, 80, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    wide = Image.fromarray(noise.numpy())
    for picture in (wide, wide.transpose(Image.Transpose.TRANSPOSE)):
        got = processor(images=[picture], text=["<image>\nWhat is it?"], return_tensors="pt")["pixel_values"]
        expected = clip(images=[expand2square(picture, background)], return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        assert not torch.allclose(got, clip(images=[picture], return_tensors="pt")["pixel_values"], atol=1e-2)
    get_method("stf").check_loaded(model, processor)
    with pytest.raises(VtcbenchError, match="processor does not"):  # a processor that would centre-crop
        get_method("stf").check_loaded(model, build_local_processor(model.config))


def test_the_source_image_aspect_ratio_decides_the_padding(tmp_path):
    write_official(tmp_path / "official", *_official_parts())
    llava, _, shapes = check_source(tmp_path / "official")
    for aspect, pads in (("pad", True), ("square", False), (None, False)):
        config = hf_config({**llava, "image_aspect_ratio": aspect}, shapes)
        assert converted_image_processor(config).do_pad is pads, aspect
    with pytest.raises(VtcbenchError, match="'anyres' .* valid: pad, square"):
        hf_config({**llava, "image_aspect_ratio": "anyres"}, shapes)


def test_converted_folder_runs_stf_through_the_cli(converted):
    _, out = converted
    result = runner.invoke(app, ["generate", "--model", str(out), "--method", "stf", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert "16x2" in result.output  # 16 visual tokens in each of the 2 decoder layers


def test_conversion_refuses_a_folder_that_is_not_llava_stf(tmp_path):
    plain = tmp_path / "plain"
    save_checkpoint(random_model(load_config("tiny")), plain)
    for src, fragment in ((plain, "no mm_vision_tower"), (tmp_path / "nothing", "no config.json")):
        result = runner.invoke(app, ["convert-stf", str(src), str(tmp_path / "out")])
        assert result.exit_code == 2, result.output
        assert fragment in result.output and len(result.output.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_conversion_refuses_llava_without_the_stf_projector(tmp_path):
    llama, clip, projector = _official_parts()
    del projector["model.mm_projector_crosslayer.0.weight"]
    write_official(tmp_path / "llava", llama, clip, projector)
    with pytest.raises(VtcbenchError, match="lacks model.mm_projector_crosslayer.0.weight"):
        convert_stf(tmp_path / "llava", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- trained-weight marking and refusals ------------------------------------------------------------------


def test_methods_needing_weights_are_marked_and_listed():
    assert {name for name, cls in METHODS.items() if cls.needs_weights} >= {"stf", "tokenconcat"}
    assert METHODS["fastv"].needs_weights is None and METHODS["avgpool"].needs_weights is None
    result = runner.invoke(app, ["methods"])
    assert "needs weights" in result.output


@pytest.mark.parametrize("command", ["run", "generate", "profile"])
@pytest.mark.parametrize("method", ["stf", "tokenconcat"])
def test_a_checkpoint_without_the_projector_is_refused_before_loading(command, method):
    result = runner.invoke(app, [command, "--method", method, "--model", "vtc-tiny"])
    assert result.exit_code == 2, result.output
    assert f"{method} needs a checkpoint with its trained projector" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_trained_projector_runs_only_with_its_method_and_settings(converted):
    _, out = converted
    config = load_config(str(out))
    with pytest.raises(VtcbenchError, match="trained for stf"):
        get_method("fastv").check_model(config)
    with pytest.raises(VtcbenchError, match="needs a checkpoint"):
        get_method("tokenconcat").check_model(config)
    with pytest.raises(VtcbenchError, match="trained with"):
        get_method("stf", kernel=4, fused_tokens=4).check_model(config)
    get_method("stf").check_model(config)


@pytest.mark.parametrize(("name", "params"), [("stf", {}), ("tokenconcat", {}), ("stf", {"fused_tokens": 2})])
@torch.no_grad()
def test_an_installed_projector_saves_and_loads_with_the_same_outputs(tmp_path, name, params):
    method = get_method(name, **params)
    torch.manual_seed(0)
    model = random_model(load_config("tiny"))
    install_projector(model, method)
    assert method.pre_llm_tokens(64) == 16 * method.fused_tokens
    save_checkpoint(model, tmp_path / "m")
    build_local_processor(model.config).save_pretrained(tmp_path / "m")
    loaded, _ = load_model(str(tmp_path / "m"))
    ids = torch.tensor([[1, 7, *[4] * method.pre_llm_tokens(64), 9]])
    pixel_values = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with compress(loaded, method):
        torch.testing.assert_close(loaded(input_ids=ids, pixel_values=pixel_values).logits,
                                   model(input_ids=ids, pixel_values=pixel_values).logits)


@torch.no_grad()
def test_tokenconcat_projector_is_llava_mlp_on_concatenated_windows():
    torch.manual_seed(0)
    model = random_model(load_config("tiny"))
    install_projector(model, get_method("tokenconcat"))
    projector = model.model.multi_modal_projector
    x = torch.randn(2, 64, 32)
    first, second = projector.fuse[0], projector.fuse[2]
    expected = gelu(windows_by_hand(x) @ first.weight.T + first.bias) @ second.weight.T + second.bias
    torch.testing.assert_close(projector(x), expected)


def test_training_stf_writes_a_folder_that_runs_with_stf(tmp_path):
    result = train(TrainConfig(out=tmp_path / "m", steps=2, batch_size=2, test_per_family=1, log_every=1,
                               init="vtc-tiny", method=get_method("stf")))
    assert set(result.accuracy) == {result.log[-1]["method"]}  # no vanilla row: the projector fuses
    config = load_config(str(tmp_path / "m"))
    assert config.vtcbench_projector["type"] == "stf" and list(config.vision_feature_layer) == [-2, 2, 1]
    run = runner.invoke(app, ["generate", "--model", str(tmp_path / "m"), "--method", "stf", "--max-new-tokens", "1"])
    assert run.exit_code == 0 and "16x6" in run.output, run.output


# -- FLOPs ----------------------------------------------------------------------------------------------------


def flops_json(*options: str) -> dict:
    result = runner.invoke(app, ["flops", "--format", "json", "--model", "llava-1.5-7b", *options])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def two_figures(value: float) -> float:
    return float(f"{value:.2g}")


@pytest.mark.parametrize(
    ("options", "tflops", "source"),
    [
        (["--method", "vanilla"], 7.6, "STF Tables 2, 3: LLaVA-1.5"),
        (["--method", "stf", "--set", "kernel=1"], 7.6, "STF Table 3: MBTF; Table 4 k=1 E=1"),
        (["--method", "stf"], 1.9, "STF Tables 2-5: MBTF + STF"),
        (["--method", "avgpool"], 1.9, "STF Table 5"),
        (["--method", "tokenconcat"], 1.9, "STF Table 5"),
        (["--method", "stf", "--set", "fused_tokens=2"], 3.8, "STF Table 4 k=2 E=2"),
        (["--method", "stf", "--set", "kernel=4", "--set", "fused_tokens=4"], 1.9, "STF Table 4"),
        (["--method", "stf", "--set", "kernel=4", "--set", "fused_tokens=8"], 3.8, "STF Table 4"),
        (["--method", "stf", "--set", "kernel=8", "--set", "fused_tokens=16"], 1.9, "STF Table 4"),
        (["--method", "stf", "--set", "kernel=8", "--set", "fused_tokens=32"], 3.8, "STF Table 4"),
    ],
)
def test_stf_tflops_in_calflops_convention(options, tflops, source):
    report = flops_json(*options, "--convention", "flops")
    assert report["convention"] == "flops"
    assert two_figures(report["tflops_image"]) == tflops, source


def test_default_convention_is_macs_with_a_quarter_of_the_image_tokens():
    vanilla, stf = flops_json("--method", "vanilla"), flops_json("--method", "stf")
    assert vanilla["convention"] == stf["convention"] == "macs"
    assert stf["image_tokens_per_layer"] == [144] * 32
    assert two_figures(stf["tflops_image"] / vanilla["tflops_image"]) == 0.25
    doubled = flops_json("--method", "stf", "--convention", "flops")
    for key in ("tflops_image", "tflops_total", "tflops_vision_encoder", "tflops_projector", "tflops_lm_head"):
        assert doubled[key] == pytest.approx(2 * stf[key], rel=1e-12)


def test_the_table_states_its_convention_and_a_bad_one_is_refused():
    assert "multiply-accumulates" in runner.invoke(app, ["flops"]).output
    assert "2 per multiply-accumulate" in runner.invoke(app, ["flops", "--convention", "flops"]).output
    result = runner.invoke(app, ["flops", "--convention", "gflops"])
    assert result.exit_code == 2 and "valid choices: flops, macs" in result.output


def test_the_projector_figure_counts_the_trained_projector():
    c, d = 1024, 4096  # LLaVA-1.5-7B: MBTF on 576 patches from 8 layers, STF on 144 windows
    assert flops_json("--method", "stf")["tflops_projector"] * 1e12 == pytest.approx(
        576 * (8 * c * 4 * c + 4 * c * c) + 144 * (4 * c * 16 * c + 16 * c * d), rel=1e-12
    )
    assert flops_json("--method", "tokenconcat")["tflops_projector"] * 1e12 == pytest.approx(144 * (4 * c * d + d * d), rel=1e-12)
    assert flops_json("--method", "vanilla")["tflops_projector"] * 1e12 == pytest.approx(576 * (c * d + d * d), rel=1e-12)
