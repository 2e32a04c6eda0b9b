"""A reward scored by another process, registered as ``remote``: it posts batches to a reward server
(:mod:`tempflow.rewards.server`) and returns its scores, so a heavy or conflicting reward model can live in
its own environment or on its own GPU. Wire format (one place, used by both sides): ``POST /score`` with JSON
``{"images": [base64 PNG, ...], "prompts": [...], "metadata": {key: [one value per image]}}`` (for edits also
``"source_images": [base64 PNG, ...]``, one per image and of its size, handed to the reward as ``source_images``), answered with
``{"scores": [float or null, ...]}`` or ``{"error": message}``. PNG is lossless, so the remote reward sees
the images quantised to 8 bits and nothing else changes; nothing is ever pickled."""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import os
import re
import time
import urllib.error
import urllib.request

import numpy as np
import torch

from ..redaction import redact_text
from . import register_reward, to_uint8
from .combined import RewardError

TOKEN_ENV = "TEMPFLOW_REWARD_TOKEN"
# 408: our upload stalled on the way; 502/503/504: the server is starting, overloaded or behind a bad proxy.
# Any other 4xx is the request's fault and 500 the reward's: the same request would fail again.
_RETRY_STATUSES = (408, 502, 503, 504)


class RemoteRewardError(RewardError):
    """The reward server refused a request, failed, or could not be reached. The message names the server by
    its url, which may carry credentials (``user:password@``, ``?token=``): they are hidden, echoes too."""

    def __init__(self, message: str):
        super().__init__(redact_text(message))


def encode_png(array: np.ndarray) -> str:
    """``[H, W, 3]`` uint8 → base64 PNG text."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class ImageTooLarge(ValueError):
    """A PNG whose header declares more pixels than Pillow's decompression-bomb limit allows."""


def png_bytes(text: str) -> bytes:
    """base64 text → bytes; ``ValueError("not valid base64")`` for anything else."""
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise ValueError("not valid base64") from None


def _open_png(data: bytes):
    """Open PNG bytes lazily: Pillow reads the header only, pixels are decoded on first use."""
    from PIL import Image

    try:
        return Image.open(io.BytesIO(data), formats=["PNG"])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:  # the warning when an error
        raise ImageTooLarge(f"larger than Pillow allows ({Image.MAX_IMAGE_PIXELS} pixels)") from err
    except Image.UnidentifiedImageError:  # its message holds the repr of our BytesIO
        raise ValueError("not a valid PNG") from None
    except Exception as err:
        raise ValueError(f"not a valid PNG ({_reason(err)})") from None


