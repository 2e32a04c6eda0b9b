"""Text-rendering reward, registered as ``ocr`` (Flow-GRPO's OCR task): the text a prompt asks for is the part
in double quotes (``a sign that says "hello"``); the reward is ``1 − min(d, n)/n`` where ``d`` is the
Levenshtein distance between the recognised text and that target and ``n`` the target's length, both
lower-cased without spaces (a recognised text that contains the target scores 1). Recognition uses EasyOCR
(``pip install easyocr``; it fetches its detector weights on first use) unless a ``recognizer`` is given."""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import torch

from . import register_reward, to_uint8

_QUOTED = re.compile(r'"([^"]+)"|“([^”]+)”')


def quoted_text(prompt: str) -> str | None:
    """The first double-quoted span of ``prompt`` (straight or curly quotes), or ``None`` if it has none."""
    match = _QUOTED.search(prompt)
    text = None if match is None else (match.group(1) or match.group(2)).strip()
    return text or None


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def text_similarity(recognized: str, target: str) -> float:
    """``1 − min(distance, len(target)) / len(target)`` on lower-cased, space-free strings."""
    recognized, target = (s.replace(" ", "").lower() for s in (recognized, target))
    if not target:
        raise ValueError("the target text is empty")
    distance = 0 if target in recognized else min(levenshtein(recognized, target), len(target))
    return 1.0 - distance / len(target)


def easyocr_recognizer(languages=("en",), gpu: bool | None = None) -> Callable[[np.ndarray], str]:
    """An EasyOCR reader as ``recognizer(uint8 HxWx3 array) -> text``."""
    try:
        import easyocr
    except ImportError as err:
        raise ModuleNotFoundError(
            "the `ocr` reward needs EasyOCR: `pip install easyocr` (or pass a `recognizer` callable)"
        ) from err
    reader = easyocr.Reader(
        list(languages), gpu=torch.cuda.is_available() if gpu is None else gpu, verbose=False
    )
    return lambda image: " ".join(reader.readtext(image, detail=0))


@register_reward("ocr")
class OcrReward:
    """How well each image renders the quoted text of its prompt, in [0, 1].

    Args:
        recognizer (callable, optional): ``recognizer(uint8 HxWx3 array) -> str``; defaults to EasyOCR.
        languages (list[str], default ``["en"]``): EasyOCR languages.
        gpu (bool, optional): run EasyOCR on the GPU (defaults to CUDA availability).

    Prompts without quoted text get ``None`` (not scorable).
    """

    def __init__(self, recognizer: Callable[[np.ndarray], str] | None = None, languages=("en",), gpu=None):
        self.recognizer = recognizer if recognizer is not None else easyocr_recognizer(languages, gpu)

    def __call__(self, images: torch.Tensor, prompts: list[str], **metadata) -> list[float | None]:
        scores = []
        for array, prompt in zip(to_uint8(images), prompts):
            target = quoted_text(prompt)
            scores.append(None if target is None else text_similarity(self.recognizer(array), target))
        return scores
