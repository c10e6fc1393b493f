"""Model registry and offline-safe loading; what differs per architecture lives in `vtcbench/families/`.

Why this module exists:
- Benchmarks must run (and FLOPs must be computable) without network access, so every alias ships its
  hub ``config.json`` in ``vtcbench/model_configs/``; only real weights ever touch the hub.
- ``--random-weights`` builds the real architecture from that config with a fixed seed, which makes
  latency/FLOPs/mechanics tests reproducible on machines that never downloaded 14 GB of weights.
- When no tokenizer is cached, ``build_local_processor`` makes a small word-level tokenizer whose
  ``<image>`` id equals the config's ``image_token_id``, so the processor → model path is the real one
  (same placeholder expansion, same masks), just with a toy vocabulary.
- Code elsewhere must not depend on where transformers puts the decoder this year: ask the model's
  family (`vtcbench.families.family_of`) instead of following attribute chains or offsets.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vtcbench.errors import VtcbenchError, choices_error
from vtcbench.families import family_of

CONFIG_DIR = Path(__file__).parent / "model_configs"
WEIGHTS_DIR = Path(__file__).parent / "weights"  # weights shipped in the package, one folder per alias

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
ATTN_IMPLEMENTATIONS: tuple[str, ...] = ("eager", "sdpa", "flash_attention_2")


@dataclass(frozen=True)
class ModelSpec:
    """A named model: where its weights live and which shipped config describes it."""

    alias: str
    hub_id: str | None  # None: no pretrained weights exist (random weights only)
    config_file: str  # file name inside vtcbench/model_configs/
    family: str  # a key of vtcbench.families.FAMILIES
    description: str
    packaged: bool = False  # weights ship in WEIGHTS_DIR/<alias> (no hub)
    toy: bool = False  # a random-weight model of its family for tests (the family test matrix runs each)

    @property
    def weights_present(self) -> bool:
        """Whether a packaged model's weights are in the package (a source checkout may lack them)."""
        return (WEIGHTS_DIR / self.alias / "model.safetensors").is_file()

    @property
    def source(self) -> str | None:
        """Where real weights load from: the hub id, the packaged folder, or None."""
        return str(WEIGHTS_DIR / self.alias) if self.packaged else self.hub_id


