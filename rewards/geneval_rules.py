"""GenEval's rules, from per-class detections to decisions: pure functions, no models.

Restated from two official sources, each function naming the one it restates:

- GenEval's evaluator, djghosh13/geneval @ af4902f24d3ca90ebbb446dd9891a59e0f82725f,
  ``evaluation/evaluate_images.py`` (``evaluate_image``, ``evaluate``, ``relative_position``, ``compute_iou``): the
  0/1 accuracy papers report (:func:`geneval_correct`);
- the reward server that Flow-GRPO, TempFlow-GRPO and DiffusionNFT train on, yifan123/reward-server @
  92ac29fb322c028f8840db8f93c950422931710d, ``reward_server/gen_eval.py`` (``evaluate_reward``; DiffusionNFT's
  in-process ``flow_grpo/gen_eval.py`` @ 24af555 is the same code): the partial credit those runs train on, its
  ``scores`` (:func:`partial_credit`).

The two differ, and each function follows its source:

- an include clause ``{"class", "count"}`` holds in GenEval when *at least* ``count`` objects are found (the
  ``count`` most confident ones are checked for colour and position); the server's credit compares the number found
  with ``count`` *exactly*, ``1 − |count − found| / count`` per clause, which is negative when more than twice
  ``count`` are found (e.g. three cats for "a photo of a cat" give −1);
- GenEval applies ``exclude`` clauses (counting prompts: "fewer than count + 1"); the server's credit ignores them;
- a failed position check adds a 0 and then a 1 to the server's list of credits (its loop appends 1 after the pair
  loop whether or not a pair failed), so a position prompt whose two objects are found once each scores 0.75, not
  2/3, when they stand the wrong way round;
- the server also returns a ``strict_correct`` flag (every clause met exactly); it is not built here.

Both sources share the selection of detections (:func:`select_detections`) and the thresholds of
:class:`GenEvalThresholds`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

OBJECT_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
"""GenEval's 80 object classes (``evaluation/object_names.txt``, identical in the reward server): COCO's, in
mmdetection's order, with three renamed (mmdetection's ``mouse``, ``remote``, ``keyboard``)."""

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
"""The colours GenEval's zero-shot classifier chooses from (``COLORS`` in both sources)."""

RELATIONS = ("left of", "right of", "above", "below")


@dataclass(frozen=True)
class GenEvalThresholds:
    """The constants of both sources (``THRESHOLD``, ``COUNTING_THRESHOLD``, ``MAX_OBJECTS``, ``NMS_THRESHOLD``,
    ``POSITION_THRESHOLD``; GenEval's defaults, which the reward server hard-codes).

    Args:
        detection (float, default 0.3): a detection counts when its score is above this...
        counting (float, default 0.9): ...or above this for prompts tagged ``counting``.
        max_objects (int, default 16): detections kept per class, most confident first.
        nms (float, default 1.0): drop a detection whose box overlaps a more confident one of its class by this
            IoU or more; 1 turns it off (both sources run with it off).
        position_margin (float, default 0.1): share of both objects' sizes that a centre offset must exceed
            before it counts as a direction.
    """

    detection: float = 0.3
    counting: float = 0.9
    max_objects: int = 16
    nms: float = 1.0
    position_margin: float = 0.1

    def __post_init__(self):
        for field, value in (("detection_threshold", self.detection), ("counting_threshold", self.counting)):
            if not 0 <= value < 1:
                raise ValueError(f"{field}: a detection score threshold in [0, 1), not {value!r}")
        if not isinstance(self.max_objects, int) or self.max_objects < 1:
            raise ValueError(f"max_objects: expected a positive integer, not {self.max_objects!r}")
        if not self.nms > 0 or not self.position_margin >= 0:
            raise ValueError(f"nms_threshold must be positive and position_margin non-negative, not "
                             f"{self.nms!r} and {self.position_margin!r}")

    def confidence(self, tag: str) -> float:
        """The score a detection must exceed for a prompt of this ``tag``."""
        return self.counting if tag == "counting" else self.detection


@dataclass(frozen=True, eq=False)
class Detection:
    """One detected object: its box ``(x1, y1, x2, y2)`` in pixels (``x2``, ``y2`` one past the last pixel, as
    mmdetection derives boxes from masks), its score, and its mask (bool ``[H, W]``, or None)."""

    box: tuple[float, float, float, float]
    score: float
    mask: np.ndarray | None = None


