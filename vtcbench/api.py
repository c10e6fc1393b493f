"""The Python API the CLI mirrors: build a method from options, check it against a model, answer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from vtcbench.engine import compress
from vtcbench.families import family_of, model_facts
from vtcbench.methods import Method, get_method, parse_set_options
from vtcbench.models import load_config, load_model
from vtcbench.shapes import Scene


@dataclass
class Answer:
    text: str
    image_tokens_per_layer: list[int]


def method_from_options(name: str, set_options: list[str]) -> Method:
    """`--method NAME --set k=v ...` -> a validated method (model-independent checks)."""
    return get_method(name, **parse_set_options(set_options))


def check_method_for_model(method: Method, model: str) -> None:
    """Model-dependent checks (layer beyond depth, stride not dividing the tokens, the trained
    weights a method needs), no weights."""
    config = load_config(model)
    family_of(config).check_method(method)
    method.check_model(config)
    facts = model_facts(config)
    method.validate_for(facts.image_tokens, facts.n_layers)


#: the default image: one of each shape (2x2 cells) and the letter K, none touching
EXAMPLE_SCENE = Scene(
    objects=((0, "red", "circle"), (3, "blue", "square"), (32, "green", "triangle"), (35, "yellow", "cross")),
    letter="K",
    letter_cell=46,
)


def example_image() -> Image.Image:
    """A vtcshapes scene with one of each shape, for runs without an image file."""
    return Image.fromarray(EXAMPLE_SCENE.render())


@torch.no_grad()
def answer(
    model_name: str,
    method: Method,
    question: str,
    *,
    image: Path | None = None,
    max_new_tokens: int = 16,
    random_weights: bool = False,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    device: str = "cpu",
) -> Answer:
    """Greedy answer to one question about one image with `method` applied."""
    model, processor = load_model(
        model_name, random_weights=random_weights, dtype=dtype, attn_implementation=attn_implementation, device=device
    )
    picture = Image.open(image).convert("RGB") if image else example_image()
    family_of(model).check_image_size(*picture.size)
    if method.where == "cache":
        return _answer_voco(model, processor, method, question, picture, max_new_tokens)
    family = family_of(model)
    prompt = family.prompt(question, 1, system=family.system_prompt(model.config))
    inputs = processor(images=[picture], text=[prompt], return_tensors="pt").to(device)
    with compress(model, method) as engine:
        prepared = engine.prepare(inputs)
        output = model.generate(**prepared, max_new_tokens=max_new_tokens, do_sample=False)
        counts = engine.applied_image_tokens_per_layer
    text = processor.tokenizer.decode(output[0, prepared["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    return Answer(text=text, image_tokens_per_layer=counts)



def _answer_voco(model, processor, method: Method, question: str, picture: Image.Image, max_new_tokens: int) -> Answer:
    """VoCo-LLaMA's efficient form: compress the image into the VoCo tokens' cache, then answer against it."""
    from vtcbench.voco import answer_batch

    (text,) = answer_batch(model, processor, method, [question], [picture], max_new_tokens)
    facts = model_facts(model)
    return Answer(text=text, image_tokens_per_layer=method.image_tokens_per_layer(facts.image_tokens, facts.n_layers))
