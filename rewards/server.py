"""Serve any registered reward over HTTP (``tempflow serve-reward NAME``) for the ``remote`` reward client.

Standard library only: a threaded ``http.server``. ``GET /health`` answers ``{"status": "ok", "reward":
NAME}``; ``POST /score`` takes the wire format of :mod:`tempflow.rewards.remote`. Each connection reads its
request on its own thread; one parsing thread checks it (JSON, the PNG headers: a bad request never waits for
scoring), then decoding and scoring run on one scoring thread, one request at a time, because the model is
loaded once and may not be thread-safe, and so that only one request's pixels are ever decoded. Each of the two
allocates from its own malloc arena, reused request after request; parsing or decoding on each connection's
thread left freed memory in one arena per thread, and memory crept up request after request.

Limits (arguments of :class:`RewardServer`, flags of the command):

- ``max_request_bytes`` (``--max-request-mb``, default 64 MiB): a larger Content-Length gets 413 at once.
- ``max_request_images`` (``--max-request-images``, default 128, source images of edits included): more get 413
  once the JSON is parsed, before any image is looked at.
- ``max_image_pixels`` (default 4096*4096 = 16 Mi pixels) and ``max_request_pixels`` (default 64 Mi pixels,
  e.g. 64 images of 1024x1024): checked against each PNG's header before any image is decoded (413). Decoding
  goes straight into the float32 batch the reward gets: 12 bytes per pixel, 768 MiB for a full request.
- Memory: request bodies are read only while those in memory (read, parsed, or waiting to be scored) add up to at
  most 4x the body limit; a request past that waits, unread, for a finished one. With the decoding above, that
  bounds what requests hold to about 4 body limits, 2 more while a body is parsed (its text and its strings),
  and 12 bytes per pixel of one request: 1.1 GiB at the defaults, whatever the number of connections.
- ``head_timeout`` (``--head-timeout``, default 10 s): the request line and headers must arrive within it, from
  the connection's start, however steadily they trickle in; ``body_timeout`` (``--body-timeout``, default 120 s):
  the body likewise, from when the server starts reading it; ``read_timeout`` (``--read-timeout``, default 30 s):
  a client may send nothing for that long. Past any of them the client gets 408 (before its request line, the
  connection is closed unanswered, as ``http.server`` does).
- ``token``: with one, every request but ``GET /health`` needs ``Authorization: Bearer <token>``; the header is
  checked as soon as its line arrives, and a wrong one (or a head that ends without it) gets 401 and the
  connection is closed after a short lingering read.
- ``max_unauthenticated_per_ip`` (``--max-unauthenticated-per-ip``, default half of ``max_connections``):
  connections from one address that have not shown the token (without a token: that have not sent their whole
  head). A connection that would be refused, for this limit or for ``max_connections``, takes the slot of the
  oldest unauthenticated connection (of its address, for this limit) that has spent a quarter of
  ``head_timeout`` (2.5 s) without the token, which is closed; only when there is none is it answered 503. Slow
  clients thus cannot keep prompt ones out, from another address or from their own.
- ``max_connections`` (``--max-connections``, default 16): connections served at once, each on its own thread; one
  more is answered 503 (``Retry-After: 1``) at once, then one refusing thread reads and drops what every refused
  client still sends, all together (closing with the request still arriving would reset the connection and hide
  the 503), for up to 2 s each. The listen backlog holds as many connections as are
  served and refused at once (``max_connections`` + 256), so a burst is answered, not dropped or reset. The
  ``remote`` client retries 503 with backoff and, when its retries run out, fails the step with an error (a
  refused batch is never scored 0).

PNGs of every colour type and bit depth decode to 8-bit RGB: 16-bit samples keep their high byte (Pillow clipped
16-bit greyscale instead), alpha and transparency are dropped, as Pillow's ``convert("RGB")`` drops them.

Every answer but 200 is JSON ``{"error": message}``, and the server keeps serving after any of them:

- 400: malformed JSON (or nested over 64 levels), wrong types or lengths, bad base64 or PNG, images of
  different sizes, metadata the reward does not take, a bad Content-Length or request line;
- 401: missing or wrong token; 404: unknown path; 405: wrong method for the path; 408: the client stalled;
- 411: no Content-Length (chunked bodies are not supported); 413: body, images or pixels over a limit;
  414, 431: request line or headers too long;
- 500: only the reward's fault (it raised anything, ``SystemExit`` and ``KeyboardInterrupt`` included, or did not
  return one number per image) or a bug of the server;
- 501: unsupported method; 503: ``max_connections`` are being served, or the client's address has its
  unauthenticated connections; 505: unsupported HTTP version.

An answer sent before the whole body is read (401, 404, 408, 411, 413, ...) closes the connection; the server
first drains what the client still sends, bounded by 4x the body limit and ``read_timeout`` seconds (for a 401,
2 s, as for a 503), so that the client can read it."""

