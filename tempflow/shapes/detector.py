"""The ShapesWorld detector: finds the coloured shapes in an image and scores it against a prompt spec.

Detection: every pixel takes the nearest of the palette colours and a few neutral anchors (background, white,
gray, black) and keeps a palette colour only within :data:`COLOR_TOLERANCE` of it, which tolerates the blur,
colour drift and noise of a generative model; each colour mask is hole-filled and split into connected
components; components outside ``[MIN_AREA, MAX_AREA]`` are dropped (specks of noise; a flood of one colour
is background, not an object); the shape is read from the fill ratio of the component in its bounding box
(square ≈ 1, circle ≈ π/4, upright triangle ≈ 1/2), helped for blurred triangles by their low centroid.
Images of any size are analysed at 128x128 and reported in 64x64 pixels.

Scoring: :func:`strict_score` is GenEval-style 0/1 and, by default, stricter than GenEval: the scene must hold
exactly the requested objects — exact count of each requested (shape, colour), *no other object*, and the
relation satisfied by the centroids. Extra objects fail it because on a plain background every blob is a
drawn object, and because otherwise "draw every shape in every colour" would pass single-object prompts;
``allow_extra=True`` gives GenEval's rule (at least the requested count, extra objects ignored, except that
counting stays exact). :func:`partial_score` is a graded reward in [0, 1] for RL.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

from .world import BACKGROUND, COLORS

DETECTION_SIZE = 64  # the frame of reported centroids, areas and of the constants below
ANALYSIS_SIZE = 128
COLOR_TOLERANCE = 100.0  # RGB distance; the closest two palette colours are 130 apart
MIN_AREA = 16  # px at 64x64; the smallest drawn triangle covers ~50
MAX_AREA = 1024  # a quarter of the image; the largest drawn square covers 400
SQUARE_MIN_FILL, CIRCLE_MIN_FILL, TRIANGLE_MIN_FILL = 0.83, 0.6, 0.3
TRIANGLE_MIN_DROP = 0.05  # centroid below the box centre, in box heights
MAX_ASPECT = 2.5  # longer-than-wide streaks are no shape of this world
RELATION_MARGIN = 3.0  # px between centroids for a strict relation
RELATION_RAMP = 8.0  # px between centroids for full relation credit in partial_score

# Partial credit for a requested object found with only its colour, or only its shape, right.
COLOR_ONLY_CREDIT, SHAPE_ONLY_CREDIT = 0.5, 0.25
SPURIOUS_WEIGHT = 0.5  # each unrequested object counts as half a missing one
RELATION_WEIGHT = 0.4

_COLOR_NAMES = list(COLORS)
_ANCHORS = np.array(
    list(COLORS.values()) + [BACKGROUND, (255, 255, 255), (128, 128, 128), (0, 0, 0)], dtype=np.float32
)


def _as_analysis_array(image) -> np.ndarray:
    """The image resampled to ``ANALYSIS_SIZE``: upsampling a 64 px image interpolates its partly covered edge
    pixels, so the colour threshold finds sub-pixel outlines and the fill ratios of small shapes stay true."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] < 3:
        raise TypeError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    pil = Image.fromarray(np.ascontiguousarray(image[..., :3]))
    if pil.size != (ANALYSIS_SIZE, ANALYSIS_SIZE):
        resample = Image.Resampling.BOX if pil.width > ANALYSIS_SIZE else Image.Resampling.BILINEAR
        pil = pil.resize((ANALYSIS_SIZE, ANALYSIS_SIZE), resample)
    return np.asarray(pil, dtype=np.float32)


def _classify_shape(fill: float, aspect: float, centroid_drop: float) -> str:
    """Shape from the fill ratio of the bounding box; blur erodes a triangle's tip (raising its fill ratio
    towards a circle's), so a centroid sitting below the box centre (by h/6 when sharp) says triangle too."""
    if aspect > MAX_ASPECT or fill < TRIANGLE_MIN_FILL:
        return "unknown"
    if fill < CIRCLE_MIN_FILL or centroid_drop >= TRIANGLE_MIN_DROP:
        return "triangle"
    return "square" if fill >= SQUARE_MIN_FILL else "circle"