MODELS: dict[str, ModelSpec] = {
    spec.alias: spec
    for spec in (
        ModelSpec("llava-1.5-7b", "llava-hf/llava-1.5-7b-hf", "llava-1.5-7b-hf.json", "llava",
                  "LLaVA-1.5 7B: CLIP ViT-L/14-336 + Vicuna-7B, 576 image tokens"),
        ModelSpec("llava-1.5-13b", "llava-hf/llava-1.5-13b-hf", "llava-1.5-13b-hf.json", "llava",
                  "LLaVA-1.5 13B: CLIP ViT-L/14-336 + Vicuna-13B, 576 image tokens"),
        ModelSpec("llava-next-7b", "llava-hf/llava-v1.6-vicuna-7b-hf", "llava-v1.6-vicuna-7b-hf.json", "llava_next",
                  "LLaVA-NeXT (v1.6) Vicuna-7B: AnyRes up to 4+1 crops of 576 tokens"),
        ModelSpec("qwen2-vl-2b", "Qwen/Qwen2-VL-2B-Instruct", "Qwen2-VL-2B-Instruct.json", "qwen2_vl",
                  "Qwen2-VL 2B Instruct: native-resolution ViT + 2x2 patch merging, Qwen2 decoder with M-RoPE"),
        ModelSpec("qwen2-vl-7b", "Qwen/Qwen2-VL-7B-Instruct", "Qwen2-VL-7B-Instruct.json", "qwen2_vl",
                  "Qwen2-VL 7B Instruct: native-resolution ViT + 2x2 patch merging, Qwen2 decoder with M-RoPE"),
        ModelSpec("qwen2.5-vl-3b", "Qwen/Qwen2.5-VL-3B-Instruct", "Qwen2.5-VL-3B-Instruct.json", "qwen2_vl",
                  "Qwen2.5-VL 3B Instruct: windowed-attention ViT + 2x2 patch merging, M-RoPE decoder"),
        ModelSpec("qwen2.5-vl-7b", "Qwen/Qwen2.5-VL-7B-Instruct", "Qwen2.5-VL-7B-Instruct.json", "qwen2_vl",
                  "Qwen2.5-VL 7B Instruct: windowed-attention ViT + 2x2 patch merging, M-RoPE decoder"),
        ModelSpec("qwen2.5-vl-32b", "Qwen/Qwen2.5-VL-32B-Instruct", "Qwen2.5-VL-32B-Instruct.json", "qwen2_vl",
                  "Qwen2.5-VL 32B Instruct: windowed-attention ViT + 2x2 patch merging, M-RoPE decoder"),
        ModelSpec("qwen2.5-vl-72b", "Qwen/Qwen2.5-VL-72B-Instruct", "Qwen2.5-VL-72B-Instruct.json", "qwen2_vl",
                  "Qwen2.5-VL 72B Instruct: windowed-attention ViT + 2x2 patch merging, M-RoPE decoder"),
        ModelSpec("qwen3-vl-4b", "Qwen/Qwen3-VL-4B-Instruct", "Qwen3-VL-4B-Instruct.json", "qwen3_vl",
                  "Qwen3-VL 4B Instruct: ViT with DeepStack features, interleaved M-RoPE, q/k norms"),
        ModelSpec("qwen3-vl-8b", "Qwen/Qwen3-VL-8B-Instruct", "Qwen3-VL-8B-Instruct.json", "qwen3_vl",
                  "Qwen3-VL 8B Instruct: ViT with DeepStack features, interleaved M-RoPE, q/k norms"),
        ModelSpec("vtc-tiny", None, "vtc-tiny.json", "llava",
                  "vtcbench's own LLaVA trained on vtcshapes (4-layer CLIP read at -2, 6-layer LLaMA, 64 image tokens), shipped",
                  packaged=True),
        ModelSpec("vtc-tiny-qwen", None, "vtc-tiny-qwen.json", "qwen2_vl",
                  "vtcbench's own Qwen2.5-VL trained on vtcshapes (3-block windowed ViT, 6-layer M-RoPE decoder, "
                  "64 image tokens at 224 px), shipped", packaged=True),
        ModelSpec("tiny", None, "tiny.json", "llava",
                  "toy LLaVA (2-layer CLIP, 4-layer GQA LLaMA), random weights only, for tests", toy=True),
        ModelSpec("tiny-qwen2-vl", None, "tiny-qwen2-vl.json", "qwen2_vl",
                  "toy Qwen2-VL (2-block ViT, 4-layer M-RoPE decoder), random weights only, for tests", toy=True),
        ModelSpec("tiny-qwen2.5-vl", None, "tiny-qwen2.5-vl.json", "qwen2_vl",
                  "toy Qwen2.5-VL (4-block windowed ViT, 4-layer M-RoPE decoder), random weights only, for tests", toy=True),
        ModelSpec("tiny-qwen3-vl", None, "tiny-qwen3-vl.json", "qwen3_vl",
                  "toy Qwen3-VL (DeepStack on 2 layers, 4-layer decoder), random weights only, for tests", toy=True),
    )
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*$")


# --------------------------------------------------------------------------------------------------
# name resolution and configs
# --------------------------------------------------------------------------------------------------


def resolve_model(name: str) -> ModelSpec | None:
    """Return the ModelSpec for an alias (or for the hub id of an alias), None for a hub id or a local
    folder with a config.json; raise VtcbenchError listing the aliases for anything else.

    Hub ids of known aliases resolve to their spec so they also get the shipped config (no download).
    """
    if name in MODELS:
        return MODELS[name]
    for spec in MODELS.values():
        if spec.hub_id is not None and name == spec.hub_id:
            return spec
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return None
        raise VtcbenchError(f"model folder {name!r} has no config.json; pass a folder saved with save_pretrained")
    if _HUB_ID.match(name) and not path.exists():
        return None
    raise VtcbenchError(
        f"unknown model {name!r}; valid choices: {', '.join(sorted(MODELS))} "
        "(or a hub id owner/name, or a local folder with config.json)"
    )


def _config_from_dict(data: dict[str, Any]):
    from transformers import CONFIG_MAPPING

    model_type = data.get("model_type")
    family_of(model_type)  # refuses a model type no family covers
    return CONFIG_MAPPING[model_type].from_dict(data)


def load_config(name: str):
    """Return a fresh ``PretrainedConfig``: shipped JSON for aliases, the folder's config.json, or the hub's.

    Aliases never download, so FLOPs and facts work offline. Only model types a family in
    `vtcbench/families/` covers are accepted: the rest of vtcbench asks the family about the layout.
    """
    spec = resolve_model(name)
    if spec is not None:
        return _config_from_dict(json.loads((CONFIG_DIR / spec.config_file).read_text()))
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(os.path.expanduser(name))
    except OSError as exc:
        if Path(name).expanduser().is_dir():
            raise VtcbenchError(f"cannot read the config of model folder {name!r}: {_first_line(exc)}") from exc
        raise VtcbenchError(
            f"config for {name!r} is not available offline; run `hf download {name}` with network access "
            f"({_first_line(exc)})"
        ) from exc
    family_of(config)
    return config


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------------
# offline processor
# --------------------------------------------------------------------------------------------------

# Words for the offline tokenizer: enough for VQA-style prompts and answers. Case-sensitive on purpose so
# that "USER"/"ASSISTANT" decode as written. Order is part of the tiny model's contract (ids 5..).
LOCAL_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(  # de-duplicated, order kept
        ["USER", "ASSISTANT", "SYSTEM", "Answer", "answer", "question", "Question", "using", "a", "A", "single", "word", "or", "phrase", "the", "The", "is", "Is", "are", "Are", "what", "What", "which", "Which", "who", "Who", "where", "Where", "when", "When", "why", "Why", "how", "How", "many", "Many", "much", "color", "colour", "yes", "Yes", "no", "No", "not", "this", "This", "that", "That", "these", "those", "there", "There", "it", "It", "its", "in", "In", "on", "On", "of", "to", "for", "with", "at", "by", "from", "and", "or", "but", "as", "an", "be", "was", "were", "do", "does", "did", "can", "could", "would", "should", "will", "has", "have", "had", "image", "picture", "photo", "Please", "please", "describe", "Describe", "shown", "show", "see", "visible", "left", "right", "top", "bottom", "front", "back", "side", "middle", "center", "background", "near", "next", "behind", "above", "below", "inside", "outside", "man", "woman", "person", "people", "boy", "girl", "child", "dog", "cat", "bird", "horse", "car", "bus", "truck", "train", "bike", "bicycle", "plane", "table", "chair", "bed", "tv", "laptop", "phone", "book", "clock", "cup", "bottle", "plate", "food", "pizza", "sign", "street", "road", "water", "sky", "tree", "grass", "building", "room", "window", "door", "wall", "floor", "shirt", "hat", "ball", "kite", "umbrella", "red", "blue", "green", "yellow", "black", "white", "brown", "gray", "grey", "orange", "pink", "purple", "silver", "gold", "big", "small", "large", "little", "tall", "short", "long", "old", "new", "young", "open", "closed", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "zero", "none", "some", "all", "any", "both", "other", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "playing", "sitting", "standing", "holding", "wearing", "eating", "walking", "riding", "looking", "doing", "time", "day", "night", "room", "sport", "game", "kind", "type", "number", "name", "text", "written", "letter", ",", ".", "?", "!", ":", ";", "'", '"', "(", ")", "-", "/", "%", "$", "&", "+"]
    )
)