from __future__ import annotations

import argparse
import contextlib
import hmac
import inspect
import io
import json
import logging
import math
import os
import queue
import sys
import threading
import time
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from . import get_reward
from .remote import (
    TOKEN_ENV,
    ImageTooLarge,
    finite_or_none,
    images_from_uint8,
    limit_pillow_pixels,
    png_bytes,
    png_pixels,
    png_size,
)
from .server_connections import (
    REFUSAL_TIMEOUT,
    REFUSALS_LINGERING,
    Admission,
    DeadlinePassed,
    DeadlineReader,
    Refusals,
    linger,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_MB = 64.0
DEFAULT_MAX_REQUEST_IMAGES = 128  # 4x what the `remote` client sends by default (16 images, 16 more for edits)
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
DEFAULT_MAX_REQUEST_PIXELS = 64 * 2**20
DEFAULT_READ_TIMEOUT = 30.0
DEFAULT_HEAD_TIMEOUT = 10.0
DEFAULT_BODY_TIMEOUT = 120.0  # a body at the default limit arrives in time at 0.56 MB/s
DEFAULT_MAX_CONNECTIONS = 16
_BODIES_IN_MEMORY = 4  # request bodies in memory at once, in body limits (one scored, others parsed or read)
# an unauthenticated connection may be closed for a newcomer once it has spent this share of the head timeout
# (2.5 s by default): a client that sends its request at once shows the token within milliseconds
_SLOW_HEAD_SHARE = 0.25
MAX_JSON_DEPTH = 64
# after an early answer, read and drop up to this many times the body limit so that the client reads it
_DRAIN_FACTOR = 4
_MAX_LENGTH_DIGITS = 18  # a longer Content-Length is over any limit (and int() refuses thousands of digits)


class RequestError(Exception):
    """A request the server answers with a 4xx status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class RewardFailed(Exception):
    """The reward raised or returned garbage: the only request failure answered with 500."""


def parse_score_request(
    body: bytes, max_images: int = DEFAULT_MAX_REQUEST_IMAGES
) -> tuple[list[str], list[str], dict, list[str] | None]:
    """JSON body → ``(base64 PNG texts, prompts, metadata, source image texts or None)`` with types and lengths
    checked, nothing decoded; or :class:`RequestError` (400, or 413 over ``max_images`` with the sources)."""
    try:
        request = json.loads(body)
    except RecursionError:
        raise RequestError(400, f"malformed JSON: nested over {MAX_JSON_DEPTH} levels deep") from None
    except ValueError as err:
        raise RequestError(400, f"malformed JSON: {err}") from None
    if not isinstance(request, dict):
        raise RequestError(400, "the body must be a JSON object")
    images, prompts = request.get("images"), request.get("prompts")
    metadata = request.get("metadata") or {}
    if not isinstance(images, list) or not images or not all(isinstance(i, str) for i in images):
        raise RequestError(400, "`images` must be a non-empty list of base64 PNG strings")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise RequestError(400, "`prompts` must be a list of strings")
    if len(prompts) != len(images):
        raise RequestError(400, f"got {len(images)} images but {len(prompts)} prompts")
    if not isinstance(metadata, dict) or not all(
        isinstance(v, list) and len(v) == len(images) for v in metadata.values()
    ):
        raise RequestError(400, "`metadata` must map each key to a list with one value per image")
    if _nested_deeper(metadata, MAX_JSON_DEPTH - 1):  # metadata is one level into the body
        raise RequestError(400, f"malformed JSON: nested over {MAX_JSON_DEPTH} levels deep")
    sources = request.get("source_images")
    if sources is not None and (not isinstance(sources, list) or len(sources) != len(images)
                                or not all(isinstance(s, str) for s in sources)):
        raise RequestError(400, "`source_images` must be a list of base64 PNG strings, one per image")
    if "source_images" in metadata:
        raise RequestError(400, "`source_images` goes beside `metadata`, as base64 PNGs")
    count = len(images) + len(sources or [])
    if count > max_images:
        counted = (f"{len(images)} images and their {len(sources)} source images are {count} images,"
                   if sources else f"{count} images are")
        raise RequestError(
            413,
            f"{counted} over the server's limit of {max_images} images per request (--max-request-images); "
            "send fewer images per request",
        )
    return images, prompts, metadata, sources


def _nested_deeper(value, limit: int) -> bool:
    """Whether lists and objects nest over ``limit`` deep in ``value`` (iterative: no recursion to run out)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def check_png_headers(
    texts: list[str], max_image_pixels: int, max_request_pixels: int
) -> tuple[list[bytes], tuple[int, int]]:
    """base64 texts → ``(PNG bytes, (width, height))``, with sizes read from the headers and no pixel decoded:
    413 over a pixel limit, 400 for an image that is not a PNG or differs in size from the first."""
    pngs, first = [], None
    for index, text in enumerate(texts):
        try:
            data = png_bytes(text)
            width, height = png_size(data)
        except ImageTooLarge as err:
            raise RequestError(413, f"image {index} is {err}") from None
        except ValueError as err:
            raise RequestError(400, f"image {index} is {err}") from None
        if width * height > max_image_pixels:
            raise RequestError(
                413,
                f"image {index} is {width}x{height} = {width * height} pixels, over the server's limit of "
                f"{max_image_pixels} pixels per image",
            )
        first = first or (width, height)
        if (width, height) != first:
            raise RequestError(
                400,
                f"all images of a request must have the same size: image 0 is {first[0]}x{first[1]}, "
                f"image {index} is {width}x{height}",
            )
        pngs.append(data)
    total = len(pngs) * first[0] * first[1]
    if total > max_request_pixels:
        raise RequestError(
            413,
            f"{len(pngs)} images of {first[0]}x{first[1]} are {total} pixels, over the server's limit of "
            f"{max_request_pixels} pixels per request (send fewer images per request)",
        )
    return pngs, first


def decode_pngs(pngs: list[bytes], size: tuple[int, int]) -> torch.Tensor:
    """PNG bytes of checked ``size`` → ``[B, 3, H, W]`` float32 images; 400 for corrupt or truncated data or a
    mode the server does not decode. Each image goes straight into the batch: 12 bytes per pixel in all."""
    width, height = size
    images = torch.empty(len(pngs), height, width, 3)  # the memory layout images_from_uint8 gives a batch
    for index, data in enumerate(pngs):
        try:
            images[index] = images_from_uint8(png_pixels(data)[None])[0].permute(1, 2, 0)
        except ValueError as err:
            raise RequestError(400, f"image {index} is {err}") from None
    return images.permute(0, 3, 1, 2)


class RewardServer(ThreadingHTTPServer):
    """A threaded HTTP server for one reward.

    Args:
        reward (callable): the reward to serve.
        name (str): its name, reported by ``/health`` and in error messages.
        host (str, default ``127.0.0.1``), port (int, default 8000; 0 picks a free port).
        token (str, optional): when set, every request but ``GET /health`` requires
            ``Authorization: Bearer <token>``, checked as soon as that header's line arrives.
        max_request_bytes (int, default 64 MiB): larger bodies get 413.
        max_request_images (int, default 128): more images in one request (source images included) get 413.
        max_image_pixels (int, default 4096*4096), max_request_pixels (int, default 64 Mi): more decoded
            pixels in one image, or in all images of a request, get 413 before anything is decoded.
        read_timeout (float, default 30): seconds a client may send nothing within a request (after its
            request line) before it gets 408.
        head_timeout (float, default 10), body_timeout (float, default 120): seconds for the whole request head
            (from the connection's start) and for the whole body (from when it is read); past them, 408.
        max_connections (int, default 16): connections served at once; more are answered 503 and closed.
        max_unauthenticated_per_ip (int, default half of ``max_connections``): connections from one address
            that have not shown the token (or, without a token, sent their whole head); more get 503, or the
            slot of one that has waited ``head_timeout / 4`` (see :class:`Admission`).

    Raises ``OSError`` when it cannot listen on ``host:port``.
    """

    daemon_threads = True

    def __init__(
        self,
        reward,
        name: str,
        host: str = "127.0.0.1",
        port: int = 8000,
        token: str | None = None,
        max_request_bytes: int = int(DEFAULT_MAX_REQUEST_MB * 2**20),
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_request_images: int = DEFAULT_MAX_REQUEST_IMAGES,
        head_timeout: float = DEFAULT_HEAD_TIMEOUT,
        body_timeout: float = DEFAULT_BODY_TIMEOUT,
        max_unauthenticated_per_ip: int | None = None,
    ):
        if max_unauthenticated_per_ip is None:
            max_unauthenticated_per_ip = max(1, max_connections // 2)
        limits = (max_request_bytes, max_image_pixels, max_request_pixels, read_timeout, max_connections,
                  max_request_images, head_timeout, body_timeout, max_unauthenticated_per_ip)
        if min(limits) <= 0:
            raise ValueError("the server's limits and timeouts must be positive")
        self.max_connections = max_connections
        self.admission = Admission(max_connections, max_unauthenticated_per_ip, head_timeout * _SLOW_HEAD_SHARE)
        self._body_bytes_free = _BODIES_IN_MEMORY * max_request_bytes
        self._body_memory = threading.Condition()
        # before binding: a failed bind calls server_close
        self._parsing, self._scoring = _Worker(f"parse {name}"), _Worker(f"score {name}")
        self.scoring_thread = self._scoring.thread
        self._refusals = Refusals(f"refuse {name}", _DRAIN_FACTOR * max_request_bytes)
        # a burst of connections waits in the kernel until served or refused, rather than being dropped
        self.request_queue_size = max_connections + REFUSALS_LINGERING
        super().__init__((host, port), _RewardHandler)
        self.reward, self.reward_name, self.token = reward, name, token
        self.max_request_bytes, self.max_request_images = max_request_bytes, max_request_images
        self.read_timeout, self.head_timeout, self.body_timeout = read_timeout, head_timeout, body_timeout
        self.max_image_pixels, self.max_request_pixels = max_image_pixels, max_request_pixels
        try:
            self.reward_signature = inspect.signature(reward)
        except (TypeError, ValueError):  # some callables have none: then metadata goes unchecked
            self.reward_signature = None

    def process_request(self, request, client_address):
        """A thread for the connection if :class:`Admission` gives it a slot; else 503 and close."""
        refusal = self.admission.admit(request, client_address[0])
        if refusal is not None:
            return self._refusals.refuse(request, refusal)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.admission.release(request)
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.admission.release(request)

    @property
    def peak_connections(self) -> int:
        return self.admission.peak

    @property
    def busy_refusals(self) -> int:
        return self.admission.busy_refusals

    @contextlib.contextmanager
    def body_memory(self, length: int):
        """Hold ``length`` bytes of the bodies allowed in memory at once (``_BODIES_IN_MEMORY`` body limits):
        wait, unread, until a request in memory is done."""
        with self._body_memory:
            self._body_memory.wait_for(lambda: self._body_bytes_free >= length)
            self._body_bytes_free -= length
        try:
            yield
        finally:
            with self._body_memory:
                self._body_bytes_free += length
                self._body_memory.notify_all()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def score(self, body: bytes) -> list:
        """Request body → scores: :class:`RequestError` for the request's faults, :class:`RewardFailed` for
        the reward's. Only decoding and scoring wait for the scoring thread, so a bad request never does."""
        held = [body]
        del body  # the parsing thread gets the only reference, and frees the body once it is parsed
        pngs, size, prompts, metadata = self._parsing.call(lambda: self._parsed(held.pop()))
        return self._scoring.call(lambda: self._decode_and_score(pngs, size, prompts, metadata))

    def _parsed(self, body: bytes) -> tuple[list[bytes], tuple[int, int], list[str], dict]:
        texts, prompts, metadata, sources = parse_score_request(body, self.max_request_images)
        del body  # while waiting for the scoring thread, hold only the PNG bytes
        self._check_metadata({**metadata, **({} if sources is None else {"source_images": None})})
        # source images count against the limits like the outputs, and must have their size
        pngs, size = check_png_headers(texts + (sources or []), self.max_image_pixels, self.max_request_pixels)
        return pngs, size, prompts, metadata

    def _decode_and_score(self, pngs: list[bytes], size: tuple[int, int], prompts: list[str], metadata: dict):
        decoded = decode_pngs(pngs, size)
        pngs.clear()  # not needed while the reward runs
        images = decoded[: len(prompts)]
        if len(decoded) > len(prompts):
            metadata = {**metadata, "source_images": decoded[len(prompts):]}
        try:
            result = self.reward(images, prompts, **metadata)
        except BaseException as err:  # SystemExit, KeyboardInterrupt too: the reward's fault, the server goes on
            raise RewardFailed(f"reward {self.reward_name!r} raised {type(err).__name__}: {err}") from err
        return self._checked_scores(result, len(prompts))

    def server_close(self):
        super().server_close()
        self._parsing.stop()
        self._scoring.stop()
        self._refusals.stop()

    def _check_metadata(self, metadata: dict) -> None:
        """A reward given keywords it does not take raises TypeError: a 500 for the request's fault."""
        if self.reward_signature is None:
            return
        try:
            self.reward_signature.bind(None, None, **metadata)
        except TypeError as err:
            raise RequestError(400, f"`metadata` does not fit reward {self.reward_name!r}: {err}") from None

    def _checked_scores(self, result, count: int) -> list:
        try:
            scores = [finite_or_none(score) for score in result]
        except BaseException as err:
            raise RewardFailed(
                f"reward {self.reward_name!r} returned something other than a list of numbers "
                f"({type(err).__name__}: {err})"
            ) from err
        if len(scores) != count:
            raise RewardFailed(
                f"reward {self.reward_name!r} returned {len(scores)} scores for {count} images"
            )
        return scores

    def handle_error(self, request, client_address):
        """Log a failed connection (a client that hung up mid-answer, ...) instead of printing to stderr."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            logger.info("connection from %s dropped", client_address[0])
        else:
            logger.exception("error on the connection from %s", client_address[0])


class _Worker:
    """A thread that runs the calls handed to it one at a time. Memory it allocates comes from its own malloc
    arena, reused request after request, instead of one arena per connection's thread each keeping some."""

    def __init__(self, name: str):
        self._calls = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def call(self, function):
        """``function()`` run on this thread; its exception, of any kind, raised here."""
        future = Future()
        self._calls.put((future, function))
        return future.result()

    def stop(self) -> None:
        self._calls.put(None)

    def _run(self) -> None:
        while (item := self._calls.get()) is not None:
            future, function = item
            try:
                future.set_result(function())
            except BaseException as err:
                future.set_exception(err)
            del item, future, function  # do not hold a request's data until the next one arrives


class _WrongToken(Exception):
    """An ``Authorization`` header line that does not carry the server's token."""


class _WatchedHeaderLines:
    """``rfile`` while ``http.server`` reads the header lines: each line goes to ``watch`` as it arrives."""

    def __init__(self, rfile, watch):
        self.rfile, self.watch = rfile, watch

    def readline(self, limit: int = -1) -> bytes:
        line = self.rfile.readline(limit)
        self.watch(line)
        return line


class _RewardHandler(BaseHTTPRequestHandler):
    server: RewardServer
    server_version = "tempflow-reward/1"

    def setup(self):
        self.timeout = self.server.read_timeout  # StreamRequestHandler.setup puts it on the socket
        super().setup()
        self.rfile.close()  # http.server's reader, replaced by one that keeps deadlines
        self._reader = DeadlineReader(self.connection, self.server.read_timeout)
        self._reader.deadline = time.monotonic() + self.server.head_timeout
        self.rfile = io.BufferedReader(self._reader, 1 << 16)
        self._token_shown = False

    def parse_request(self) -> bool:
        rfile, self.rfile = self.rfile, _WatchedHeaderLines(self.rfile, self._check_header_line)
        try:
            parsed = super().parse_request()
        except TimeoutError as err:  # stalled within the headers (http.server would drop the connection unanswered)
            self._reply(408, {"error": self._stalled("the headers", self.server.head_timeout, err)}, close=True)
            return False
        except _WrongToken:
            self._refuse_unauthorized()
            return False
        finally:
            self.rfile = rfile
        if not parsed:
            return False
        self._reader.deadline = math.inf  # the body has its own, from when it is read
        if self._needs_token() and not self._token_shown:
            self._refuse_unauthorized()
            return False
        if self.server.token is None:
            self.server.admission.authenticated(self.connection)
        return True

    def _needs_token(self) -> bool:
        return self.server.token is not None and not (self.command == "GET" and self.path == "/health")

    def _check_header_line(self, line: bytes) -> None:
        """The token, as soon as its line arrives: a client without it never gets past the headers."""
        name, colon, value = line.partition(b":")
        if not colon or name.strip().lower() != b"authorization" or not self._needs_token():
            return
        if not hmac.compare_digest(value.strip(), f"Bearer {self.server.token}".encode()):
            raise _WrongToken
        self._token_shown = True
        self.server.admission.authenticated(self.connection)

    def _refuse_unauthorized(self) -> None:
        """401 and close, reading what the client still sends only briefly: it has not shown the token."""
        message = "missing or wrong token (send `Authorization: Bearer <token>`)"
        self._reply(401, {"error": message}, close=True)
        self._drain(None, REFUSAL_TIMEOUT)

    def do_GET(self):
        if self.path == "/score":
            return self._reply(405, {"error": "use POST /score"}, close=True)
        if self.path != "/health":
            return self._reply(404, {"error": f"{self._no_such_path()}; use GET /health or POST /score"})
        self._reply(200, {"status": "ok", "reward": self.server.reward_name})

    def do_POST(self):
        self._unread = None  # body bytes not read yet; None: unknown
        try:
            self._unread = self._content_length()
            if self.path == "/health":
                raise RequestError(405, "use GET /health")
            if self.path != "/score":
                raise RequestError(404, f"{self._no_such_path()}; use POST /score")
            self._check_size(self._unread)
            with self.server.body_memory(self._unread):
                scores = self.server.score(self._read_body())  # no reference here: score() can free the body
        except RequestError as err:
            return self._reply_error(err.status, str(err))
        except RewardFailed as err:
            logger.error("%s", err, exc_info=err.__cause__)
            return self._reply_error(500, str(err))
        except Exception as err:  # neither the request's fault nor the reward's: a bug here
            logger.exception("internal error")
            return self._reply_error(500, f"internal server error: {type(err).__name__}: {err}")
        self._reply(200, {"scores": scores})

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, 414, 431, 501, 505) as JSON, like ours, not HTML."""
        self.log_error("code %d, message %s", code, message)
        if code == 501:
            message = f"method {self.command!r} is not supported; use GET /health or POST /score"
        text = message or self.responses.get(code, ("error",))[0]
        self._reply(code, {"error": f"{text}: {explain}" if explain else text}, close=True)

    def _content_length(self) -> int:
        if "Transfer-Encoding" in self.headers:
            raise RequestError(411, "chunked bodies are not supported; send a Content-Length")
        values = {value.strip() for value in self.headers.get_all("Content-Length", [])}
        if not values:
            raise RequestError(411, "a Content-Length header is required")
        if len(values) > 1:
            raise RequestError(400, "conflicting Content-Length headers")
        value = values.pop()
        if not (value.isascii() and value.isdigit()):
            raise RequestError(400, f"invalid Content-Length {value[:40]!r}")
        if len(value) > _MAX_LENGTH_DIGITS:
            raise RequestError(413, f"a Content-Length of {len(value)} digits exceeds the server's limit")
        return int(value)

    def _check_size(self, length: int) -> None:
        limit = self.server.max_request_bytes
        if length > limit:
            raise RequestError(
                413,
                f"request of {length} bytes exceeds the server's limit of {limit / 2**20:g} MB "
                f"({limit} bytes)",
            )

    def _read_body(self) -> bytes:
        length = self._unread
        self._reader.deadline = time.monotonic() + self.server.body_timeout
        try:
            body = self.rfile.read(length)
        except TimeoutError as err:
            part = f"the body ({length} bytes announced)"
            raise RequestError(408, self._stalled(part, self.server.body_timeout, err)) from None
        if len(body) < length:
            raise RequestError(400, f"the body ended after {len(body)} of the {length} bytes announced")
        self._unread = 0
        return body

    def _stalled(self, part: str, deadline: float, err: TimeoutError) -> str:
        if isinstance(err, DeadlinePassed):
            return f"the client did not send {part} within {deadline:g} s"
        return f"the client sent nothing for {self.server.read_timeout:g} s within {part}"

    def _no_such_path(self) -> str:
        path = self.path if len(self.path) <= 100 else f"{self.path[:100]}..."
        return f"no such path {path!r}"

    def _reply_error(self, status: int, message: str) -> None:
        if self._unread == 0:
            return self._reply(status, {"error": message})
        self._reply(status, {"error": message}, close=True)
        self._drain(self._unread)

    def _drain(self, unread: int | None, seconds: float | None = None) -> None:
        """Lingering close (:func:`linger`) through ``rfile``, which may hold part of the body already, for
        ``seconds`` (default ``read_timeout``)."""
        budget = _DRAIN_FACTOR * self.server.max_request_bytes
        budget = budget if unread is None else min(unread, budget)
        seconds = self.server.read_timeout if seconds is None else seconds
        self._reader.deadline = time.monotonic() + seconds
        linger(self.connection, self.rfile.read1, budget, seconds)

    def _reply(self, status: int, payload: dict, close: bool = False) -> None:
        if self.request_version == "HTTP/0.9":  # a garbled or HTTP/0.9 request line: still send a status line
            self.request_version = self.protocol_version
        data = json.dumps(payload).encode()
        self.connection.settimeout(self.server.read_timeout)  # a read may have left a deadline's rest on it
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        if status == 405:
            self.send_header("Allow", "POST" if self.path == "/score" else "GET")
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format, *args):
        from ..redaction import redact_text  # a request line may carry a token in its query

        logger.info("%s %s", self.address_string(), redact_text(format % args))


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        """One line, not the whole usage: ``tempflow serve-reward: error: ...``, exit status 2."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="tempflow serve-reward", description="Serve a reward over HTTP.")
    parser.add_argument("reward", help="a registered reward name or a 'package.module:function' path")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument(
        "--port", type=int, default=8000, help="port, 0 to 65535 (default: 8000; 0 picks a free one)"
    )
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV) or None,
        help=f"shared secret clients must send (default: ${TOKEN_ENV})",
    )
    parser.add_argument(
        "--max-request-mb",
        type=float,
        default=DEFAULT_MAX_REQUEST_MB,
        help=f"largest request body accepted, in MiB (default: {DEFAULT_MAX_REQUEST_MB:g})",
    )
    parser.add_argument(
        "--max-request-images",
        type=int,
        default=DEFAULT_MAX_REQUEST_IMAGES,
        help=f"most images in one request, source images of edits included (default: {DEFAULT_MAX_REQUEST_IMAGES})",
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help=f"most pixels of one image, checked before decoding (default: {DEFAULT_MAX_IMAGE_PIXELS} = "
        "4096x4096)",
    )
    parser.add_argument(
        "--max-request-pixels",
        type=int,
        default=DEFAULT_MAX_REQUEST_PIXELS,
        help=f"most pixels of all images of one request (default: {DEFAULT_MAX_REQUEST_PIXELS}; decoding and "
        "scoring hold about 15 bytes per pixel)",
    )
    parser.add_argument(
        "--read-timeout",
        type=float,
        default=DEFAULT_READ_TIMEOUT,
        help="seconds a client may send nothing within a request before it gets 408 "
        f"(default: {DEFAULT_READ_TIMEOUT:g})",
    )
    parser.add_argument(
        "--head-timeout",
        type=float,
        default=DEFAULT_HEAD_TIMEOUT,
        help="seconds from a connection's start for its request line and headers, however steadily they arrive "
        f"(default: {DEFAULT_HEAD_TIMEOUT:g})",
    )
    parser.add_argument(
        "--body-timeout",
        type=float,
        default=DEFAULT_BODY_TIMEOUT,
        help=f"seconds for a request's whole body, from when it is read (default: {DEFAULT_BODY_TIMEOUT:g})",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        help=f"connections served at once; more get 503 (default: {DEFAULT_MAX_CONNECTIONS})",
    )
    parser.add_argument(
        "--max-unauthenticated-per-ip",
        type=int,
        default=None,
        help="connections from one address that have not shown the token (without a token: not sent their "
        "headers) at once; more get 503 (default: half of --max-connections)",
    )
    parser.add_argument(
        "--reward-kwargs", default="{}", help="JSON object of the reward's constructor arguments"
    )
    return parser