Detections = dict[str, list[Detection]]
"""GenEval class name → the kept detections of that class, most confident first (absent: none kept)."""

ClassifyColors = Callable[[Sequence[Detection], str], list[str]]
"""``(detections of one class, class name) → one colour of COLORS per detection``."""


def box_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """GenEval's ``compute_iou``: intersection over union with the ``+1`` pixel convention of inclusive boxes."""

    def area(x1, y1, x2, y2):
        return max(x2 - x1 + 1, 0) * max(y2 - y1 + 1, 0)

    intersection = area(max(box_a[0], box_b[0]), max(box_a[1], box_b[1]),
                        min(box_a[2], box_b[2]), min(box_a[3], box_b[3]))
    union = area(*box_a[:4]) + area(*box_b[:4]) - intersection
    return intersection / union if union else 0.0


def select_class(candidates: Sequence[Detection], threshold: float, max_objects: int, nms: float) -> list[Detection]:
    """One class's detections as GenEval keeps them: scores strictly above ``threshold``, most confident first, the
    first ``max_objects``, then greedy NMS (a detection survives when its IoU with every kept, more confident one
    is below ``nms``; ``nms >= 1`` keeps all)."""
    ranked = sorted((d for d in candidates if d.score > threshold), key=lambda d: d.score, reverse=True)
    kept: list[Detection] = []
    for detection in ranked[:max_objects]:
        if nms >= 1 or all(box_iou(detection.box, k.box) < nms for k in kept):
            kept.append(detection)
    return kept


def select_detections(candidates: Mapping[str, Sequence[Detection]], tag: str,
                      thresholds: GenEvalThresholds = GenEvalThresholds()) -> Detections:
    """Every class's kept detections (``evaluate_image``'s loop over classes); classes with none are left out."""
    threshold = thresholds.confidence(tag)
    selected = {name: select_class(found, threshold, thresholds.max_objects, thresholds.nms)
                for name, found in candidates.items()}
    return {name: found for name, found in selected.items() if found}


