"""GenEval (Ghosh et al., 2023) in process, with tempflow's own dependencies (no mmcv / mmdetection), registered as
``geneval`` (the reward server's partial credit: what Flow-GRPO, TempFlow-GRPO and DiffusionNFT train on) and
``geneval_strict`` (GenEval's 0/1 accuracy, what papers report). Both read GenEval's prompt rows (``tag``,
``include``, ``exclude``) and decide with :mod:`tempflow.rewards.geneval_rules`.

- **Detector**: a transformers Mask2Former for COCO instance segmentation, by default
  ``facebook/mask2former-swin-small-coco-instance`` — the architecture and training schedule of GenEval's mmdetection
  ``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco`` (Swin-S, 100 queries, 50 epochs of large-scale jitter on COCO),
  trained by Mask2Former's authors in Detectron2 rather than by mmdetection: the weights differ, so its detections, and
  the scores built on them, differ a little from GenEval's. Images are resized as mmdetection's test pipeline does
  (shortest side 800, longest at most 1333) and detections are built as mmdetection's Mask2Former instance head builds
  them (:meth:`Mask2FormerDetector.instances`).
- **Colours**: open-clip ViT-L/14 with OpenAI's weights on each object's mask pasted on a ``#999`` background and
  cropped to its box, classified zero-shot over GenEval's ten colours with its three templates — GenEval's own colour
  model and procedure (:class:`ColorClassifier`).
- **What the official training runs score**: the Flow-GRPO / TempFlow-GRPO client sends JPEGs that Pillow encodes
  at its default quality (75) to the reward server, which hands the decoded RGB arrays to mmdetection; mmdetection
  takes arrays as BGR, so that detector sees red and blue swapped (the colour model gets the RGB image).
  ``jpeg_quality=75, detector_bgr=True`` reproduces both. DiffusionNFT runs the same server code in process on the
  uint8 images, without JPEG: ``detector_bgr=True`` alone. The defaults score what GenEval's evaluator scores (PNG
  files read in the right channel order).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from functools import partial

import numpy as np
import torch

from . import register_reward, to_uint8
from .clip_similarity import OpenClipSimilarity
from .geneval_rules import (
    COLORS,
    OBJECT_NAMES,
    ClassifyColors,
    Detection,
    Detections,
    GenEvalThresholds,
    check_metadata,
    geneval_correct,
    partial_credit,
    select_detections,
)
from .loading import pick_device

DEFAULT_DETECTOR = "facebook/mask2former-swin-small-coco-instance"
MMDET_TEST_SCALE = (800, 1333)
"""Shortest and longest image side of mmdetection's Mask2Former test pipeline (``img_scale=(1333, 800)``,
``keep_ratio=True``), which GenEval's detector config inherits."""

DETECTOR_LABEL_ALIASES = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}
"""COCO class names (mmdetection's, which the COCO Mask2Former checkpoints of transformers carry) that GenEval renamed
in ``object_names.txt``; every other name is the same in both."""

COLOR_TEMPLATES = ("a photo of a {color} {object}", "a photo of a {color}-colored {object}",
                   "a photo of a {color} object")
"""GenEval's zero-shot colour prompts (``color_classification`` in ``evaluate_images.py`` @ af4902f)."""

CROP_BACKGROUND = "#999"
"""Colour outside an object's mask in its colour crop (GenEval's default ``bgcolor``)."""


