"""Offline processors for the Qwen2-VL / Qwen2.5-VL / Qwen3-VL families.

Why this module exists (same contract as ``vtcbench.models.build_local_processor`` for LLaVA):
- Benchmarks with ``--random-weights`` must run with no tokenizer or preprocessor files on disk, so the
  processor is built in memory: the family's real processor class (placeholder expansion, ``image_grid_thw``,
  ``mm_token_type_ids``) around a word-level toy tokenizer whose special tokens sit at the config's ids.
- ``<|image_pad|>`` therefore expands to exactly ``image_grid_thw.prod() // merge_size**2`` tokens, as with the
  hub processor, and the model's M-RoPE index (``get_rope_index``) sees the same token-type layout.
- Prompts follow lmms-eval 0.7.3's ``qwen2_5_vl`` / ``qwen3_vl`` model classes (system message
  "You are a helpful assistant.", images before the question): ``qwen_chat_prompt`` returns that exact string and
  ``processor.apply_chat_template`` renders the same text.

Works with transformers 5.5 .. 5.x: the processor classes, the PIL image processor and the
``size={"shortest_edge": min_pixels, "longest_edge": max_pixels}`` convention are the same in 5.5 and 5.24.
"""

from __future__ import annotations

import importlib.util
from typing import Any

QWEN_FAMILIES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

DEFAULT_SYSTEM = "You are a helpful assistant."

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"

# Pixel bounds of the hub preprocessor_config.json files (smart_resize keeps h*w inside them, h and w
# multiples of patch_size * merge_size): Qwen2-VL / Qwen2.5-VL min_pixels=56*56, max_pixels=28*28*16384;
# Qwen3-VL size={"shortest_edge": 65536, "longest_edge": 16777216}.
HUB_PIXELS: dict[str, tuple[int, int]] = {
    "qwen2_vl": (56 * 56, 28 * 28 * 16384),
    "qwen2_5_vl": (56 * 56, 28 * 28 * 16384),
    "qwen3_vl": (65536, 16777216),
}
# What lmms-eval 0.7.3's qwen2_5_vl / qwen3_vl model classes pass (min_pixels=256*28*28, max_pixels=1605632).
LMMS_EVAL_PIXELS: tuple[int, int] = (256 * 28 * 28, 1605632)
# Toy models (text hidden_size < TOY_HIDDEN): between 4 and 64 merged tokens per image, so a 112x112
# image stays 4x4 merged tokens (factor 28) and nothing is upscaled to hundreds of tokens.
TOY_HIDDEN = 256
TOY_MERGED_TOKENS: tuple[int, int] = (4, 64)

# Qwen2-VL / Qwen2.5-VL hub chat template (chat_template.json of Qwen/Qwen2-VL-*-Instruct and
# Qwen/Qwen2.5-VL-*-Instruct): adds the default system prompt when the first message is not a system one.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL Instruct renders the same text for system / user / assistant turns made of strings, images and
# text (no default system prompt is injected). Tool calls and <think> handling of the hub template are
# left out: vtcbench never sends them.
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}"
    "{%- if add_vision_id %}{{- 'Picture ' ~ image_count.value ~ ': ' }}{%- endif %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif content['type'] == 'video' or 'video' in content %}"
    "{%- set video_count.value = video_count.value + 1 %}"
    "{%- if add_vision_id %}{{- 'Video ' ~ video_count.value ~ ': ' }}{%- endif %}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in content %}{{- content['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

# Words the chat template itself produces; always in the toy vocabulary.
CHAT_WORDS: tuple[str, ...] = ("system", "user", "assistant", "You", "are", "a", "helpful", ".")

