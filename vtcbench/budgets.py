"""Iso-cost budgets (`--budget tokens=N` or `--budget tflops=X`): each method's hyperparameters
solved so that methods compare at equal cost (docs/methods.md#budgets).

A budget is a cost per image-bearing sample at the model's nominal image:

- `tokens=N`: the mean visual tokens entering the decoder layers (sum over layers / L, LLaVolta's
  and PyramidDrop's "average tokens");
- `tflops=X`: the decoder's image-token TFLOPs in the papers' convention (`tflops_image`).

Each method offers the settings of its budget knob (`Method.budget_candidates`: FastV's drop
ratio for every kept count, DART's truncation, VisionZip's total at the official 54:10 split,
...), every other hyperparameter staying as given. The rule, the same for every method: the valid
candidate whose cost is closest to the budget (the cheaper one on a tie). A budget outside the
range of a method's candidates is refused in one line naming that range; what was chosen and
the cost it reaches are printed, since a coarse knob (LLaVolta's stride) may land beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vtcbench.errors import VtcbenchError
from vtcbench.families import FAMILIES, ModelFacts
from vtcbench.methods import Method, get_method

Measure = Literal["tokens", "tflops"]
MEASURES: tuple[str, ...] = ("tokens", "tflops")


@dataclass(frozen=True)
class Budget:
    measure: Measure
    value: float

    def __str__(self) -> str:
        return f"{self.measure}={self.value:g}"


@dataclass(frozen=True)
class Solved:
    """A method's setting for a budget and the cost it reaches."""

    method: Method
    cost: float
    budget: Budget

    def describe(self) -> str:
        unit = "mean visual tokens per layer" if self.budget.measure == "tokens" else "image-token TFLOPs"
        chosen = ", ".join(f"{key}={value}" for key, value in self.method.params().items())
        return f"--budget {self.budget}: {self.method.name} {chosen} ({self.cost:.4g} {unit})"


def parse_budget(text: str) -> Budget:
    """`tokens=16` or `tflops=1.5`; one line naming the forms otherwise."""
    measure, sep, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not sep or measure not in MEASURES or not number > 0:
        raise VtcbenchError(f"--budget {text!r} is not of the form tokens=N or tflops=X (a positive number)")
    return Budget(measure, number)  # type: ignore[arg-type]


def cost(method: Method, facts: ModelFacts, measure: Measure) -> float:
    """The method's cost at the model's nominal image, in the budget's measure."""
    counts = method.image_tokens_per_layer(facts.image_tokens, facts.n_layers, facts.vision_crops)
    if measure == "tokens":
        return sum(counts) / len(counts)
    from vtcbench.profilers.flops import analytic_flops

    return analytic_flops(method, facts, model="", image_tokens=facts.image_tokens).tflops_image


def solve(name: str, params: dict, budget: Budget, facts: ModelFacts) -> Solved:
    """The setting of method `name` (with `params` fixed) whose cost is closest to the budget."""
    base = get_method(name, **params)
    FAMILIES[facts.family].check_method(base)  # a family's refusal before any budget's
    if not base.budget_knobs:
        raise VtcbenchError(f"--budget: {name} has no setting that changes its cost ({base.budget_refusal})")
    knob = ", ".join(base.budget_knobs)
    chosen = [key for key in base.budget_knobs if key in params]
    if chosen:
        raise VtcbenchError(f"--budget chooses {name}'s {knob}; drop --set {chosen[0]}")
    reachable = []
    n_image = facts.image_tokens // (facts.vision_crops if base.selects_per_crop else 1)  # a per-crop knob: one crop's
    for candidate in base.budget_candidates(n_image, facts.n_layers):
        try:
            candidate.validate_for(n_image, facts.n_layers)
        except VtcbenchError:
            continue  # a setting this model cannot run (an odd pairing, a stride that does not divide)
        reachable.append((cost(candidate, facts, budget.measure), candidate))
    if not reachable:
        raise VtcbenchError(f"--budget: no setting of {name}'s {knob} runs on this model")
    low, high = min(c for c, _ in reachable), max(c for c, _ in reachable)
    tolerance = 1e-9 * max(1.0, high)
    if not low - tolerance <= budget.value <= high + tolerance:
        fixed = ", ".join(f"{key}={value}" for key, value in base.params().items() if key not in base.budget_knobs)
        raise VtcbenchError(
            f"--budget {budget}: {name}{f' ({fixed})' if fixed else ''} reaches {low:.4g}..{high:.4g} "
            f"{budget.measure} on this model; choose a budget in that range"
        )
    best_cost, best = min(reachable, key=lambda pair: (abs(pair[0] - budget.value), pair[0]))
    return Solved(best, best_cost, budget)