def png_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` from a PNG's header, decoding no pixel; ``ValueError`` (or ``ImageTooLarge``)."""
    with _open_png(data) as image:
        return image.size


# the modes Pillow opens PNGs in: 16-bit greyscale stays 16-bit ("I;16"; older Pillow opened it as "I"), every
# other kind of PNG arrives as 8-bit samples (16-bit colour already reduced to its high bytes)
_SIXTEEN_BIT_GREY_MODES = ("I;16", "I;16B", "I;16L", "I")
_EIGHT_BIT_MODES = ("1", "L", "LA", "P", "RGB", "RGBA")


def png_pixels(data: bytes) -> np.ndarray:
    """PNG bytes → ``[H, W, 3]`` uint8, any bit depth and colour type (alpha and transparency are dropped, as
    Pillow's ``convert("RGB")`` drops them); ``ValueError`` naming the problem for anything else."""
    with _open_png(data) as image:
        if image.mode not in _SIXTEEN_BIT_GREY_MODES + _EIGHT_BIT_MODES:
            raise ValueError(f"a PNG of mode {image.mode!r}, which the server does not decode")
        try:
            return _rgb_pixels(image)
        except MemoryError:
            raise
        except Exception as err:  # truncated or corrupt data: OSError, SyntaxError, zlib.error, ...
            raise ValueError(f"not a valid PNG ({_reason(err)})") from None


def _rgb_pixels(image) -> np.ndarray:
    if image.mode in _SIXTEEN_BIT_GREY_MODES:
        # Pillow's convert("RGB") clips 16-bit samples at 255 (mid-grey became white); keep the high byte
        # instead, as Pillow does for 16-bit colour PNGs, so that a grey PNG decodes like its colour twin
        high_bytes = np.minimum(np.asarray(image).astype(np.int64) >> 8, 255).astype(np.uint8)
        return np.repeat(high_bytes[..., None], 3, axis=2)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # P with tRNS straight to RGB warns (Pillow) and gives the same colours
    return np.array(image.convert("RGB"))  # writable, for torch.from_numpy


def limit_pillow_pixels(max_pixels: int) -> None:
    """Make Pillow's decompression-bomb check refuse images over ``max_pixels`` (it only warns below twice
    its limit). Process-wide, so for a process that serves rewards, not for a library user."""
    import warnings

    from PIL import Image

    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def _reason(err: Exception) -> str:
    """An exception's message without object reprs (``<_io.BytesIO object at 0x...>``), on one short line."""
    text = " ".join(re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the data", str(err)).split())
    return (text or type(err).__name__)[:200]


def images_from_uint8(arrays: np.ndarray) -> torch.Tensor:
    """``[B, H, W, 3]`` uint8 → ``[B, 3, H, W]`` float32 in [0, 1] (the inverse of :func:`to_uint8`)."""
    return torch.from_numpy(np.ascontiguousarray(arrays)).permute(0, 3, 1, 2).float().div_(255)


def _jsonable(value):
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"metadata of type {type(value).__name__} cannot be sent to a reward server")


def encode_request(arrays: np.ndarray, prompts: list[str], metadata: dict, sources: np.ndarray | None = None) -> bytes:
    body = {"images": [encode_png(a) for a in arrays], "prompts": list(prompts), "metadata": metadata}
    if sources is not None:  # edits: the source image of each output, same size
        body["source_images"] = [encode_png(a) for a in sources]
    return json.dumps(body, default=_jsonable).encode()


def finite_or_none(score) -> float | None:
    """Scores as JSON can carry them: NaN and inf become ``null``."""
    return None if score is None or not math.isfinite(float(score)) else float(score)


@register_reward("remote")
class RemoteReward:
    """Scores batches on a reward server.

    Args:
        url (str): the server's address, e.g. ``http://127.0.0.1:8000``.
        token (str, optional): shared secret sent as ``Authorization: Bearer``; defaults to the
            ``TEMPFLOW_REWARD_TOKEN`` environment variable (keeps secrets out of recipes).
        timeout (float, default 60): seconds to wait for one batch.
        retries (int, default 3): further attempts after an unreachable server, a timeout or HTTP
            408/502/503/504; not after another 4xx (a bad request) or 500 (the reward failed).
        batch_size (int, default 16): images per request.
        retry_wait (float, default 1): seconds before the first retry, doubling after each.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        batch_size: int = 16,
        retry_wait: float = 1.0,
    ):
        self.url = url.rstrip("/").removesuffix("/score")
        self.token = token if token is not None else os.environ.get(TOKEN_ENV)
        self.timeout, self.retries = timeout, retries
        self.batch_size, self.retry_wait = batch_size, retry_wait

    def __call__(self, images: torch.Tensor, prompts: list[str], source_images: torch.Tensor | None = None,
                 **metadata) -> list[float | None]:
        arrays, prompts = to_uint8(images), list(prompts)
        sources = None if source_images is None else to_uint8(source_images)
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            stop = start + self.batch_size
            batch_metadata = {key: list(values[start:stop]) for key, values in metadata.items()}
            body = encode_request(arrays[start:stop], prompts[start:stop], batch_metadata,
                                  None if sources is None else sources[start:stop])
            batch_scores = self._post(body)
            if len(batch_scores) != len(prompts[start:stop]):
                raise RemoteRewardError(
                    f"{self.url} returned {len(batch_scores)} scores for {stop - start} images"
                )
            scores += batch_scores
        return scores

    def _post(self, body: bytes) -> list:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(f"{self.url}/score", data=body, headers=headers, method="POST")
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    answer = response.read()
                return _scores_of(answer, self.url)
            except urllib.error.HTTPError as err:
                if err.code not in _RETRY_STATUSES:
                    raise RemoteRewardError(
                        f"reward server {self.url}: HTTP {err.code}: {_error_text(err)}"
                    ) from None
                last_error = f"HTTP {err.code}: {_error_text(err)}"
            except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
                last_error = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
            if attempt < self.retries:
                time.sleep(self.retry_wait * 2**attempt)
        raise RemoteRewardError(
            f"reward server {self.url}: no answer after {self.retries + 1} attempt(s); "
            f"last error: {last_error}"
        )


def _scores_of(answer: bytes, url: str) -> list:
    try:
        scores = json.loads(answer)["scores"]
    except (ValueError, KeyError, TypeError) as err:
        raise RemoteRewardError(f"reward server {url}: malformed answer ({err})") from None
    return [finite_or_none(score) for score in scores]


def _error_text(err: urllib.error.HTTPError) -> str:
    try:
        return json.loads(err.read())["error"]
    except Exception:
        return err.reason