def geneval_label_names(id2label: Mapping) -> dict[int, str]:
    """A detector's label ids → GenEval's class names (by name, after :data:`DETECTOR_LABEL_ALIASES`; labels that
    name no GenEval class are left out). Raises ``ValueError`` when a GenEval class has no label."""
    names = {}
    for label_id, label in id2label.items():
        name = " ".join(str(label).lower().replace("_", " ").replace("-", " ").split())
        name = DETECTOR_LABEL_ALIASES.get(name, name)
        if name in OBJECT_NAMES:
            names[int(label_id)] = name
    missing = [name for name in OBJECT_NAMES if name not in names.values()]
    if missing:
        raise ValueError(f"detector: its labels (config.id2label) name no {', '.join(missing)}: GenEval needs a COCO "
                         "instance-segmentation checkpoint")
    return names


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Bool masks ``[N, H, W]`` → boxes ``[N, 4]`` ``(x1, y1, x2, y2)`` around each mask's pixels, ``x2`` and ``y2``
    one past the last (mmdetection's ``mask2bbox``); zeros for an empty mask."""
    height, width = masks.shape[-2:]
    columns, rows = masks.any(dim=1), masks.any(dim=2)
    x1 = columns.float().argmax(dim=1)
    x2 = width - columns.flip(1).float().argmax(dim=1)
    y1 = rows.float().argmax(dim=1)
    y2 = height - rows.flip(1).float().argmax(dim=1)
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()
    return boxes * columns.any(dim=1, keepdim=True)


def jpeg_roundtrip(arrays: np.ndarray, quality: int) -> np.ndarray:
    """``[B, H, W, 3]`` uint8 images encoded as JPEG by Pillow at ``quality`` (its other defaults, e.g. 4:2:0 chroma
    subsampling) and decoded back: what the official training client sends and its server reads."""
    from PIL import Image

    decoded = []
    for array in arrays:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        decoded.append(np.asarray(Image.open(buffer).convert("RGB")))
    return np.stack(decoded)


def masked_crop(image, detection: Detection):
    """GenEval's colour crop: the object's mask pasted on a :data:`CROP_BACKGROUND` image, cropped to its box."""
    from PIL import Image

    if detection.mask is not None:
        background = Image.new("RGB", image.size, CROP_BACKGROUND)
        image = Image.composite(image, background, Image.fromarray(detection.mask))
    return image.crop(tuple(detection.box))


class Mask2FormerDetector:
    """A transformers Mask2Former COCO instance-segmentation model that returns, per image, each GenEval class's
    detections scored above ``min_score``.

    Args:
        checkpoint (str): hub id or local directory of the model and its image processor.
        resolution (tuple, optional): ``(shortest, longest)`` side of the resized input; None keeps the processor's.
        bgr (bool): give the model blue-green-red images (the official reward server's channel swap).
        min_score (float): detections at or below it are dropped before the rules see them.
        device, dtype: where and in which precision the model runs (post-processing is float32).
    """

    def __init__(self, checkpoint: str, resolution: Sequence[int] | None, bgr: bool, min_score: float,
                 device: torch.device, dtype: torch.dtype):
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        self.processor = AutoImageProcessor.from_pretrained(checkpoint)
        self.model = Mask2FormerForUniversalSegmentation.from_pretrained(checkpoint).eval().to(device, dtype)
        self.names = geneval_label_names(self.model.config.id2label)
        self.size = None if resolution is None else {"shortest_edge": resolution[0], "longest_edge": resolution[1]}
        self.bgr, self.min_score, self.device, self.dtype = bgr, min_score, device, dtype

    @torch.no_grad()
    def __call__(self, arrays: np.ndarray) -> list[dict[str, list[Detection]]]:
        """``[B, H, W, 3]`` uint8 images → per image, GenEval class name → detections (any order)."""
        images = [array[..., ::-1] if self.bgr else array for array in arrays]
        size = {} if self.size is None else {"size": self.size}
        inputs = self.processor(images=[np.ascontiguousarray(image) for image in images], return_tensors="pt", **size)
        outputs = self.model(pixel_values=inputs["pixel_values"].to(self.device, self.dtype),
                             pixel_mask=inputs["pixel_mask"].to(self.device))
        input_size, image_size = tuple(inputs["pixel_values"].shape[-2:]), tuple(arrays.shape[1:3])
        return [self.instances(class_logits, mask_logits, input_size, image_size)
                for class_logits, mask_logits in zip(outputs.class_queries_logits, outputs.masks_queries_logits)]

    def instances(self, class_logits: torch.Tensor, mask_logits: torch.Tensor, input_size: tuple[int, int],
                  image_size: tuple[int, int]) -> dict[str, list[Detection]]:
        """One image's detections as mmdetection's Mask2Former builds them (``MaskFormerFusionHead
        .instance_postprocess`` after ``simple_test``'s rescaling): the top (query, class) pairs by class
        probability, as many as there are queries; each pair's mask logits resized bilinearly to the network input
        and then to the image, its mask where they are positive, its score the class probability times the mean
        sigmoid inside the mask, its box around the mask.

        Not the image processor's ``post_process_instance_segmentation``: that one thresholds every mask on a fixed
        384x384 grid before resizing it, keeps every query's full-size float mask, and builds its segmentation map
        on the CPU from masks on the model's device."""
        probabilities = class_logits.float().softmax(dim=-1)[:, :-1]  # the last class is "no object"
        num_queries, num_classes = probabilities.shape
        top_probabilities, top = probabilities.flatten().topk(num_queries)
        labels, queries = top % num_classes, top // num_classes
        logits = torch.nn.functional.interpolate(mask_logits.float()[None], size=input_size, mode="bilinear",
                                                 align_corners=False)
        logits = torch.nn.functional.interpolate(logits, size=image_size, mode="bilinear", align_corners=False)
        logits = logits[0][queries]
        masks = logits > 0
        mask_scores = (logits.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
        scores = top_probabilities * mask_scores
        keep = scores > self.min_score
        found: dict[str, list[Detection]] = {}
        for label, score, box, mask in zip(labels[keep].tolist(), scores[keep].tolist(),
                                           mask_boxes(masks[keep]).tolist(), masks[keep].cpu().numpy()):
            if label in self.names:
                found.setdefault(self.names[label], []).append(Detection(tuple(box), score, mask))
        return found


class ColorClassifier:
    """GenEval's colour of detected objects: open-clip's zero-shot classifier (clip_benchmark's, which GenEval calls)
    over :data:`COLORS` with :data:`COLOR_TEMPLATES`, one text classifier per class name, built once and kept; on CUDA
    under float16 autocast as clip_benchmark runs it.

    Args:
        model_name (str), pretrained (str): the open-clip model and its tag or weights file (see ``clip_score``).
        device (torch.device).
    """

    def __init__(self, model_name: str, pretrained: str | None, device: torch.device):
        self.clip = OpenClipSimilarity(model_name=model_name, pretrained=pretrained, device=device)
        self.device = device
        self.text_classifiers: dict[str, torch.Tensor] = {}

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda")

    @torch.no_grad()
    def text_classifier(self, name: str) -> torch.Tensor:
        """``[D, len(COLORS)]``: per colour, the mean of its normalised template embeddings, normalised."""
        if name not in self.text_classifiers:
            columns = []
            for color in COLORS:
                texts = [template.format(color=color, object=name) for template in COLOR_TEMPLATES]
                tokens = self.clip.tokenizer(texts).to(self.device)
                with self._autocast():
                    embedding = torch.nn.functional.normalize(self.clip.model.encode_text(tokens), dim=-1).mean(0)
                columns.append(embedding / embedding.norm())
            self.text_classifiers[name] = torch.stack(columns, dim=1)
        return self.text_classifiers[name]

    @torch.no_grad()
    def similarities(self, image, detections: Sequence[Detection], name: str) -> torch.Tensor:
        """``[N, len(COLORS)]`` cosine similarities of each detection's crop in the PIL ``image`` to each colour."""
        classifier = self.text_classifier(name)
        crops = torch.stack([self.clip.preprocess(masked_crop(image, detection)) for detection in detections])
        with self._autocast():
            features = torch.nn.functional.normalize(self.clip.model.encode_image(crops.to(self.device)), dim=-1)
            return (features @ classifier).float()

    def __call__(self, image, detections: Sequence[Detection], name: str) -> list[str]:
        """The colour of each detection of class ``name`` in the PIL ``image``: the most similar."""
        return [COLORS[index] for index in self.similarities(image, detections, name).argmax(dim=1).tolist()]


def _dtype(value) -> torch.dtype:
    dtype = value if isinstance(value, torch.dtype) else getattr(torch, str(value), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype: {value!r} is not a torch floating-point type (float32, bfloat16, float16)")
    return dtype


def _resolution(value) -> tuple[int, int] | None:
    if value is None:
        return None
    if (not isinstance(value, Sequence) or len(value) != 2
            or not all(isinstance(side, int) and side > 0 for side in value) or value[0] > value[1]):
        raise ValueError(f"detector_resolution: expected [shortest, longest] positive sides or null, not {value!r}")
    return int(value[0]), int(value[1])


class _GenEval:
    """GenEval on each image against its prompt row.

    Args:
        detector (str, default ``facebook/mask2former-swin-small-coco-instance``): hub id or directory of a
            transformers Mask2Former COCO instance-segmentation checkpoint with its image processor.
        clip_model (str, default ``"ViT-L-14"``), clip_pretrained (str, default ``"openai"``): the colour model,
            GenEval's, an open-clip name and a tag or local weights file (null for an ``hf-hub:`` or ``local-dir:``
            model that carries its weights); OpenAI's tags are built with the QuickGELU they were trained with.
        detection_threshold (0.3), counting_threshold (0.9), max_objects (16), nms_threshold (1.0: off),
            position_margin (0.1): GenEval's constants (:class:`~tempflow.rewards.geneval_rules.GenEvalThresholds`).
        jpeg_quality (int, optional): score each image after a JPEG round trip at this Pillow quality; 75 is what
            the Flow-GRPO / TempFlow-GRPO client sends (Pillow's default). None: score the images as they are.
        detector_bgr (bool, default False): give the detector blue-green-red images, as the official reward server
            does by handing RGB arrays to mmdetection; False gives it the colours GenEval's evaluator gives it.
        detector_resolution (list, default ``[800, 1333]``): shortest and longest side of the detector's input
            (mmdetection's test scale); null keeps the image processor's own setting.
        batch_size (int, default 16): images per detector forward pass.
        device (str, optional): defaults to CUDA when available.
        dtype (str, default ``"float32"``): the detector's precision (``bfloat16``, ``float16``).
    """

    name = "geneval"  # the registered name, for messages

    def __init__(
        self,
        detector: str = DEFAULT_DETECTOR,
        clip_model: str = "ViT-L-14",
        clip_pretrained: str | None = "openai",
        detection_threshold: float = 0.3,
        counting_threshold: float = 0.9,
        max_objects: int = 16,
        nms_threshold: float = 1.0,
        position_margin: float = 0.1,
        jpeg_quality: int | None = None,
        detector_bgr: bool = False,
        detector_resolution: Sequence[int] | None = MMDET_TEST_SCALE,
        batch_size: int = 16,
        device: str | None = None,
        dtype: str | torch.dtype = "float32",
    ):
        if jpeg_quality is not None and (not isinstance(jpeg_quality, int) or not 1 <= jpeg_quality <= 100):
            raise ValueError(f"jpeg_quality: expected an integer from 1 to 100 or null, not {jpeg_quality!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, not {batch_size!r}")
        self.thresholds = GenEvalThresholds(detection_threshold, counting_threshold, max_objects, nms_threshold,
                                            position_margin)
        self.jpeg_quality, self.batch_size = jpeg_quality, batch_size
        self.device = pick_device(device)
        min_score = min(self.thresholds.detection, self.thresholds.counting)
        self.detector = Mask2FormerDetector(detector, _resolution(detector_resolution), detector_bgr, min_score,
                                            self.device, _dtype(dtype))
        self.colors = ColorClassifier(clip_model, clip_pretrained, self.device)

    def decide(self, detections: Detections, row: Mapping, classify_colors: ClassifyColors) -> float:
        """One image's score from its kept detections and its prompt row."""
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, prompts: list[str], tag=None, include=None, exclude=None,
                 **metadata) -> list[float]:
        from PIL import Image

        rows = self.rows(prompts, tag, include, exclude)
        if len(rows) != len(images):
            raise ValueError(f"{self.name}: got {len(images)} images but {len(rows)} prompt rows")
        arrays = to_uint8(images)
        if self.jpeg_quality is not None:
            arrays = jpeg_roundtrip(arrays, self.jpeg_quality)
        scores = []
        for start in range(0, len(arrays), self.batch_size):
            batch = arrays[start:start + self.batch_size]
            for array, candidates, row in zip(batch, self.detector(batch), rows[start:]):
                detections = select_detections(candidates, row["tag"], self.thresholds)
                scores.append(self.decide(detections, row, partial(self.colors, Image.fromarray(array))))
        return scores

    def rows(self, prompts: list[str], tag, include, exclude) -> list[dict]:
        """The prompts' GenEval rows, checked; ``ValueError`` naming the missing key or the first bad row."""
        name = self.name
        for key, column in (("tag", tag), ("include", include)):
            if column is None:
                raise ValueError(f"{name}: the prompts carry no `{key}` metadata; GenEval rewards need GenEval "
                                 "prompt rows (`tag`, `include`, and `exclude` for counting), e.g. geneval:train")
        exclude = [None] * len(tag) if exclude is None else exclude
        if not len(tag) == len(include) == len(exclude) == len(prompts):
            raise ValueError(f"{name}: {len(prompts)} prompts but {len(tag)} `tag`, {len(include)} `include` and "
                             f"{len(exclude)} `exclude` values")
        rows = []
        for index, (prompt, *row) in enumerate(zip(prompts, tag, include, exclude)):
            row = dict(zip(("tag", "include", "exclude"), row))
            try:
                check_metadata(row)
            except ValueError as err:
                raise ValueError(f"{name}: prompt {index} ({prompt!r}): {err}") from None
            rows.append({**row, "exclude": row["exclude"] or []})
        return rows


@register_reward("geneval")
class GenEval(_GenEval):
    """The official GenEval training reward: the reward server's partial credit (its ``scores``), at most 1, negative
    when far more objects are found than asked (arguments: :class:`_GenEval`)."""

    name = "geneval"

    def decide(self, detections, row, classify_colors) -> float:
        return partial_credit(detections, row, classify_colors, self.thresholds.position_margin)


@register_reward("geneval_strict")
class GenEvalStrict(_GenEval):
    """GenEval's accuracy: 1.0 when the image meets its prompt by GenEval's evaluator, else 0.0 (arguments:
    :class:`_GenEval`)."""

    name = "geneval_strict"

    def decide(self, detections, row, classify_colors) -> float:
        return float(geneval_correct(detections, row, classify_colors, self.thresholds.position_margin))