# Default extra words: enough for VQA-style prompts and answers. Case-sensitive.
QWEN_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        """
    Answer answer question Question using the The single word or phrase Please please describe Describe
    what What which Which who Who where Where when When why Why how How many Many much color colour
    is Is are Are yes Yes no No not this This that That these those there There it It its in In on On of to
    for with at by from and or but as an be was were do does did can could would should will has have had
    image picture photo shown show see visible left right top bottom front back side middle center
    background near next behind above below inside outside
    man woman person people boy girl child dog cat bird horse car bus truck train bike bicycle plane
    table chair bed tv laptop phone book clock cup bottle plate food pizza sign street road water sky tree
    red blue green yellow black white brown gray grey orange pink purple
    big small large little tall short long old new one two three four five six seven eight nine ten zero
    0 1 2 3 4 5 6 7 8 9 10 A B C D E Options option Choose correct letter
    , ? ! : ; ' " ( ) - / % $ & +
    """.split()
    )
)


def _family(config) -> str:
    model_type = getattr(config, "model_type", None)
    if model_type not in QWEN_FAMILIES:
        raise ValueError(f"not a Qwen-VL config: model_type {model_type!r} (expected one of {QWEN_FAMILIES})")
    return model_type


def _first_id(value: Any) -> int | None:
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def qwen_special_ids(config) -> dict[str, int]:
    """Token -> id for the Qwen special tokens, read from ``config`` (top level, then ``text_config``).

    Qwen's vocabulary puts ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` at 151643..151645 and the
    configs give ``bos_token_id=151643`` (``<|endoftext|>``, also the pad token) and ``eos_token_id=151645``
    (``<|im_end|>``); ``<|im_start|>`` is the id after ``<|endoftext|>``. The toy configs follow the same
    layout (0, 1, 2).
    """
    text = getattr(config, "text_config", config)

    def pick(name: str) -> int | None:
        for source in (config, text):
            found = _first_id(getattr(source, name, None))
            if found is not None:
                return found
        return None

    endoftext = pick("pad_token_id")
    if endoftext is None:
        endoftext = pick("bos_token_id")
    im_end = pick("eos_token_id")
    if endoftext is None or im_end is None:
        raise ValueError("Qwen-VL config needs bos_token_id (or pad_token_id) and eos_token_id")
    ids = {
        "<|endoftext|>": endoftext,
        "<|im_start|>": endoftext + 1,
        "<|im_end|>": im_end,
        "<|vision_start|>": int(config.vision_start_token_id),
        "<|vision_end|>": int(config.vision_end_token_id),
        "<|image_pad|>": int(config.image_token_id),
        "<|video_pad|>": int(config.video_token_id),
    }
    vision_pad = getattr(config, "vision_token_id", None)
    if vision_pad is not None:
        ids["<|vision_pad|>"] = int(vision_pad)
    if len(set(ids.values())) != len(ids):
        raise ValueError(f"Qwen special token ids collide: {ids}")
    vocab_size = text.vocab_size
    too_big = {k: v for k, v in ids.items() if not 0 <= v < vocab_size}
    if too_big:
        raise ValueError(f"special token ids outside vocab_size={vocab_size}: {too_big}")
    return ids


def _qwen_vocab(vocab_size: int, specials: dict[str, int], words: tuple[str, ...]) -> dict[str, int]:
    """Specials at their ids, ``<unk>`` then the words in the lowest free ids, ``<extra_i>`` up to vocab_size
    (every id a random-weight model can generate decodes to something)."""
    by_id = {idx: token for token, idx in specials.items()}
    rest = iter(dict.fromkeys(("<unk>", *CHAT_WORDS, *words)))
    vocab: dict[str, int] = {}
    extra = 0
    for idx in range(vocab_size):
        token = by_id.get(idx)
        while token is None:
            token = next(rest, None)
            if token is None:
                token, extra = f"<extra_{extra}>", extra + 1
            elif token in vocab or token in specials:
                token = None
        vocab[token] = idx
    if "<unk>" not in vocab:
        raise ValueError(f"vocab_size={vocab_size} leaves no room for <unk>")
    return vocab