_FIXED_SPECIALS = {0: "<unk>", 1: "<s>", 2: "</s>"}


def _local_vocab(
    vocab_size: int, image_token_id: int, pad_token_id: int | None, words: tuple[str, ...] = LOCAL_WORDS
) -> dict[str, int]:
    """Vocabulary with ``<image>`` at ``image_token_id`` (and ``<pad>`` at the config's pad id when that
    slot is free), words in the remaining low ids and ``<extra_i>`` filler up to ``vocab_size``.

    Filling up to vocab_size means every id a random-weight model can generate decodes to something.
    """
    by_id: dict[int, str] = dict(_FIXED_SPECIALS)
    by_id[image_token_id] = "<image>"
    if pad_token_id is None or pad_token_id in by_id or pad_token_id < 0:
        pad_token_id = image_token_id + 1
        while pad_token_id in by_id:
            pad_token_id += 1
    by_id[pad_token_id] = "<pad>"
    size = max(vocab_size, max(by_id) + 1)
    words_left = iter(words)
    extra = 0
    vocab: dict[str, int] = {}
    for idx in range(size):
        token = by_id.get(idx)
        if token is None:
            token = next(words_left, None)
        if token is None:
            token, extra = f"<extra_{extra}>", extra + 1
        vocab[token] = idx
    return vocab


