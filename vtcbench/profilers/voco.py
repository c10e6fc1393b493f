"""`vtcbench profile --method voco`: VoCo-LLaMA's inference cost the way its supplement breaks it
down (sections 2.1-2.2, main paper Table 7), on synthetic inputs.

Two questions about one image, the second answered from the compressed image stored by the
first. Per question, CUDA (GPU) or CPU time of: image encoding (vision tower and projector, timed
by forward hooks), KV-cache load (the stored VoCo entries copied into a fresh cache), and the
transformer forward (the compression pass's language-model part, the text prefill and the decode
steps). The second question has no image encoding and no compression pass: it reuses the cache.

KV storage per image in bf16 for the supplement's three strategies: full caching (every entry
before the VoCo tokens: BOS, the image tokens, separators; what reusing an uncompressed image
needs), VoCo caching (the K VoCo entries), no caching (nothing stored, all recomputed).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from vtcbench.families import family_of, model_facts
from vtcbench.methods.base import Method
from vtcbench.profilers.latency import PhaseTimer
from vtcbench.voco import Row, VocoCache, generate, kv_bytes


class _EncodingHooks:
    """Time the vision tower and the projector as one phase, `image_encoding`."""

    def __init__(self, model: torch.nn.Module, timer: PhaseTimer):
        self.handles = []
        family = family_of(model)
        for module in (family.vision_tower(model), family.projector(model)):
            self.handles.append(module.register_forward_pre_hook(lambda *_: timer.start("image_encoding")))
            self.handles.append(module.register_forward_hook(lambda *_: timer.stop("image_encoding")))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _prompt(model: torch.nn.Module, voco_id: int, voco_tokens: int, text_tokens: int, seed: int) -> torch.Tensor:
    """BOS, the image placeholders, K VoCo tokens, `text_tokens` random text ids."""
    config = model.config
    image_token = family_of(model).image_token_id(config)
    generator = torch.Generator().manual_seed(seed)
    reserved = torch.tensor([image_token, config.pad_token_id or 0, voco_id])
    text = torch.randint(10, model_facts(model).vocab_size, (text_tokens * 2,), generator=generator)
    text = text[~torch.isin(text, reserved)][:text_tokens]
    n_image = model_facts(model).image_tokens
    return torch.cat([torch.tensor([1]), torch.full((n_image,), image_token), torch.full((voco_tokens,), voco_id), text])


@dataclass(frozen=True)
class VocoProfile:
    """`profile_voco`'s record as `vtcbench profile --method voco` reports it (JSON: `to_dict`)."""

    record: dict

    def to_dict(self) -> dict:
        return self.record


@torch.no_grad()
def profile_voco(
    model: torch.nn.Module, model_name: str, method: Method, *, voco_id: int, text_tokens: int = 64, new_tokens: int = 32,
    iterations: int = 5, warmup: int = 1,
) -> dict:
    """Median milliseconds per phase for the first and the second question, and KV storage bytes."""
    facts = model_facts(model)
    pixels = family_of(model).synthetic_pixels(model.config, 1, torch.Generator().manual_seed(0))["pixel_values"]
    pixels = pixels.to(model.device, model.dtype)
    prompts = [_prompt(model, voco_id, method.voco_tokens, text_tokens, seed).to(model.device) for seed in (1, 2)]
    timer = PhaseTimer(model.device)
    hooks = _EncodingHooks(model, timer)
    samples: list[list[dict[str, float]]] = [[], []]
    try:
        for iteration in range(warmup + iterations):
            store = VocoCache()  # the first question compresses the image, the second reuses it
            for question, ids in enumerate(prompts):
                timer.start("total")
                generate(model, [Row(ids, pixels)], voco_id=voco_id, voco_tokens=method.voco_tokens, store=store,
                         max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=model.config.pad_token_id or 0, timer=timer)
                timer.stop("total")
                phases = {name: sum(spans) for name, spans in timer.read().items()}
                if iteration >= warmup:
                    samples[question].append(_breakdown(phases))
    finally:
        hooks.remove()
    per_entry = kv_bytes(1, facts.n_layers, facts.n_kv_heads, facts.head_dim)
    return {
        "model": model_name,
        "method": method.name,
        "params": method.params(),
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "image_tokens": facts.image_tokens,
        "text_tokens": text_tokens,
        "new_tokens": new_tokens,
        "iterations": iterations,
        "questions": [{key: statistics.median(s[key] for s in question) for key in question[0]} for question in samples],
        "kv_storage_bytes_bf16": {
            "full_caching": (1 + facts.image_tokens) * per_entry,
            "voco_caching": method.voco_tokens * per_entry,
            "no_caching": 0,
        },
    }


def _breakdown(phases: dict[str, float]) -> dict[str, float]:
    encoding = phases.get("image_encoding", 0.0)
    forward = phases.get("compression_pass", 0.0) - encoding + phases["text_prefill"] + phases.get("decode_token", 0.0)
    return {
        "image_encoding_ms": encoding,
        "kv_load_ms": phases["kv_load"],
        "transformer_forward_ms": forward,
        "compression_pass_ms": phases.get("compression_pass", 0.0),
        "text_prefill_ms": phases["text_prefill"],
        "decode_ms": phases.get("decode_token", 0.0),
        "total_ms": phases["total"],
    }