def _checked_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """Refuse flags the server cannot work with (exit 2, one line); return the reward's keyword arguments."""
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be 0 to 65535, not {args.port}")
    flags = ("max_request_mb", "max_request_images", "max_image_pixels", "max_request_pixels", "read_timeout",
             "head_timeout", "body_timeout", "max_connections", "max_unauthenticated_per_ip")
    for flag in flags:
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and value > 0):
            parser.error(f"--{flag.replace('_', '-')} must be a positive number, not {value:g}")
    if int(args.max_request_mb * 2**20) < 1:
        parser.error(f"--max-request-mb {args.max_request_mb:g} is less than a byte")
    if args.token is not None and not _valid_token(args.token):
        parser.error(f"the token (--token or ${TOKEN_ENV}) must be non-empty printable ASCII without spaces")
    try:
        reward_kwargs = json.loads(args.reward_kwargs)
    except ValueError as err:
        parser.error(f"--reward-kwargs is not JSON: {err}")
    if not isinstance(reward_kwargs, dict):
        parser.error("--reward-kwargs must be a JSON object")
    return reward_kwargs


def _valid_token(token: str) -> bool:
    """Non-empty, and sendable in a header as it is."""
    return bool(token) and token.isascii() and token.isprintable() and " " not in token


def _one_line(err: Exception) -> str:
    text = " ".join(str(err).split())
    return text if isinstance(err, ValueError) else f"{type(err).__name__}: {text}"


