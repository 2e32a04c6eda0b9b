"""ShapesWorld scenes and prompts: the vocabulary, the GenEval-style prompt sampler, the scene renderer and
the shipped prompt sets.

A scene is 1–4 solid, axis-aligned shapes (square, circle, upright triangle) in six well-separated colours on
a light-gray background, drawn without antialiasing at 64x64. Every prompt comes with a JSON-serialisable
``spec`` — ``{"task", "objects": [{"shape", "color", "count"}], "relation"}`` — that the detector
(:mod:`tempflow.shapes.detector`) scores an image against; ``relation`` (or ``None``) reads
"``objects[0]`` is <relation> ``objects[1]``". The six tasks follow GenEval; every prompt names the colours
(the renderer needs them), and the colour-tested tasks use the "<shape> that is <colour>" phrasing so that no
prompt string belongs to two tasks:

=============  ====================================================  =========================================
task           example prompt                                        constraint
=============  ====================================================  =========================================
single_object  a photo of a red circle                               one object
two_objects    a photo of a red circle and a blue square             two different shapes, any colours
counting       a photo of three green triangles                      2–4 copies of one coloured shape
colors         a photo of a square that is yellow                    one object, the colour is the attribute
position       a photo of a red circle to the left of a blue square  two different coloured shapes, a relation
color_attr     a photo of a circle that is red and a triangle ...    different shapes and different colours
=============  ====================================================  =========================================
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("square", "circle", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 200, 30),
    "purple": (170, 50, 200),
    "cyan": (40, 200, 210),
}
BACKGROUND = (240, 240, 240)
TASKS = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
MAX_OBJECTS = 4  # per scene
_RELATION_PHRASES = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}

# Layout geometry at 64 px (scaled for other sizes): object side, the empty gap kept between bounding boxes
# (so that same-coloured objects never touch, even after a generative model blurs them) and the border margin.
MIN_OBJECT_SIZE, MAX_OBJECT_SIZE = 10, 20
OBJECT_GAP = 4
BORDER = 2

DATA_DIR = Path(__file__).parent / "data"


def _words_of_templates() -> list[str]:
    fixed = "a photo of and that is".split()
    relation_words = [word for phrase in _RELATION_PHRASES.values() for word in phrase.split()]
    shape_words = list(SHAPES) + [shape + "s" for shape in SHAPES]
    return list(
        dict.fromkeys(fixed + relation_words + list(COUNT_WORDS.values()) + list(COLORS) + shape_words)
    )


VOCABULARY: tuple[str, ...] = tuple(_words_of_templates())
"""Every word that can appear in a ShapesWorld prompt (lower case, space separated, no punctuation)."""


# ---------------------------------------------------------------------------------------------------- prompts


def _object(shape: str, color: str, count: int = 1) -> dict:
    return {"shape": shape, "color": color, "count": count}


def prompt_for_spec(spec: dict) -> str:
    """The prompt string of a spec (deterministic: a spec has exactly one phrasing)."""
    task, objects = spec["task"], spec["objects"]
    first = objects[0]
    if task == "single_object":
        return f"a photo of a {first['color']} {first['shape']}"
    if task == "colors":
        return f"a photo of a {first['shape']} that is {first['color']}"
    if task == "counting":
        return f"a photo of {COUNT_WORDS[first['count']]} {first['color']} {first['shape']}s"
    second = objects[1]
    if task == "two_objects":
        return f"a photo of a {first['color']} {first['shape']} and a {second['color']} {second['shape']}"
    if task == "color_attr":
        first_clause = f"a {first['shape']} that is {first['color']}"
        return f"a photo of {first_clause} and a {second['shape']} that is {second['color']}"
    if task == "position":
        relation = _RELATION_PHRASES[spec["relation"]]
        return (
            f"a photo of a {first['color']} {first['shape']} {relation} a {second['color']} {second['shape']}"
        )
    raise ValueError(f"unknown ShapesWorld task {task!r}")


def all_specs(task: str) -> list[dict]:
    """Every spec of a task, in a fixed order (the prompt space is finite and small)."""
    relation = None
    if task in ("single_object", "colors"):
        objects = [[_object(s, c)] for s in SHAPES for c in COLORS]
    elif task == "counting":
        objects = [[_object(s, c, n)] for n in COUNT_WORDS for s in SHAPES for c in COLORS]
    elif task in ("two_objects", "color_attr"):
        objects = [
            [_object(s1, c1), _object(s2, c2)]
            for s1, s2 in itertools.permutations(SHAPES, 2)
            for c1, c2 in itertools.product(COLORS, repeat=2)
            if task == "two_objects" or c1 != c2
        ]
    elif task == "position":
        singles = [(s, c) for s in SHAPES for c in COLORS]
        return [
            {"task": task, "objects": [_object(*a), _object(*b)], "relation": relation}
            for relation in RELATIONS
            for a, b in itertools.permutations(singles, 2)
        ]
    else:
        raise ValueError(f"unknown ShapesWorld task {task!r}; tasks: {', '.join(TASKS)}")
    return [{"task": task, "objects": group, "relation": relation} for group in objects]


def sample_prompt(rng, task: str | None = None) -> dict:
    """A random ``{"prompt", "spec"}`` (task uniform unless given); ``rng``: a numpy Generator or a seed."""
    rng = np.random.default_rng(rng)
    task = task or TASKS[rng.integers(len(TASKS))]
    specs = all_specs(task)
    spec = specs[rng.integers(len(specs))]
    return {"prompt": prompt_for_spec(spec), "spec": spec}


# ----------------------------------------------------------------------------------------------------- scenes


def _boxes_apart(a: tuple, b: tuple, gap: float) -> bool:
    """Whether two (x0, y0, side) boxes are separated by at least ``gap`` pixels along some axis."""
    ax, ay, asz = a
    bx, by, bsz = b
    return ax + asz + gap <= bx or bx + bsz + gap <= ax or ay + asz + gap <= by or by + bsz + gap <= ay


def _relation_holds(a: tuple, b: tuple, relation: str, gap: float) -> bool:
    """``a`` clearly <relation> ``b``: its box is wholly on that side, and that axis dominates the offset."""
    (ax, ay, asz), (bx, by, bsz) = a, b
    dx = (bx + bsz / 2) - (ax + asz / 2)  # > 0: a is left of b
    dy = (by + bsz / 2) - (ay + asz / 2)  # > 0: a is above b (image rows grow downwards)
    if relation == "left of":
        return ax + asz + gap <= bx and abs(dy) < abs(dx)
    if relation == "right of":
        return bx + bsz + gap <= ax and abs(dy) < abs(dx)
    if relation == "above":
        return ay + asz + gap <= by and abs(dx) < abs(dy)
    if relation == "below":
        return by + bsz + gap <= ay and abs(dx) < abs(dy)
    raise ValueError(f"unknown relation {relation!r}; relations: {', '.join(RELATIONS)}")


def sample_layout(spec: dict, rng, size: int = 64, max_tries: int = 1000) -> list[dict]:
    """Random non-overlapping placements satisfying ``spec``: ``[{"shape", "color", "x0", "y0", "side"}]``."""
    rng = np.random.default_rng(rng)
    scale = size / 64
    instances = [(o["shape"], o["color"]) for o in spec["objects"] for _ in range(o["count"])]
    low, high = round(MIN_OBJECT_SIZE * scale), round(MAX_OBJECT_SIZE * scale)
    gap, border = OBJECT_GAP * scale, round(BORDER * scale)
    for _ in range(max_tries):
        boxes = []
        for _ in instances:
            side = int(rng.integers(low, high + 1))
            x0, y0 = (int(v) for v in rng.integers(border, size - border - side + 1, size=2))
            box = (x0, y0, side)
            if not all(_boxes_apart(box, other, gap) for other in boxes):
                break
            boxes.append(box)
        else:
            if spec.get("relation") is None or _relation_holds(boxes[0], boxes[1], spec["relation"], gap):
                return [
                    {"shape": shape, "color": color, "x0": x0, "y0": y0, "side": side}
                    for (shape, color), (x0, y0, side) in zip(instances, boxes)
                ]
    raise RuntimeError(f"could not lay out {spec} in {max_tries} tries")


def draw_layout(layout: list[dict], size: int = 64) -> np.ndarray:
    """Draw a layout as ``[H, W, 3]`` uint8, aliased: hard edges keep the fill ratios telling shapes apart."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for item in layout:
        x0, y0, last = item["x0"], item["y0"], item["side"] - 1
        color = COLORS[item["color"]]
        if item["shape"] == "square":
            draw.rectangle([x0, y0, x0 + last, y0 + last], fill=color)
        elif item["shape"] == "circle":
            draw.ellipse([x0, y0, x0 + last, y0 + last], fill=color)
        elif item["shape"] == "triangle":
            draw.polygon([(x0 + last / 2, y0), (x0 + last, y0 + last), (x0, y0 + last)], fill=color)
        else:
            raise ValueError(f"unknown shape {item['shape']!r}")
    return np.asarray(image, dtype=np.uint8).copy()


