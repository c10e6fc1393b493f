"""vtc-tiny's CLIP: the text tower and the last tower layer that LLaVA's CLIP brings and that
`vtcbench train` cannot make, trained contrastively against vtc-tiny's own tower.

LLaVA-1.5's tower is a CLIP vision model read at layer -2: its last layer and its text tower were
trained by CLIP's contrastive objective and are never trained by LLaVA. Two methods read them:
PruMerge+ takes CLS's attention and the keys of the layer after the projector's feature layer,
CDPruner embeds the question with the text tower and the feature layer's patches with the
tower's `post_layernorm` and CLIP's `visual_projection`. vtc-tiny was trained from scratch with
its projector on its tower's last layer, so it has neither. This module makes both as locked-image
tuning does (LiT, Zhai et al., CVPR 2022): vtc-tiny's tower is frozen, and one new tower layer,
`post_layernorm`, `visual_projection`, a small text tower with its `text_projection` and the
logit scale are trained with CLIP's symmetric contrastive loss (`CLIPModel(return_loss=True)`)
on vtcshapes scenes and captions that list their objects in raster order and name the letter.
The result is written twice: a `CLIPModel` checkpoint (the `--set clip=` CDPruner loads) and the
LLaVA model with the new layer and `post_layernorm` in its tower, read at layer -2 as LLaVA-1.5
reads CLIP's, so its projector sees exactly the features it was trained on.

Run: vtcbench train-clip FOLDER --out-model DIR --out-clip DIR [--steps N]
(FOLDER: what `vtcbench train --model vtc-tiny` wrote)
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vtcbench import shapes
from vtcbench.errors import VtcbenchError
from vtcbench.families import family_of, model_facts
from vtcbench.families.llava import clip_tokenizer
from vtcbench.models import MODELS, load_model
from vtcbench.training import held_out_split, pixels, vocabulary
from vtcbench.transformers_seam import save_checkpoint

#: the text tower: small beside the vision tower (96 wide), as CLIP's is beside ViT-L
TEXT_TOWER = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77)
PROJECTION_DIM = 64
CAPTION_WORDS = ("and", ",")


def caption(scene: shapes.Scene) -> str:
    """`a red circle , a blue square and the letter T`: the objects in raster order, then the letter."""
    objects = [f"a {colour} {shape}" for _, colour, shape in sorted(scene.objects)]
    return f"{' , '.join(objects)} and the letter {scene.letter}"


def scenes(rng: np.random.Generator, n: int, exclude: set[str]) -> list[shapes.Scene]:
    """`n` fresh scenes (3-6 objects of any colours), none whose key is in `exclude`."""
    out: list[shapes.Scene] = []
    while len(out) < n:
        scene = shapes.random_scene(rng)
        if scene.key() not in exclude:
            out.append(scene)
    return out


def build(llava: nn.Module, words: tuple[str, ...], seed: int) -> tuple[Any, Any]:
    """(CLIPModel, tokenizer): the vision model is `llava`'s tower (copied, frozen) with one new
    layer after it; everything else at CLIP's initialisation."""
    tokenizer = clip_tokenizer(words)
    text = dict(TEXT_TOWER, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        clip = family_of(llava).clip_with_tower(llava, text, PROJECTION_DIM)
    return clip, tokenizer


@torch.no_grad()
def retrieval(clip: nn.Module, tokenizer: Any, held_out: list[shapes.Scene], group: int = 100) -> dict[str, float]:
    """Top-1 accuracy of each held-out image finding its caption among `group` (and back)."""
    clip.eval()
    hits = {"image_to_text": 0, "text_to_image": 0}
    for start in range(0, len(held_out) - group + 1, group):
        chunk = held_out[start : start + group]
        text = tokenizer([caption(s) for s in chunk], padding=True, return_tensors="pt")
        logits = clip(input_ids=text.input_ids, attention_mask=text.attention_mask, pixel_values=pixels(chunk)).logits_per_image
        truth = torch.arange(len(chunk))
        hits["image_to_text"] += int((logits.argmax(dim=1) == truth).sum())
        hits["text_to_image"] += int((logits.argmax(dim=0) == truth).sum())
    clip.train()
    total = len(held_out) // group * group
    return {key: value / total for key, value in hits.items()}


def train(llava: nn.Module, words: tuple[str, ...], steps: int, batch_size: int, lr: float, seed: int,
          log_every: int = 100, progress: Callable[[dict], None] | None = None) -> tuple[Any, Any, dict]:
    """Contrastive training of everything but `llava`'s tower; returns (CLIPModel, tokenizer, record).
    `progress` gets each logged step ({step, loss, seconds})."""
    clip, tokenizer = build(llava, words, seed)
    clip.train()
    trainable = [p for p in clip.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.98), weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    held_out = list(dict.fromkeys(s.scene for s in held_out_split()))
    exclude = {s.key() for s in held_out}
    rng = np.random.default_rng([seed, 2])
    torch.manual_seed(seed)
    log, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        batch = scenes(rng, batch_size, exclude)
        text = tokenizer([caption(s) for s in batch], padding=True, return_tensors="pt")
        loss = clip(input_ids=text.input_ids, attention_mask=text.attention_mask, pixel_values=pixels(batch), return_loss=True).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % log_every == 0 or step == steps:
            log.append({"step": step, "loss": round(loss.item(), 4), "seconds": round(time.perf_counter() - start, 1)})
            if progress is not None:
                progress(log[-1])
    record = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "seconds": time.perf_counter() - start,
              "threads": torch.get_num_threads(), "held_out_scenes": len(held_out),
              "retrieval_top1_of_100": retrieval(clip, tokenizer, held_out), "log": log}
    return clip.eval(), tokenizer, record


