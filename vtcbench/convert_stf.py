"""`vtcbench convert-stf SRC OUT`: the official LLaVA-STF checkpoint -> a Hugging Face Llava folder
that `vtcbench run/generate --model OUT --method stf` loads.

The source is LLaVA's original layout (github.com/visresearch/LLaVA-STF, `llava_arch.py`,
`clip_encoder.py`, `multimodal_projector/builder.py`): `config.json` with LLaVA's `mm_*` fields,
safetensors shards (with or without an index json) holding `model.embed_tokens`, `model.layers.*`,
`model.norm`, `lm_head`, the CLIP tower under `model.vision_tower.vision_tower.vision_model.*`,
MBTF as `model.mm_projector_crosslayer.{0,2}` and STF as `model.mm_projector.{0,2}`.

The output is the llava-hf layout (the keys `transformers_seam.hub_layout_state_dict` writes), with
`vtcbench_projector` in config.json and the MBTF layers as `vision_feature_layer`
(`[mm_vision_select_layer, 21, 18, 15, 12, 9, 6, 3]`, the official `feature_select`). Like
transformers' own LLaVA conversion, `<image>` becomes a new token id (the old vocabulary size), its
embedding and LM-head rows the mean of the existing ones. Shards are converted one by one (a 7B
checkpoint never sits in memory twice) into `OUT.partial`, renamed to OUT at the end.

Images follow the source's `image_aspect_ratio`: with `pad` (LLaVA-STF's setting) LLaVA's
`expand2square` pads each image to a square of its long side, centred, in the image mean's colour,
before CLIP's resize and centre crop. The converted folder records it as
`vtcbench_image_aspect_ratio` in config.json, and its processor does the padding itself
(transformers' `LlavaImageProcessor` with `do_pad`, the same centred paste and colour), so every
path that encodes images for the model (`vtcbench run`, `generate`, plain transformers) pads.

Differences: the CLIP tower's config is read from its weights (width, depth, patch, image size;
heads = width / 64, as every OpenAI CLIP ViT has). AnyRes (`image_aspect_ratio: anyres`) is refused.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from vtcbench.errors import VtcbenchError
from vtcbench.families import family_of
from vtcbench.families import llava as llava_family
from vtcbench.methods.stf import PAPER_FEATURE_LAYERS

TOWER = "model.vision_tower.vision_tower.vision_model."
MBTF = "model.mm_projector_crosslayer."
STF = "model.mm_projector."
#: (official prefix, llava-hf prefix); first match wins
KEY_MAP: tuple[tuple[str, str], ...] = (
    (TOWER, llava_family.HUB_TOWER),
    (MBTF, f"{llava_family.HUB_PROJECTOR}mbtf."),
    (STF, f"{llava_family.HUB_PROJECTOR}stf."),
    ("model.", llava_family.HUB_LANGUAGE_MODEL),
    ("lm_head.", llava_family.HUB_LM_HEAD),
)
TEXT_FIELDS = (
    "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
    "rms_norm_eps", "max_position_embeddings", "rope_theta", "bos_token_id", "eos_token_id", "hidden_act",
)


def _shards(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        return [src / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return sorted(src.glob("*.safetensors"))


def _keys_and_shapes(shards: list[Path]) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open handles are not mappings)
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


def check_source(src: Path) -> tuple[dict[str, Any], list[Path], dict[str, tuple[int, ...]]]:
    """Refuse (one line, nothing written) a folder that is not an official LLaVA-STF checkpoint."""
    if not (src / "config.json").is_file():
        raise VtcbenchError(f"{src} is not a LLaVA-STF checkpoint: no config.json")
    llava = json.loads((src / "config.json").read_text())
    if "mm_vision_tower" not in llava:
        raise VtcbenchError(f"{src} is not a LLaVA-STF checkpoint: its config.json has no mm_vision_tower (LLaVA's original layout)")
    shards = _shards(src)
    if not shards:
        raise VtcbenchError(f"{src} is not a LLaVA-STF checkpoint: no safetensors weights")
    shapes = _keys_and_shapes(shards)
    needed = [f"{MBTF}0.weight", f"{MBTF}2.weight", f"{STF}0.weight", f"{STF}2.weight", f"{TOWER}embeddings.patch_embedding.weight"]
    missing = [key for key in needed if key not in shapes]
    if missing:
        raise VtcbenchError(f"{src} is not a LLaVA-STF checkpoint: it lacks {missing[0]} (MBTF + STF projector and CLIP tower expected)")
    return llava, shards, shapes


def tower_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """CLIP tower configuration from its weights' shapes."""
    width, _, patch, _ = shapes[f"{TOWER}embeddings.patch_embedding.weight"]
    positions = shapes[f"{TOWER}embeddings.position_embedding.weight"][0]
    depth = 1 + max(int(key[len(TOWER) :].split(".")[2]) for key in shapes if key.startswith(f"{TOWER}encoder.layers."))
    return {
        "model_type": "clip_vision_model",
        "hidden_size": width,
        "intermediate_size": shapes[f"{TOWER}encoder.layers.0.mlp.fc1.weight"][0],
        "num_hidden_layers": depth,
        "num_attention_heads": max(1, width // 64),
        "patch_size": patch,
        "image_size": patch * math.isqrt(positions - 1),
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 768,
    }


def hf_config(llava: dict[str, Any], shapes: dict[str, tuple[int, ...]]):
    """The llava-hf config of the converted model (STF projector marked, MBTF layers as feature layers)."""
    vision = tower_config(shapes)
    width, depth = vision["hidden_size"], vision["num_hidden_layers"]
    layers = [llava.get("mm_vision_select_layer", -2), *PAPER_FEATURE_LAYERS[1:]]
    if depth <= max(layers) or shapes[f"{MBTF}0.weight"][1] != len(layers) * width:
        raise VtcbenchError(
            f"the MBTF weights take {shapes[f'{MBTF}0.weight'][1]} channels from a {depth}-layer tower of width {width}; "
            f"LLaVA-STF reads {len(layers)} hidden states {layers} ({len(layers) * width} channels)"
        )
    if shapes[f"{STF}0.weight"][1] != 4 * width:
        raise VtcbenchError(f"the STF weights take {shapes[f'{STF}0.weight'][1]} channels; LLaVA-STF fuses 2x2 windows ({4 * width})")
    missing = [key for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads") if key not in llava]
    if missing:
        raise VtcbenchError(f"the LLaVA-STF config.json lacks {', '.join(missing)} (the language model's shape)")
    aspect = llava.get("image_aspect_ratio") or "square"  # LLaVA's process_images: pad, anyres*, else none
    if aspect.startswith("anyres"):
        raise VtcbenchError(f"image_aspect_ratio {aspect!r} (LLaVA's AnyRes tiling) is not supported; valid: pad, square")
    vocab = llava["vocab_size"]
    text = {"model_type": "llama", "vocab_size": vocab + 1, **{k: llava[k] for k in TEXT_FIELDS if k in llava}}
    text["pad_token_id"] = llava.get("pad_token_id", 0)
    config = llava_family.converted_config(
        text, vision, image_token=vocab, feature_layers=layers,
        select_strategy="default" if llava.get("mm_vision_select_feature", "patch") == "patch" else "full",
    )
    config.vtcbench_projector = {"type": "stf", "kernel": 2, "fused_tokens": 1}
    config.vtcbench_image_aspect_ratio = "pad" if aspect == "pad" else "square"
    return config


def convert_tensor(key: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """One official weight under its llava-hf key (None: a buffer transformers recomputes)."""
    if key.endswith("rotary_emb.inv_freq"):
        return None
    prefix = next((pair for pair in KEY_MAP if key.startswith(pair[0])), None)
    if prefix is None:
        raise VtcbenchError(f"the LLaVA-STF weight {key!r} has no place in a Llava model")
    if key in ("model.embed_tokens.weight", "lm_head.weight"):  # a row for <image>: the mean, as transformers' conversion
        tensor = torch.cat([tensor, tensor.float().mean(0, keepdim=True).to(tensor.dtype)])
    return prefix[1] + key[len(prefix[0]) :], tensor.contiguous()


def _processor(src: Path, config):
    """LLaVA's tokenizer from the source folder with `<image>` added, or (no tokenizer there) the
    offline one; the family's converted processor (CLIP's preprocessing, padded to a square when
    the source says `image_aspect_ratio: pad`)."""
    from transformers import AutoTokenizer

    from vtcbench.models import build_local_processor

    image_token = family_of(config).image_token_id(config)
    if not any((src / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        tokenizer = build_local_processor(config).tokenizer
    else:
        tokenizer = AutoTokenizer.from_pretrained(src)
        tokenizer.add_special_tokens({"additional_special_tokens": [llava_family.IMAGE_PLACEHOLDER]})
        found = tokenizer.convert_tokens_to_ids(llava_family.IMAGE_PLACEHOLDER)
        if found != image_token:
            raise VtcbenchError(f"the tokenizer in {src} gives {llava_family.IMAGE_PLACEHOLDER} id {found}, not {image_token}")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.unk_token
        tokenizer.padding_side = "left"
    return llava_family.converted_processor(config, tokenizer)


def convert_stf(src: Path, out: Path, *, overwrite: bool = False) -> Path:
    """Convert; every check runs before anything is written."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, out = Path(src), Path(out)
    if out.exists() and not overwrite:
        raise VtcbenchError(f"{out} already exists; pass --overwrite to replace it, or choose another folder")
    llava, shards, shapes = check_source(src)
    config = hf_config(llava, shapes)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    for number, shard in enumerate(shards, 1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        converted: dict[str, torch.Tensor] = {}
        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open handles are not mappings)
                item = convert_tensor(key, handle.get_tensor(key))
                if item is not None:
                    converted[item[0]] = item[1]
        save_file(converted, str(partial / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(converted, name))
    index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
    (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
    config.save_pretrained(partial)
    _processor(src, config).save_pretrained(partial)
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return out
