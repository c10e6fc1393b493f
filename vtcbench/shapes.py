"""vtcshapes: a procedural visual question-answering benchmark, deterministic from a seed.

A scene is an 8x8 grid of 14-pixel cells on a 112-pixel black image (one cell = one ViT patch, one
visual token of vtc-tiny): 3 to 6 coloured shapes of 2x2 cells and one white capital letter in a
single cell, with at least one empty cell between any two.
Four question families ask for different amounts of visual detail, and every question finds its
object by content, not position (docs/vtc-tiny.md#why-it-is-built-this-way: position-addressed questions did not train):

- ``color``:    "What color is the triangle?" (the shape is unique in the scene)      -> red
- ``presence``: "Is there a circle in the image?" (POPE's template; balanced yes/no)  -> yes / no
- ``count``:    "How many green shapes are there?" (1 to 3, uniform)                  -> 2
- ``text``:     "What letter is written in the image?" (5x5 glyph, TextVQA style)    -> K

Answers are one word, so lmms-eval's exact match is the metric. Compression matters unevenly: a
shape lives in 4 tokens, the letter in 1, so dropping the wrong tokens loses the letter first,
and pooling mixes both with their neighbours. (Shapes of one cell trained too slowly on 2 CPU
cores: one token among 64 gives attention too weak a signal to learn to look.)

The held-out split (`TEST_SEED`, `TEST_PER_FAMILY`) is written once as a parquet file in the
schema of hub VQA datasets (`default_dataset`), which the shipped lmms-eval task
`vtcbench/tasks/vtcshapes` reads offline.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: bump when generation or the written schema changes: the cached dataset's folder carries it
VERSION = 2
#: the held-out split (training draws its scenes elsewhere and excludes these)
TEST_SEED = 20261121
TEST_PER_FAMILY = 125

IMAGE_SIZE = 112
CELL = 14
GRID = IMAGE_SIZE // CELL
SPAN = 2  # an object covers SPAN x SPAN cells (patches); the letter covers one

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (35, 190, 60),
    "blue": (45, 95, 245),
    "yellow": (240, 220, 30),
    "purple": (160, 55, 215),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
FAMILIES: tuple[str, ...] = ("color", "presence", "count", "text")
LETTER_COLOR = (245, 245, 245)
_GLYPHS = {
    "A": (".###.", "#...#", "#####", "#...#", "#...#"),
    "E": ("#####", "#....", "####.", "#....", "#####"),
    "H": ("#...#", "#...#", "#####", "#...#", "#...#"),
    "K": ("#..#.", "#.#..", "##...", "#.#..", "#..#."),
    "L": ("#....", "#....", "#....", "#....", "#####"),
    "T": ("#####", "..#..", "..#..", "..#..", "..#.."),
    "X": ("#...#", ".#.#.", "..#..", ".#.#.", "#...#"),
    "Z": ("#####", "...#.", "..#..", ".#...", "#####"),
}
LETTERS: tuple[str, ...] = tuple(_GLYPHS)
COUNTS: tuple[int, ...] = (1, 2, 3)
#: a blind guesser's accuracy per family (answers are uniform in the held-out split)
CHANCE: dict[str, float] = {"color": 1 / len(COLORS), "presence": 1 / 2, "count": 1 / len(COUNTS), "text": 1 / len(LETTERS)}

#: every word a vtcshapes prompt or answer uses (the vtc-tiny vocabulary adds these to the chat template's)
WORDS: tuple[str, ...] = (
    *"What color is the Is there a How many shapes are letter written in image ? yes no".split(),
    *COLORS,
    *SHAPES,
    *(str(n) for n in COUNTS),
    *LETTERS,
)


def _masks() -> dict[str, np.ndarray]:
    """Boolean masks: shapes SPAN*CELL pixels wide (2-3 px margin), glyphs CELL wide (2 px margin)."""
    size = SPAN * CELL
    y, x = np.mgrid[0:size, 0:size] + 0.5
    c = size / 2
    masks = {
        "circle": (x - c) ** 2 + (y - c) ** 2 <= 11.5**2,
        "square": (abs(x - c) <= 10) & (abs(y - c) <= 10),
        "triangle": (y >= 3) & (y <= 25) & (abs(x - c) <= (y - 3) * 0.5),
        "cross": ((abs(x - c) <= 4) & (abs(y - c) <= 12)) | ((abs(y - c) <= 4) & (abs(x - c) <= 12)),
    }
    for letter, rows in _GLYPHS.items():
        glyph = np.array([[ch == "#" for ch in row] for row in rows])
        mask = np.zeros((CELL, CELL), dtype=bool)
        mask[2:12, 2:12] = glyph.repeat(2, axis=0).repeat(2, axis=1)
        masks[letter] = mask
    return masks


MASKS = _masks()


def _footprint(cell: int, span: int) -> list[int]:
    row, col = divmod(cell, GRID)
    return [(row + dr) * GRID + col + dc for dr in range(span) for dc in range(span)]


@dataclass(frozen=True)
class Scene:
    """Objects as (top-left cell, colour, shape), each SPAN x SPAN cells; the letter in one cell.
    Objects and the letter never touch (at least one empty cell between any two)."""

    objects: tuple[tuple[int, str, str], ...]
    letter: str
    letter_cell: int

    def render(self) -> np.ndarray:
        """uint8 [IMAGE_SIZE, IMAGE_SIZE, 3]."""
        image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        for cell, colour, shape in (*self.objects, (self.letter_cell, "letter", self.letter)):
            row, col = divmod(cell, GRID)
            mask = MASKS[shape]
            patch = image[row * CELL : row * CELL + mask.shape[0], col * CELL : col * CELL + mask.shape[1]]
            patch[mask] = LETTER_COLOR if colour == "letter" else COLORS[colour]
        return image

    def cell_labels(self) -> tuple[np.ndarray, np.ndarray]:
        """Per cell (raster order): colour class (0 none, 1.. COLORS, last = letter) and content class
        (0 none, 1.. SHAPES, then LETTERS); the targets of the vision tower's auxiliary loss."""
        colour = np.zeros(GRID * GRID, dtype=np.int64)
        content = np.zeros(GRID * GRID, dtype=np.int64)
        for cell, name, shape in self.objects:
            for covered in _footprint(cell, SPAN):
                colour[covered] = 1 + list(COLORS).index(name)
                content[covered] = 1 + SHAPES.index(shape)
        colour[self.letter_cell] = 1 + len(COLORS)
        content[self.letter_cell] = 1 + len(SHAPES) + LETTERS.index(self.letter)
        return colour, content

    def key(self) -> str:
        return hashlib.sha1(repr((self.objects, self.letter, self.letter_cell)).encode()).hexdigest()