def write_clip_half(model: str, out_model: Path, out_clip: Path, *, steps: int = 1000, batch_size: int = 128,
                    lr: float = 1e-3, seed: int = 0, progress: Callable[[dict], None] | None = None) -> dict:
    """Train `model`'s CLIP half and write the model with its new layer to `out_model` and the
    `CLIPModel` to `out_clip`, each through `<folder>.partial` (an interrupted run leaves neither
    half-written); every check runs first. Returns the training record."""
    out_model, out_clip = Path(out_model), Path(out_clip)
    for out in (out_model, out_clip):
        if out.exists():
            raise VtcbenchError(f"{out} already exists; choose another folder")
    llava, _ = load_model(model)
    family = family_of(llava)
    after = family.tower_layers_after_feature(llava.config)
    if after:
        raise VtcbenchError(f"{model}: its projector reads the tower {after} layer(s) before its last; this step extends "
                            "a tower read at its last layer, as `vtcbench train` builds it")
    words = (*vocabulary(family.system_prompt(llava.config)), *CAPTION_WORDS)
    clip, tokenizer, record = train(llava, words, steps, batch_size, lr, seed, progress=progress)
    record["command"] = f"vtcbench train-clip --steps {steps} --batch-size {batch_size} --lr {lr:g} --seed {seed}"
    family.attach_clip_layer(llava, clip)
    partial_model, partial_clip = (out.with_name(out.name + ".partial") for out in (out_model, out_clip))
    for partial in (partial_model, partial_clip):
        shutil.rmtree(partial, ignore_errors=True)
    clip.save_pretrained(partial_clip)
    tokenizer.save_pretrained(partial_clip)
    (partial_clip / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    (partial_clip / "README.md").write_text(f"# vtc-tiny-clip: the CLIP of vtc-tiny's tower\n{card_section(record, llava)}")
    save_checkpoint(llava, partial_model)  # the hub's layout, as `vtcbench train` writes it
    source = Path(model) if Path(model).is_dir() else Path(MODELS[model].source)
    for file in source.iterdir():  # the processor, training record and card as they were
        if file.name not in ("config.json", "model.safetensors"):
            shutil.copyfile(file, partial_model / file.name)
    card = partial_model / "README.md"
    card.write_text((card.read_text() if card.is_file() else "") + card_section(record, llava))
    partial_clip.rename(out_clip)
    partial_model.rename(out_model)
    return record


def card_section(record: dict, llava: nn.Module) -> str:
    layers = model_facts(llava).vision_n_layers
    found = record["retrieval_top1_of_100"]
    return f"""
## Its CLIP half: a last tower layer and a text tower (`vtc-tiny-clip`)
- The tower has a layer {layers} and a trained `post_layernorm` after the {layers - 1} layers above, and the
  projector reads layer -2, the same features as before: LLaVA-1.5 reads CLIP's layer -2 and keeps
  CLIP's last layer, which PruMerge+ reads. CDPruner's text tower is the shipped CLIP checkpoint
  `vtc-tiny-clip` (`--set clip=vtc-tiny-clip`), whose vision model is this tower.
- Trained after the model, with the {layers - 1} layers frozen (locked-image tuning, LiT): the new
  layer, `post_layernorm`, `visual_projection` and a {TEXT_TOWER['num_hidden_layers']}-layer text tower (hidden
  {TEXT_TOWER['hidden_size']}) with CLIP's contrastive loss on vtcshapes scenes and captions listing their objects in raster
  order and the letter (held-out scenes excluded), by `{record['command']}`:
  {record['seconds'] / 60:.1f} min on {record['threads']} CPU threads.
- Held-out retrieval, top-1 among 100 ({record['held_out_scenes']} scenes): image to caption {100 * found['image_to_text']:.1f}%,
  caption to image {100 * found['text_to_image']:.1f}%.
- With the new layer the model has {sum(p.numel() for p in llava.parameters()) / 1e6:.2f}M parameters.
"""