def build_qwen_tokenizer(config, words: tuple[str, ...] = QWEN_WORDS):
    """A word-level ``PreTrainedTokenizerFast`` built in memory, Qwen special tokens at the config's ids.

    Like Qwen's tokenizer: no BOS is prepended, ``<|endoftext|>`` pads, ``<|im_end|>`` ends a turn
    (eos), the vision tokens are unsplittable special tokens. Left padding for batched generation.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = qwen_special_ids(config)
    text = getattr(config, "text_config", config)
    vocab = _qwen_vocab(text.vocab_size, specials, words)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", *specials)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
        padding_side="left",
        model_max_length=32768,
    )


def image_processor_class():
    """``Qwen2VLImageProcessorPil`` when torchvision is not importable (vtcbench uninstalls it on CPU
    machines; transformers would otherwise fall back with a warning), else ``Qwen2VLImageProcessor``.
    All three families use this image processor."""
    import transformers

    if not _has_torchvision():
        pil = getattr(transformers, "Qwen2VLImageProcessorPil", None)
        if pil is not None:
            return pil
    return transformers.Qwen2VLImageProcessor


def pixel_bounds(config) -> tuple[int, int]:
    """(min_pixels, max_pixels) used when the caller gives none: the config's own
    (`vtcbench_pixel_bounds`: vtc-tiny-qwen sees vtcshapes' 112 px scenes at 224 px, 64 tokens),
    the hub defaults, or 4..64 merged tokens for the toy configs."""
    family = _family(config)
    own = getattr(config, "vtcbench_pixel_bounds", None)
    if own is not None:
        return int(own[0]), int(own[1])
    text = getattr(config, "text_config", config)
    if text.hidden_size < TOY_HIDDEN:
        vision = config.vision_config
        factor = vision.patch_size * vision.spatial_merge_size
        low, high = TOY_MERGED_TOKENS
        return low * factor * factor, high * factor * factor
    return HUB_PIXELS[family]


def build_local_qwen_processor(
    config,
    words: tuple[str, ...] = QWEN_WORDS,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
):
    """An offline ``Qwen2VLProcessor`` (qwen2_vl), ``Qwen2_5_VLProcessor`` (qwen2_5_vl) or
    ``Qwen3VLProcessor`` (qwen3_vl) matching ``config``; images only (no video processor).

    The image processor takes patch_size / merge_size / temporal_patch_size from ``config.vision_config`` and
    the family's mean/std (CLIP's for Qwen2/2.5-VL, 0.5 for Qwen3-VL); ``min_pixels`` / ``max_pixels``
    default to ``pixel_bounds(config)``.
    """
    import transformers
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    family = _family(config)
    vision = config.vision_config
    low, high = pixel_bounds(config)
    low = low if min_pixels is None else min_pixels
    high = high if max_pixels is None else max_pixels
    if family == "qwen3_vl":
        mean = std = [0.5, 0.5, 0.5]
    else:
        mean, std = list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD)
    image_processor = image_processor_class()(
        size={"shortest_edge": low, "longest_edge": high},
        patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size,
        merge_size=vision.spatial_merge_size,
        image_mean=mean,
        image_std=std,
        do_convert_rgb=True,
    )
    tokenizer = build_qwen_tokenizer(config, words)
    processor_cls = _processor_class(family)
    template = QWEN3_VL_CHAT_TEMPLATE if family == "qwen3_vl" else QWEN2_VL_CHAT_TEMPLATE
    if _has_torchvision():
        video_cls = transformers.Qwen3VLVideoProcessor if family == "qwen3_vl" else transformers.Qwen2VLVideoProcessor
        video_processor = video_cls(
            patch_size=vision.patch_size,
            temporal_patch_size=vision.temporal_patch_size,
            merge_size=vision.spatial_merge_size,
            image_mean=mean,
            image_std=std,
        )
        return processor_cls(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=video_processor,
            chat_template=template,
        )
    return _image_only(processor_cls)(image_processor, tokenizer, chat_template=template)


def _processor_class(family: str) -> type:
    import transformers

    return {
        "qwen2_vl": transformers.Qwen2VLProcessor,
        "qwen2_5_vl": transformers.Qwen2_5_VLProcessor,
        "qwen3_vl": transformers.Qwen3VLProcessor,
    }[family]


def load_qwen_processor(config, source: str, **kwargs: Any):
    """The processor saved with a Qwen-VL checkpoint (hub id or folder); ``kwargs`` go to ``from_pretrained``.

    ``AutoProcessor`` when torchvision is importable. Without it (vtcbench's CPU install) ``AutoProcessor``
    cannot build these processors at all (their video processor needs torchvision, on 5.24 even to be
    named), so the image-only subclass (``_image_only``) loads the image processor, tokenizer and chat
    template from the same files.
    """
    if _has_torchvision():
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(source, **kwargs)
    return _image_only(_processor_class(_family(config))).from_pretrained(source, **kwargs)


def _has_torchvision() -> bool:
    return importlib.util.find_spec("torchvision") is not None


_IMAGE_ONLY: dict[type, type] = {}


def _image_only(processor_cls: type) -> type:
    """``processor_cls`` without its video processor, for machines without torchvision.

    The Qwen processors declare ``video_processor`` in ``__init__`` and ProcessorMixin insists on one of the
    right class; every Qwen video processor needs torchvision, and on 5.24 even the class check fails without
    it (``VIDEO_PROCESSOR_MAPPING`` is a placeholder). The subclass only drops that attribute (ProcessorMixin
    reads the attributes off ``__init__``'s signature): text, image and chat-template code is the parent's.
    It keeps the parent's name so ``save_pretrained`` records the real class, and its saved
    ``processor_config.json`` names the video processor the parent would have (its class, and the
    image processor's patch, merge, mean and std; the rest are that class's defaults), so a folder
    saved here loads with ``AutoProcessor`` where torchvision is installed (lmms-eval's Qwen classes
    load it so). Passing ``videos=`` fails.
    """
    if processor_cls not in _IMAGE_ONLY:
        video_class = "Qwen3VLVideoProcessor" if processor_cls.__name__ == "Qwen3VLProcessor" else "Qwen2VLVideoProcessor"

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            processor_cls.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

        def to_dict(self) -> dict[str, Any]:
            output = processor_cls.to_dict(self)
            image = self.image_processor
            output.setdefault("video_processor", {
                "video_processor_type": video_class,
                **{key: getattr(image, key) for key in ("patch_size", "temporal_patch_size", "merge_size")},
                "image_mean": list(image.image_mean), "image_std": list(image.image_std),
            })
            return output

        _IMAGE_ONLY[processor_cls] = type(
            processor_cls.__name__,
            (processor_cls,),
            {"__init__": __init__, "to_dict": to_dict, "__module__": __name__, "__doc__": _image_only.__doc__},
        )
    return _IMAGE_ONLY[processor_cls]


def qwen_chat_messages(
    question: str, n_images: int, answer: str | None = None, system: str = DEFAULT_SYSTEM
) -> list[dict[str, Any]]:
    """The messages lmms-eval 0.7.3 builds (qwen2_5_vl.py / qwen3_vl.py ``generate_until``, interleave off):
    a system message, then one user turn with the images first and the question last."""
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}, {"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def qwen_chat_prompt(question: str, n_images: int, answer: str | None = None, system: str = DEFAULT_SYSTEM) -> str:
    """The prompt text lmms-eval 0.7.3's ``qwen2_5_vl`` / ``qwen3_vl`` classes feed the processor::

        <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
        <|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\\n<|im_start|>assistant\\n

    (one line, no break after ``user\\n``). With ``answer`` the assistant turn is closed as the chat template
    renders it: ``...assistant\\n{answer}<|im_end|>\\n``. lmms-eval strips ``<image>`` from the question first;
    so should the caller.
    """
    text = (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        f"<|im_start|>user\n{IMAGE_PLACEHOLDER * n_images}{question}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    if answer is not None:
        text += f"{answer}<|im_end|>\n"
    return text