def main(argv: list[str] | None = None) -> int:
    """``tempflow serve-reward``: load the reward once, then serve until interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    reward_kwargs = _checked_arguments(parser, args)
    try:
        reward = get_reward(args.reward, **reward_kwargs)
    except Exception as err:  # an unknown name, a failing import or constructor: one line, not a traceback
        parser.error(f"cannot load reward {args.reward!r}: {_one_line(err)}")
    try:
        server = RewardServer(
            reward,
            args.reward,
            args.host,
            args.port,
            args.token,
            max_request_bytes=int(args.max_request_mb * 2**20),
            max_image_pixels=args.max_image_pixels,
            max_request_pixels=args.max_request_pixels,
            read_timeout=args.read_timeout,
            max_connections=args.max_connections,
            max_request_images=args.max_request_images,
            head_timeout=args.head_timeout,
            body_timeout=args.body_timeout,
            max_unauthenticated_per_ip=args.max_unauthenticated_per_ip,
        )
    except OSError as err:
        parser.error(f"cannot listen on {args.host}:{args.port}: {err.strerror or err}")
    limit_pillow_pixels(args.max_image_pixels)
    if args.token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s without a token: anyone who can reach it can use the reward", args.host)
    print(f"serving reward {args.reward!r} at {server.url} (POST /score, GET /health)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