N_COLOR_CLASSES = 2 + len(COLORS)
N_CONTENT_CLASSES = 1 + len(SHAPES) + len(LETTERS)


@dataclass(frozen=True)
class Sample:
    scene: Scene
    family: str
    question: str
    answer: str


def _place(rng: np.random.Generator, n_objects: int) -> tuple[list[int], int]:
    """Top-left cells of `n_objects` SPAN x SPAN objects and one letter cell, never touching."""
    while True:
        blocked = np.zeros((GRID + 2, GRID + 2), dtype=bool)  # footprints grown by one cell, offset by one
        cells: list[int] = []
        for span in [SPAN] * n_objects + [1]:
            free = [
                r * GRID + c
                for r in range(GRID - span + 1)
                for c in range(GRID - span + 1)
                if not blocked[r + 1 : r + 1 + span, c + 1 : c + 1 + span].any()
            ]
            if not free:
                break
            cell = free[rng.integers(len(free))]
            r, c = divmod(cell, GRID)
            blocked[r : r + span + 2, c : c + span + 2] = True
            cells.append(cell)
        if len(cells) == n_objects + 1:
            return cells[:-1], cells[-1]


def random_scene(rng: np.random.Generator, colours: list[str] | None = None) -> Scene:
    """3-6 objects; `colours` forces the objects' colours (count family)."""
    n = len(colours) if colours is not None else int(rng.integers(3, 7))
    cells, letter_cell = _place(rng, n)
    names = list(COLORS)
    objects = tuple(
        (
            cells[i],
            colours[i] if colours is not None else names[rng.integers(len(names))],
            SHAPES[rng.integers(len(SHAPES))],
        )
        for i in range(n)
    )
    return Scene(objects=objects, letter=LETTERS[rng.integers(len(LETTERS))], letter_cell=letter_cell)


def _ask_color(scene: Scene, rng: np.random.Generator) -> tuple[str, str] | None:
    kinds = [shape for _, _, shape in scene.objects]
    unique = [s for s in SHAPES if kinds.count(s) == 1]
    if not unique:
        return None
    shape = unique[rng.integers(len(unique))]
    return f"What color is the {shape}?", next(c for _, c, s in scene.objects if s == shape)


def _ask_presence(scene: Scene, rng: np.random.Generator) -> tuple[str, str] | None:
    """POPE's question for a shape present or absent by a coin flip; None if the scene has no such shape."""
    present = {shape for _, _, shape in scene.objects}
    yes = rng.random() < 0.5
    pool = [shape for shape in SHAPES if (shape in present) == yes]
    if not pool:
        return None
    return _presence_question(pool[rng.integers(len(pool))], yes)


def _presence_question(shape: str, yes: bool) -> tuple[str, str]:
    return f"Is there a {shape} in the image?", "yes" if yes else "no"


def _count_scene(rng: np.random.Generator) -> tuple[Scene, tuple[str, str]]:
    """A scene with 1-3 (uniform) objects of a target colour, and the question about it."""
    names = list(COLORS)
    target = names[rng.integers(len(names))]
    count = int(COUNTS[rng.integers(len(COUNTS))])
    others = [c for c in names if c != target]
    total = int(rng.integers(max(3, count), 7))
    colours = [target] * count + [others[rng.integers(len(others))] for _ in range(total - count)]
    colours = [colours[i] for i in rng.permutation(total)]
    return random_scene(rng, colours), (f"How many {target} shapes are there?", str(count))


