"""The Python API the CLI mirrors: build a method from options, check it against a model, answer."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from vtcbench.budgets import parse_budget, solve
from vtcbench.families import ModelFacts, family_of
from vtcbench.methods import Method, check_before_loading, get_method, parse_set_options
from vtcbench.models import load_config, load_model
from vtcbench.shapes import Scene


@dataclass
class Answer:
    text: str
    image_tokens_per_layer: list[int]


def method_from_options(name: str, set_options: list[str], budget: str | None = None, facts: ModelFacts | None = None) -> Method:
    """`--method NAME --set k=v ... [--budget tokens=N]` -> a validated method (model-independent
    checks); with a budget, the setting `vtcbench.budgets.solve` chooses for the model's `facts`,
    which it prints."""
    params = parse_set_options(set_options)
    if budget is None:
        return get_method(name, **params)
    solved = solve(name, params, parse_budget(budget), facts)
    print(solved.describe(), file=sys.stderr)
    return solved.method


def check_method_for_model(method: Method, model: str) -> None:
    """Model-dependent checks (layer beyond depth, stride not dividing the tokens, the trained
    weights a method needs) from the model's config, no weights: `check_before_loading`."""
    check_before_loading(method, load_config(model))


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
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
) -> Answer:
    """Greedy answer to one question about one image with `method` applied, the way its kind
    answers (`method.kind.session`: under the engine, or from VoCo-LLaMA's compressed cache)."""
    model, processor = load_model(
        model_name, random_weights=random_weights, dtype=dtype, attn_implementation=attn_implementation, device=device,
        device_map=device_map, max_memory=max_memory,
    )
    picture = Image.open(image).convert("RGB") if image else example_image()
    family_of(model).check_image_size(*picture.size)
    method.check_loaded(model, processor)
    ((text, counts),) = method.kind.session(model, processor, method).answer([question], [picture], max_new_tokens)
    return Answer(text=text, image_tokens_per_layer=counts)