def render_scene(spec: dict, rng, size: int = 64) -> np.ndarray:
    """A random rendering of ``spec`` as an ``[size, size, 3]`` uint8 array."""
    return draw_layout(sample_layout(spec, rng, size), size)


# ------------------------------------------------------------------------------------------------ prompt sets


def _balanced(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def make_prompt_sets(
    seed: int = 0, n_train: int = 2000, n_eval: int = 200, out_dir: str | Path | None = None
) -> dict[str, Path]:
    """Write the fixed ``train.jsonl`` and ``eval.jsonl`` prompt sets (balanced over the six tasks).

    Per task, a third of the prompt space (at most that task's share of ``n_eval``) is held out for eval and
    never appears in train. The single-object, colour and counting spaces are small (18, 18, 54 prompts), so
    their eval entries repeat their held-out prompts; train repeats prompts too, spread evenly.
    """
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir) if out_dir is not None else DATA_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    train, evaluation = [], []
    for task, n_task_train, n_task_eval in zip(
        TASKS, _balanced(n_train, len(TASKS)), _balanced(n_eval, len(TASKS))
    ):
        specs = all_specs(task)
        order = rng.permutation(len(specs))
        n_held_out = min(n_task_eval, len(specs) // 3)
        held_out, rest = [specs[i] for i in order[:n_held_out]], [specs[i] for i in order[n_held_out:]]
        evaluation += [held_out[i % n_held_out] for i in range(n_task_eval)]
        while n_task_train > 0:
            take = min(n_task_train, len(rest))
            train += [rest[i] for i in rng.permutation(len(rest))[:take]]
            n_task_train -= take
    train = [train[i] for i in rng.permutation(len(train))]
    paths = {}
    for name, specs in (("train", train), ("eval", evaluation)):
        paths[name] = out_dir / f"{name}.jsonl"
        lines = [json.dumps({"prompt": prompt_for_spec(spec), "spec": spec}) for spec in specs]
        paths[name].write_text("\n".join(lines) + "\n")
    return paths


def load_prompt_set(name: str) -> list[dict]:
    """The shipped prompt set ``"train"`` or ``"eval"``: a list of ``{"prompt": str, "spec": dict}``."""
    if name not in ("train", "eval"):
        raise ValueError(f"unknown ShapesWorld prompt set {name!r}; choose 'train' or 'eval'")
    with open(DATA_DIR / f"{name}.jsonl") as file:
        return [json.loads(line) for line in file if line.strip()]


if __name__ == "__main__":
    for set_name, set_path in make_prompt_sets().items():
        print(set_name, set_path)