def detect(image) -> list[dict]:
    """The objects in a uint8 ``[H, W, 3]`` image: ``[{"shape", "color", "cx", "cy", "area"}]``.

    Centroids and areas are in pixels of the 64x64 detection frame; ``shape`` may be ``"unknown"``.
    """
    pixels = _as_analysis_array(image)
    upscale = ANALYSIS_SIZE / DETECTION_SIZE
    flat = pixels.reshape(-1, 3)
    # squared distances to the anchors, less the per-pixel constant |pixel|² (added back for the tolerance)
    shifted = (_ANCHORS**2).sum(1) - 2 * flat @ _ANCHORS.T
    nearest = shifted.argmin(1)
    squared_distance = shifted[np.arange(len(flat)), nearest] + (flat**2).sum(1)
    nearest[squared_distance > COLOR_TOLERANCE**2] = -1
    nearest = nearest.reshape(pixels.shape[:2])
    detections = []
    for color_index, color in enumerate(_COLOR_NAMES):
        mask = nearest == color_index
        if mask.sum() < MIN_AREA * upscale**2:
            continue
        mask = ndimage.binary_fill_holes(mask)
        labels, _ = ndimage.label(mask)
        for label, (rows, cols) in enumerate(ndimage.find_objects(labels), start=1):
            component = labels[rows, cols] == label
            area = component.sum() / upscale**2
            if not MIN_AREA <= area <= MAX_AREA:
                continue
            height, width = component.shape
            ys, xs = np.nonzero(component)
            detections.append(
                {
                    "shape": _classify_shape(
                        component.mean(),
                        max(height, width) / min(height, width),
                        (ys.mean() - (height - 1) / 2) / height,
                    ),
                    "color": color,
                    "cx": float((cols.start + xs.mean() + 0.5) / upscale - 0.5),
                    "cy": float((rows.start + ys.mean() + 0.5) / upscale - 0.5),
                    "area": float(area),
                }
            )
    return detections


def _relation_offset(a: dict, b: dict, relation: str) -> float:
    """Signed centroid offset along the relation's axis; positive when ``a`` is <relation> ``b``."""
    if relation == "left of":
        return b["cx"] - a["cx"]
    if relation == "right of":
        return a["cx"] - b["cx"]
    if relation == "above":
        return b["cy"] - a["cy"]
    if relation == "below":
        return a["cy"] - b["cy"]
    raise ValueError(f"unknown relation {relation!r}")


def _matches(detection: dict, wanted: dict) -> bool:
    return detection["shape"] == wanted["shape"] and detection["color"] == wanted["color"]


def strict_score(image, spec: dict, allow_extra: bool = False, detections: list[dict] | None = None) -> float:
    """1.0 when the image shows ``spec`` (see the module docstring for the rule), else 0.0."""
    detections = detect(image) if detections is None else detections
    found = [[d for d in detections if _matches(d, wanted)] for wanted in spec["objects"]]
    for wanted, hits in zip(spec["objects"], found):
        exact = not allow_extra or spec["task"] == "counting"
        if len(hits) < wanted["count"] or (exact and len(hits) > wanted["count"]):
            return 0.0
    if not allow_extra and sum(len(hits) for hits in found) != len(detections):
        return 0.0
    relation = spec.get("relation")
    if relation is not None:
        pairs = ((a, b) for a in found[0] for b in found[1])
        if not all(_relation_offset(a, b, relation) > RELATION_MARGIN for a, b in pairs):
            return 0.0
    return 1.0


def partial_score(image, spec: dict, detections: list[dict] | None = None) -> float:
    """Partial credit in [0, 1]: requested objects found (graded by colour/shape), spurious objects, relation.

    Each requested instance is matched greedily to a detection of the right shape and colour (credit 1), else
    to a recognised shape of the right colour (``COLOR_ONLY_CREDIT``), else of the right shape
    (``SHAPE_ONLY_CREDIT``); the object term is ``credit / (n_requested + SPURIOUS_WEIGHT * n_unmatched)``,
    n_unmatched counting the detections left over. A relation scales it by
    ``1 - RELATION_WEIGHT + RELATION_WEIGHT * r`` with ``r`` ramping from 0 to 1 as the centroids move
    ``RELATION_RAMP`` px apart the right way. Ground-truth renderings score 1; blank, noise and one-colour
    images score 0.
    """
    detections = detect(image) if detections is None else detections
    unused = list(range(len(detections)))
    credit = 0.0
    first_match: list[dict | None] = [None] * len(spec["objects"])
    needed = [wanted["count"] for wanted in spec["objects"]]
    criteria = (
        (1.0, _matches),
        (COLOR_ONLY_CREDIT, lambda d, w: d["color"] == w["color"] and d["shape"] != "unknown"),
        (SHAPE_ONLY_CREDIT, lambda d, w: d["shape"] == w["shape"]),
    )
    for value, criterion in criteria:
        for group, wanted in enumerate(spec["objects"]):
            for index in [i for i in unused if criterion(detections[i], wanted)][: needed[group]]:
                unused.remove(index)
                needed[group] -= 1
                credit += value
                first_match[group] = first_match[group] or detections[index]
    n_requested = sum(wanted["count"] for wanted in spec["objects"])
    score = credit / (n_requested + SPURIOUS_WEIGHT * len(unused))
    relation = spec.get("relation")
    if relation is not None:
        a, b = first_match[0], first_match[1]
        ramp = (
            0.0
            if a is None or b is None
            else float(np.clip(_relation_offset(a, b, relation) / RELATION_RAMP, 0, 1))
        )
        score *= 1 - RELATION_WEIGHT + RELATION_WEIGHT * ramp
    return float(score)