def relative_position(box_a: Sequence[float], box_b: Sequence[float], margin: float) -> set[str]:
    """Where box A lies relative to box B (GenEval's ``relative_position``): the offset between their centres,
    shrunk on each axis by ``margin`` times the sum of both boxes' sizes on that axis (and clipped at 0), divided by
    the unshrunk offset's length; a component below −0.5 / above 0.5 is "left of" / "right of" (x) or "above" /
    "below" (y, image rows grow downwards). Boxes whose shrunk offset vanishes have no relation."""
    corners = np.array([box_a[:4], box_b[:4]], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = corners.mean(axis=1)
    size_a, size_b = np.abs(corners[:, 1] - corners[:, 0])
    offset = center_a - center_b
    shrunk = np.sign(offset) * np.maximum(np.abs(offset) - margin * (size_a + size_b), 0)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    named = {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}
    return {relation for relation, holds in named.items() if holds}


def _stands(found: Sequence[Detection], targets: Sequence[Detection], relation: str, margin: float) -> bool:
    """Every found object stands in ``relation`` to every target object."""
    return all(relation in relative_position(a.box, b.box, margin) for a in found for b in targets)


def geneval_correct(detections: Detections, metadata: Mapping, classify_colors: ClassifyColors,
                    margin: float = GenEvalThresholds.position_margin) -> bool:
    """GenEval's accuracy of one image (``evaluate``): every include clause holds — at least ``count`` objects of
    its class, the ``count`` most confident of them all of its ``color`` and all in its ``position`` relative to
    every object of the clause it names (which must itself have held) — and no exclude clause holds (``count`` or
    more objects of its class)."""
    held_groups: list[list[Detection] | None] = []
    correct = True
    for clause in metadata.get("include", []):
        name, count = clause["class"], clause["count"]
        found = detections.get(name, [])[:count]
        holds = len(found) >= count
        if holds and "color" in clause:
            holds = classify_colors(found, name).count(clause["color"]) >= count
        if holds and "position" in clause:
            relation, group = clause["position"]
            targets = held_groups[group]
            holds = targets is not None and _stands(found, targets, relation, margin)
        held_groups.append(found if holds else None)
        correct = correct and holds
    excluded = any(len(detections.get(c["class"], [])) >= c["count"] for c in metadata.get("exclude") or [])
    return correct and not excluded


def count_credit(expected: int, found: int) -> float:
    """The reward server's credit for finding ``found`` where ``expected`` were asked: ``1 − |expected − found| /
    expected`` (1 when equal, negative past twice ``expected``)."""
    return 1 - abs(expected - found) / expected


def partial_credit(detections: Detections, metadata: Mapping, classify_colors: ClassifyColors,
                   margin: float = GenEvalThresholds.position_margin) -> float:
    """The reward server's training reward of one image (``evaluate_reward``): the mean of one credit per include
    clause for its count (all objects found, not only the ``count`` most confident), plus, for a clause with a
    colour or a position, a credit for it: 0 when the count is off; else the colour's :func:`count_credit` over the
    found objects' colours, and for the position 1 when it holds, 0 when the target clause did not hold, and 0 *and*
    1 when a pair stands the wrong way (the server's quirk). A clause holds when its count, colours and position are
    all exact; exclude clauses are not read. No include clause: 0."""
    credits: list[float] = []
    held_groups: list[list[Detection] | None] = []
    for clause in metadata.get("include", []):
        name, count = clause["class"], clause["count"]
        found = detections.get(name, [])
        credits.append(count_credit(count, len(found)))
        holds = len(found) == count
        if not holds and ("color" in clause or "position" in clause):
            credits.append(0.0)
        if holds and "color" in clause:
            matching = classify_colors(found, name).count(clause["color"])
            credits.append(count_credit(count, matching))
            holds = matching == count
        if holds and "position" in clause:
            relation, group = clause["position"]
            targets = held_groups[group]
            holds = targets is not None and _stands(found, targets, relation, margin)
            if targets is None:
                credits.append(0.0)
            else:
                credits.extend([1.0] if holds else [0.0, 1.0])
        held_groups.append(found if holds else None)
    return sum(credits) / len(credits) if credits else 0.0


def check_metadata(metadata: Mapping) -> None:
    """Raise ``ValueError`` naming the first problem of a GenEval prompt row: a missing ``tag`` or ``include``, a
    clause without ``class`` / ``count``, a class or colour GenEval does not know, a relation other than GenEval's
    four, or a position naming a clause that does not come before it."""
    for key in ("tag", "include"):
        if metadata.get(key) is None:
            raise ValueError(f"the row has no `{key}` (GenEval rows carry `tag`, `include` and, for counting, "
                             "`exclude`)")
    include, exclude = metadata["include"], metadata.get("exclude") or []
    if not isinstance(include, list) or not include or not isinstance(exclude, list):
        raise ValueError("`include` must be a non-empty list of clauses and `exclude` a list")
    for key, clauses in (("include", include), ("exclude", exclude)):
        for index, clause in enumerate(clauses):
            _check_clause(clause, f"{key}[{index}]", index if key == "include" else None)


def _check_clause(clause, where: str, index: int | None) -> None:
    if not isinstance(clause, Mapping) or "class" not in clause or "count" not in clause:
        raise ValueError(f"{where} must be an object with `class` and `count`")
    if clause["class"] not in OBJECT_NAMES:
        raise ValueError(f"{where}: {clause['class']!r} is not one of GenEval's 80 object classes")
    if not isinstance(clause["count"], int) or isinstance(clause["count"], bool) or clause["count"] < 1:
        raise ValueError(f"{where}: `count` must be a positive integer, not {clause['count']!r}")
    if "color" in clause and clause["color"] not in COLORS:
        raise ValueError(f"{where}: colour {clause['color']!r} is not one of GenEval's {', '.join(COLORS)}")
    if "position" in clause:
        position = clause["position"]
        if (not isinstance(position, Sequence) or len(position) != 2 or position[0] not in RELATIONS
                or not isinstance(position[1], int) or index is None or not 0 <= position[1] < index):
            raise ValueError(f"{where}: `position` must be [relation, index of an earlier include clause] with a "
                             f"relation of {', '.join(RELATIONS)}, not {position!r}")