def build_local_tokenizer(
    vocab_size: int, image_token_id: int, pad_token_id: int | None = None, words: tuple[str, ...] = LOCAL_WORDS
):
    """A word-level ``PreTrainedTokenizerFast`` built in memory (no files, no network).

    Mirrors the LLaVA tokenizer where it matters: ``<s>`` prepended, ``<image>`` an unsplittable special
    token with the model's id, left padding for batched generation.
    """
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    vocab = _local_vocab(vocab_size, image_token_id, pad_token_id, words)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies punctuation
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>", "<pad>", "<image>")]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_max_length=4096,
    )


def build_local_processor(config, words: tuple[str, ...] = LOCAL_WORDS):
    """An offline processor matching `config`, built by its family (no files, no network)."""
    return family_of(config).local_processor(config, words)


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------


def _model_class(config) -> type:
    return family_of(config).model_class(config)


def _validate(dtype: str, attn_implementation: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise choices_error("dtype", dtype, list(DTYPES))
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise choices_error("attn_implementation", attn_implementation, ATTN_IMPLEMENTATIONS)
    if attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise VtcbenchError(
            "attn_implementation 'flash_attention_2' needs the flash_attn package (pip install flash-attn); "
            "use 'sdpa' or 'eager'"
        )
    return DTYPES[dtype]


def check_device(device: str) -> torch.device:
    try:
        torch_device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise VtcbenchError(f"invalid device {device!r}: {_first_line(exc)}") from exc
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise VtcbenchError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return torch_device


def _offline_error(name: str, source: str, exc: BaseException) -> VtcbenchError:
    from huggingface_hub.errors import RepositoryNotFoundError

    if isinstance(exc, RepositoryNotFoundError):
        return VtcbenchError(f"hub model {source!r} not found (or gated without a token)")
    label = name if name == source else f"{name} ({source})"
    return VtcbenchError(
        f"weights for {label} are not available offline; run `hf download {source}` with network access, "
        "or pass --random-weights"
    )


def load_model(
    name: str,
    *,
    random_weights: bool = False,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    device: str = "cpu",
    seed: int = 0,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
) -> tuple[nn.Module, Any]:
    """Load ``(model, processor)`` in eval mode on ``device``.

    ``random_weights`` builds the architecture from the (shipped) config under ``torch.manual_seed(seed)`` in
    a forked RNG, so the same seed gives the same weights and the caller's RNG stream is left untouched.
    Real weights come from the hub id or the local folder; any offline failure becomes one VtcbenchError line.
    ``device_map`` (and ``max_memory``) split the model over devices as it loads, through accelerate's
    dispatch (`parse_device_map`, `parse_max_memory`); what does not fit is offloaded to a temporary folder.
    """
    torch_dtype = _validate(dtype, attn_implementation)
    if device_map is not None and random_weights:
        raise VtcbenchError("--device-map dispatches a checkpoint's weights as they load; it needs real weights, not --random-weights")
    spec = resolve_model(name)
    torch_device = check_device(device)
    source = spec.source if spec is not None else os.path.expanduser(name)
    label = spec.alias if spec is not None else name

    if random_weights:
        config = load_config(name)
        model = _random_model(config, torch_dtype, attn_implementation, seed, torch_device)
        processor = _cached_processor(config, source) if source is not None else None
        if processor is None:
            processor = build_local_processor(config)
    else:
        if spec is not None and spec.source is None:
            raise VtcbenchError(f"model {spec.alias!r} has no pretrained weights (test model); pass --random-weights")
        if spec is not None and spec.packaged and not spec.weights_present:
            raise VtcbenchError(
                f"the packaged weights of {spec.alias} are not in {spec.source}; train them: vtcbench train "
                f"--model {spec.alias} --out {spec.source} (or reinstall vtcbench, if the package shipped them)"
            )
        assert source is not None
        from transformers import AutoConfig

        from vtcbench.transformers_seam import check_loaded_keys

        try:
            config = AutoConfig.from_pretrained(source)
            with _quiet_if(getattr(config, "vtcbench_projector", None) is not None):  # its projector keys are ours to load
                model, loading_info = _model_class(config).from_pretrained(
                    source, config=config, dtype=torch_dtype, attn_implementation=attn_implementation, output_loading_info=True,
                    **_dispatch(device_map, max_memory),
                )
            processor = family_of(config).load_processor(config, source)
        except OSError as exc:  # covers LocalEntryNotFoundError, OfflineModeIsEnabled, HTTP errors
            if spec is None and Path(source).is_dir():
                raise VtcbenchError(f"cannot load model folder {name!r}: {_first_line(exc)}") from exc
            raise _offline_error(label, source, exc) from exc
        if getattr(config, "vtcbench_projector", None) is not None:
            loading_info = _load_trained_projector(model, Path(source), loading_info)
        check_loaded_keys(loading_info, label)
        if device_map is not None:  # accelerate placed every part; moving it would undo that
            return model.eval(), processor
    return model.to(torch_device).eval(), processor


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
_MEMORY = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$")


def parse_device_map(text: str) -> str | dict:
    """`--device-map`: one of accelerate's strategies, or a JSON file mapping module names to devices."""
    if text in DEVICE_MAPS:
        return text
    path = Path(text)
    if not path.is_file():
        raise VtcbenchError(f"--device-map {text!r} is neither a strategy ({', '.join(DEVICE_MAPS)}) nor a JSON file")
    try:
        mapping = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise VtcbenchError(f"--device-map {text!r} is not valid JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(mapping, dict) or not mapping:
        raise VtcbenchError(f"--device-map {text!r} must hold a JSON object of module name -> device")
    return mapping


def parse_max_memory(text: str) -> dict:
    """`--max-memory 0=70GiB,1=70GiB,cpu=200GiB`: per device (a GPU index, cpu, or disk) its limit."""
    limits: dict = {}
    for item in text.split(","):
        device, sep, size = (part.strip() for part in item.partition("="))
        if not sep or not (device.isdigit() or device in ("cpu", "disk", "mps")) or not _MEMORY.match(size):
            raise VtcbenchError(
                f"--max-memory {item.strip()!r} is not DEVICE=SIZE (DEVICE: a GPU index, cpu, disk or mps; SIZE: e.g. 70GiB, 500MB)"
            )
        limits[int(device) if device.isdigit() else device] = size
    return limits


def _dispatch(device_map: str | dict | None, max_memory: dict | None) -> dict:
    """`from_pretrained`'s dispatch arguments; an offload folder that lives as long as the process."""
    if device_map is None:
        if max_memory is not None:
            raise VtcbenchError("--max-memory limits --device-map's dispatch; add --device-map auto")
        return {}
    import atexit

    offload = tempfile.mkdtemp(prefix="vtcbench-offload-")
    atexit.register(shutil.rmtree, offload, ignore_errors=True)
    return {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload}


@contextmanager
def _quiet_if(quiet: bool) -> Iterator[None]:
    """transformers' loading report off (its projector keys are reported unexpected and missing)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    if quiet:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _load_trained_projector(model: nn.Module, folder: Path, loading_info: dict) -> dict:
    """A folder trained or converted for STF / TokenConcat (`vtcbench_projector` in config.json):
    transformers built LLaVA's projector, so swap in ours and load its weights from the folder's
    safetensors (the projector's keys in the hub layout, `projector_key_prefix`). Returns the loading info without the
    projector's keys, which are now accounted for."""
    from safetensors import safe_open

    from vtcbench.projectors import build_projector

    family = family_of(model)
    weight = next(family.projector(model).parameters())
    projector = build_projector(model.config)
    prefix = projector_key_prefix(model)
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            state.update({key[len(prefix) :]: handle.get_tensor(key) for key in handle.keys() if key.startswith(prefix)})  # noqa: SIM118 (not a mapping)
    try:
        projector.load_state_dict(state)
    except RuntimeError as exc:
        raise VtcbenchError(f"the projector weights in {folder} do not fit its vtcbench_projector config: {_first_line(exc)}") from exc
    family.set_projector(model, projector.to(device=weight.device, dtype=weight.dtype))
    return {kind: [k for k in keys if prefix not in k] for kind, keys in loading_info.items() if isinstance(keys, (list, set))}


def random_model(
    config, *, dtype: str = "float32", attn_implementation: str = "sdpa", device: str = "cpu", seed: int = 0
) -> nn.Module:
    """The architecture of `config` with seeded random weights, in eval mode (no processor).

    For profiling shapes that no checkpoint has (fewer layers, fewer image tokens).
    """
    torch_dtype = _validate(dtype, attn_implementation)
    torch_device = check_device(device)
    return _random_model(config, torch_dtype, attn_implementation, seed, torch_device).eval()


def _random_model(config, torch_dtype: torch.dtype, attn_implementation: str, seed: int, device: torch.device) -> nn.Module:
    """Built and initialised on `device` (a 7B model initialises in seconds on a GPU, minutes on
    its host), from a forked RNG: the same seed gives the same weights on the same kind of device."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        model = _model_class(config)._from_config(config, dtype=torch_dtype, attn_implementation=attn_implementation)
        if getattr(config, "vtcbench_projector", None) is not None:  # a trained-projector folder's architecture
            from vtcbench.projectors import build_projector

            family_of(config).set_projector(model, build_projector(config).to(dtype=torch_dtype))
        return model


def _cached_processor(config, source: str):
    """The real processor if it is already on disk (cache or folder), else None; never downloads."""
    try:
        return family_of(config).load_processor(config, source, local_files_only=True)
    except (OSError, ValueError):  # not cached (or incomplete): build one locally
        return None


# --------------------------------------------------------------------------------------------------
# structure helpers
# --------------------------------------------------------------------------------------------------


def projector_key_prefix(model: nn.Module) -> str:
    """The projector's key prefix in the checkpoint a model was loaded from (its module path)."""
    projector = family_of(model).projector(model)
    name = next(name for name, module in model.named_modules() if module is projector)
    layout = family_of(model).checkpoint_layout() or ()
    for module_prefix, key_prefix in layout:
        if f"{name}.".startswith(module_prefix):
            return key_prefix + f"{name}."[len(module_prefix) :]
    return f"{name}."


def image_token_mask(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Bool mask of image-placeholder positions.

    Always derived from the ids: left padding, prompt templates and llava-next's variable token counts move
    the image span, so fixed offsets would silently point at text.
    """
    return input_ids == image_token_id