def _ask_text(scene: Scene) -> tuple[str, str]:
    return "What letter is written in the image?", scene.letter


def sample(rng: np.random.Generator, family: str) -> Sample:
    """One question of `family` about a fresh scene drawn from `rng`."""
    if family in ("color", "presence"):
        ask = _ask_color if family == "color" else _ask_presence
        while True:
            scene = random_scene(rng)
            asked = ask(scene, rng)
            if asked is not None:
                return Sample(scene, family, *asked)
    if family == "count":
        scene, asked = _count_scene(rng)
        return Sample(scene, family, *asked)
    if family == "text":
        scene = random_scene(rng)
        return Sample(scene, family, *_ask_text(scene))
    raise ValueError(f"unknown family {family!r}; valid: {', '.join(FAMILIES)}")


def _balanced_colours(rng: np.random.Generator) -> list[str]:
    """The objects' colours for a training scene: groups of one colour each, of 1-3 objects drawn
    uniformly, added until the scene has 3-6 objects (stopping by a coin flip from 3 on). Every
    colour present then appears 1, 2 or 3 times with about equal odds, as the held-out count
    questions' answers do (colours drawn independently answer "1" three times in five)."""
    while True:
        sizes: list[int] = []
        while not sizes or sum(sizes) < 3 or (sum(sizes) < 6 and rng.random() >= 0.5):
            sizes.append(int(COUNTS[rng.integers(len(COUNTS))]))
        if sum(sizes) <= 6 and len(sizes) <= len(COLORS):
            break
    names = rng.permutation(list(COLORS))
    colours = [str(names[group]) for group, size in enumerate(sizes) for _ in range(size)]
    return [colours[i] for i in rng.permutation(len(colours))]


def conversation(rng: np.random.Generator) -> list[Sample]:
    """Every question the scene answers, in random order: a multi-turn training conversation (LLaVA's
    instruction data asks several questions per image). The count of every colour present, the
    colour of every unique shape, the presence of every shape, and the letter."""
    scene = random_scene(rng, _balanced_colours(rng))
    colours = [c for _, c, _ in scene.objects]
    turns = [
        Sample(scene, "count", f"How many {c} shapes are there?", str(colours.count(c)))
        for c in dict.fromkeys(colours)  # 1-3 each, by `_balanced_colours`
    ]
    kinds = [s for _, _, s in scene.objects]
    turns += [
        Sample(scene, "color", f"What color is the {s}?", next(c for _, c, k in scene.objects if k == s))
        for s in SHAPES
        if kinds.count(s) == 1
    ]
    turns += [Sample(scene, "presence", *_presence_question(s, s in kinds)) for s in SHAPES]
    turns.append(Sample(scene, "text", *_ask_text(scene)))
    return [turns[i] for i in rng.permutation(len(turns))]


def split(seed: int, per_family: int) -> list[Sample]:
    """`per_family` questions of each family, interleaved, from `seed` (one RNG per family)."""
    streams = [np.random.default_rng([seed, i]) for i in range(len(FAMILIES))]
    return [sample(streams[f], family) for _ in range(per_family) for f, family in enumerate(FAMILIES)]


def write_dataset(path: Path, seed: int, per_family: int) -> Path:
    """Write `split(seed, per_family)` to the parquet file `path`; return `path`.

    Columns question_id, image, question, answer, family, with `image` a `datasets` Image feature
    (struct of PNG bytes and path), as in hub VQA datasets, so lmms-eval's parquet loader gives
    PIL images. Written to a temporary file in the same folder and renamed, so a killed write
    never leaves a half file (and concurrent writers of the same split are harmless).
    """
    from datasets import Dataset, Features, Image, Value
    from datasets.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )
    from PIL import Image as PILImage

    samples = split(seed, per_family)
    features = Features(
        {"question_id": Value("string"), "image": Image(), "question": Value("string"),
         "answer": Value("string"), "family": Value("string")}
    )
    dataset = Dataset.from_dict(
        {
            "question_id": [f"vtcshapes-{i:05d}" for i in range(len(samples))],
            "image": [PILImage.fromarray(s.scene.render()) for s in samples],
            "question": [s.question for s in samples],
            "answer": [s.answer for s in samples],
            "family": [s.family for s in samples],
        },
        features=features,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    quiet = are_progress_bars_disabled()
    disable_progress_bars()  # one file of 500 rows: no progress bar in a benchmark's output
    try:
        dataset.to_parquet(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    finally:
        if not quiet:
            enable_progress_bars()
    return path


def cache_dir() -> Path:
    """`$VTCBENCH_CACHE`, default `~/.cache/vtcbench`."""
    return Path(os.environ.get("VTCBENCH_CACHE") or Path.home() / ".cache" / "vtcbench").expanduser()


def default_dataset() -> Path:
    """The held-out split as parquet in the cache, written on first use and reused afterwards."""
    path = cache_dir() / "vtcshapes" / f"v{VERSION}-seed{TEST_SEED}-n{TEST_PER_FAMILY}" / "vtcshapes.parquet"
    return path if path.is_file() else write_dataset(path, TEST_SEED, TEST_PER_FAMILY)
