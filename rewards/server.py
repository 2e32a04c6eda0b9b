"""Serve any registered reward over HTTP (``tempflow serve-reward NAME``) for the ``remote`` reward client.

Standard library only: a threaded ``http.server``. ``GET /health`` answers ``{"status": "ok", "reward":
NAME}``; ``POST /score`` takes the wire format of :mod:`tempflow.rewards.remote`. Each connection reads and
checks its request (body, JSON, the PNG headers) on its own thread; decoding and scoring then run on one
scoring thread, one request at a time, because the model is loaded once and may not be thread-safe, and so
that only one request's pixels are ever decoded (always in that thread's malloc arena, not one arena per
connection, which let memory creep up request after request).

Limits (arguments of :class:`RewardServer`, flags of the command):

- ``max_request_bytes`` (``--max-request-mb``, default 64 MiB): a larger Content-Length gets 413 at once.
- ``max_image_pixels`` (default 4096*4096 = 16 Mi pixels) and ``max_request_pixels`` (default 64 Mi pixels,
  e.g. 64 images of 1024x1024): checked against each PNG's header before any image is decoded (413). Decoding
  and scoring hold about 15 bytes per pixel (8-bit RGB, then float32), so about 1 GiB for a full request.
- ``read_timeout`` (default 30 s): a client that sends nothing for that long within its headers or body
  gets 408 (before its request line, the connection is closed unanswered, as ``http.server`` does).
- ``max_connections`` (``--max-connections``, default 16): connections served at once, each on its own thread; one
  more is answered 503 (``Retry-After: 1``) by a single refusing thread, which reads and drops its request (closing
  with the request still arriving would reset the connection and hide the 503) and closes it. Memory is bounded by this times the
  body limit, plus one request's decoding; the ``remote`` client retries 503 with backoff and, when its retries run
  out, fails the step with an error (a refused batch is never scored 0).

Every answer but 200 is JSON ``{"error": message}``, and the server keeps serving after any of them:

- 400: malformed JSON (or nested over 64 levels), wrong types or lengths, bad base64 or PNG, images of
  different sizes, metadata the reward does not take, a bad Content-Length or request line;
- 401: missing or wrong token; 404: unknown path; 405: wrong method for the path; 408: the client stalled;
- 411: no Content-Length (chunked bodies are not supported); 413: body or pixels over a limit;
  414, 431: request line or headers too long;
- 500: only the reward's fault (it raised, or did not return one number per image) or a bug of the server;
- 501: unsupported method; 503: ``max_connections`` are being served; 505: unsupported HTTP version.

An answer sent before the whole body is read (401, 404, 408, 411, 413, ...) closes the connection; the server
first drains what the client still sends, bounded by 4x the body limit and ``read_timeout`` seconds, so that
the client can read it."""

from __future__ import annotations

import argparse
import hmac
import inspect
import json
import logging
import math
import os
import queue
import socket
import sys
import threading
import time
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

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

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_MB = 64.0
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
DEFAULT_MAX_REQUEST_PIXELS = 64 * 2**20
DEFAULT_READ_TIMEOUT = 30.0
DEFAULT_MAX_CONNECTIONS = 16
_BUSY_ANSWER_TIMEOUT = 2.0  # seconds the refusing thread spends on one client (writing the 503, reading its request)
_REFUSALS_QUEUED = 64  # connections waiting for their 503; past this they are closed unanswered
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


def parse_score_request(body: bytes) -> tuple[list[str], list[str], dict, list[str] | None]:
    """JSON body → ``(base64 PNG texts, prompts, metadata, source image texts or None)`` with types and lengths
    checked, nothing decoded; or :class:`RequestError` (400)."""
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


def decode_pngs(pngs: list[bytes], size: tuple[int, int]):
    """PNG bytes of checked ``size`` → ``[B, 3, H, W]`` float32 images; 400 for corrupt or truncated data."""
    width, height = size
    arrays = np.empty((len(pngs), height, width, 3), dtype=np.uint8)
    for index, data in enumerate(pngs):
        try:
            arrays[index] = png_pixels(data)
        except ValueError as err:
            raise RequestError(400, f"image {index} is {err}") from None
    return images_from_uint8(arrays)


class RewardServer(ThreadingHTTPServer):
    """A threaded HTTP server for one reward.

    Args:
        reward (callable): the reward to serve.
        name (str): its name, reported by ``/health`` and in error messages.
        host (str, default ``127.0.0.1``), port (int, default 8000; 0 picks a free port).
        token (str, optional): when set, ``/score`` requires ``Authorization: Bearer <token>``.
        max_request_bytes (int, default 64 MiB): larger bodies get 413.
        max_image_pixels (int, default 4096*4096), max_request_pixels (int, default 64 Mi): more decoded
            pixels in one image, or in all images of a request, get 413 before anything is decoded.
        read_timeout (float, default 30): seconds a client may send nothing within a request (after its
            request line) before it gets 408.
        max_connections (int, default 16): connections served at once; more are answered 503 and closed.

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
    ):
        if min(max_request_bytes, max_image_pixels, max_request_pixels, read_timeout, max_connections) <= 0:
            raise ValueError("the server's limits and read_timeout must be positive")
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self.busy_refusals = 0  # connections answered 503
        self.peak_connections, self._active = 0, 0
        self._active_lock = threading.Lock()
        self._jobs = queue.SimpleQueue()  # before binding: a failed bind calls server_close
        self._refusals = queue.Queue(maxsize=_REFUSALS_QUEUED)
        super().__init__((host, port), _RewardHandler)
        self.reward, self.reward_name, self.token = reward, name, token
        self.max_request_bytes, self.read_timeout = max_request_bytes, read_timeout
        self.max_image_pixels, self.max_request_pixels = max_image_pixels, max_request_pixels
        self.scoring_thread = threading.Thread(target=self._run_jobs, name=f"score {name}", daemon=True)
        self.scoring_thread.start()
        self._refusing_thread = threading.Thread(target=self._run_refusals, name=f"refuse {name}", daemon=True)
        self._refusing_thread.start()
        try:
            self.reward_signature = inspect.signature(reward)
        except (TypeError, ValueError):  # some callables have none: then metadata goes unchecked
            self.reward_signature = None

    def process_request(self, request, client_address):
        """A thread for the connection while fewer than ``max_connections`` are served; else 503 and close."""
        if not self._slots.acquire(blocking=False):
            self.busy_refusals += 1
            try:
                self._refusals.put_nowait(request)
            except queue.Full:
                self.shutdown_request(request)
            return
        with self._active_lock:
            self._active += 1
            self.peak_connections = max(self.peak_connections, self._active)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release_slot()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release_slot()

    def _release_slot(self) -> None:
        with self._active_lock:
            self._active -= 1
        self._slots.release()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def score(self, body: bytes) -> list:
        """Request body → scores: :class:`RequestError` for the request's faults, :class:`RewardFailed` for
        the reward's. Only decoding and scoring wait for the scoring thread, so a bad request never does."""
        texts, prompts, metadata, sources = parse_score_request(body)
        del body  # while waiting for the scoring thread, hold only the PNG bytes
        self._check_metadata({**metadata, **({} if sources is None else {"source_images": None})})
        # source images count against the limits like the outputs, and must have their size
        pngs, size = check_png_headers(texts + (sources or []), self.max_image_pixels, self.max_request_pixels)
        del texts, sources
        future = Future()
        self._jobs.put((future, lambda: self._decode_and_score(pngs, size, prompts, metadata)))
        return future.result()

    def _decode_and_score(self, pngs: list[bytes], size: tuple[int, int], prompts: list[str], metadata: dict):
        decoded = decode_pngs(pngs, size)
        images = decoded[: len(prompts)]
        if len(decoded) > len(prompts):
            metadata = {**metadata, "source_images": decoded[len(prompts):]}
        try:
            result = self.reward(images, prompts, **metadata)
        except Exception as err:
            raise RewardFailed(f"reward {self.reward_name!r} raised {type(err).__name__}: {err}") from err
        return self._checked_scores(result, len(prompts))

    def _run_jobs(self) -> None:
        while (item := self._jobs.get()) is not None:
            future, job = item
            try:
                future.set_result(job())
            except BaseException as err:
                future.set_exception(err)
            del item, future, job  # do not hold a request's images until the next one arrives

    def _run_refusals(self) -> None:
        """One thread answers every refused connection, so that a slow client never holds up ``accept``."""
        while (connection := self._refusals.get()) is not None:
            _answer_busy(connection, self.max_connections, self.max_request_bytes)
            self.shutdown_request(connection)

    def server_close(self):
        super().server_close()
        self._jobs.put(None)
        while True:  # close the connections still waiting for their 503, so that the stop signal fits the queue
            try:
                connection = self._refusals.get_nowait()
            except queue.Empty:
                break
            if connection is not None:  # (None: the stop signal of an earlier call)
                self.shutdown_request(connection)
        self._refusals.put(None)

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
        except Exception as err:
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


def _answer_busy(connection: socket.socket, limit: int, max_request_bytes: int) -> None:
    """503 in JSON, then a lingering close, so that the client sees the 503 rather than a reset (broken pipe)."""
    body = json.dumps({"error": f"the server is serving its limit of {limit} connections; retry shortly"}).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Retry-After: 1\r\nConnection: close\r\n\r\n").encode()
    start = time.monotonic()
    try:
        connection.settimeout(_BUSY_ANSWER_TIMEOUT)
        connection.sendall(head + body)
    except OSError:
        return
    left = _BUSY_ANSWER_TIMEOUT - (time.monotonic() - start)  # one deadline for the answer and the lingering
    linger(connection, connection.recv, _DRAIN_FACTOR * max_request_bytes, left)


def linger(connection: socket.socket, read, budget: int, seconds: float) -> None:
    """Lingering close after answering early: stop sending, then read (``read(n)``) and drop what the client still
    sends, up to ``budget`` bytes and ``seconds``, because closing with unread data resets the connection, and a
    reset can discard our answer before a client that is still writing its request reads it."""
    try:
        connection.shutdown(socket.SHUT_WR)
    except OSError:
        return
    deadline = time.monotonic() + seconds
    while budget > 0 and (left := deadline - time.monotonic()) > 0:
        try:
            connection.settimeout(left)
            chunk = read(min(budget, 1 << 16))
        except OSError:  # a timeout, a reset, or a socket that timed out before
            return
        if not chunk:
            return
        budget -= len(chunk)


class _RewardHandler(BaseHTTPRequestHandler):
    server: RewardServer
    server_version = "tempflow-reward/1"

    def setup(self):
        self.timeout = self.server.read_timeout  # StreamRequestHandler.setup puts it on the socket
        super().setup()

    def parse_request(self) -> bool:
        try:
            return super().parse_request()
        except TimeoutError:  # stalled within the headers (http.server would drop the connection unanswered)
            self._reply(408, {"error": self._stalled("the headers")}, close=True)
            return False

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
            self._check_token()
            self._check_size(self._unread)
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

    def _check_token(self) -> None:
        if self.server.token is None:
            return
        expected = f"Bearer {self.server.token}".encode()
        if not hmac.compare_digest(self.headers.get("Authorization", "").encode(), expected):
            raise RequestError(401, "missing or wrong token (send `Authorization: Bearer <token>`)")

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
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            raise RequestError(408, self._stalled(f"the body ({length} bytes announced)")) from None
        if len(body) < length:
            raise RequestError(400, f"the body ended after {len(body)} of the {length} bytes announced")
        self._unread = 0
        return body

    def _stalled(self, part: str) -> str:
        return f"the client sent nothing for {self.server.read_timeout:g} s within {part}"

    def _no_such_path(self) -> str:
        path = self.path if len(self.path) <= 100 else f"{self.path[:100]}..."
        return f"no such path {path!r}"

    def _reply_error(self, status: int, message: str) -> None:
        if self._unread == 0:
            return self._reply(status, {"error": message})
        self._reply(status, {"error": message}, close=True)
        self._drain(self._unread)

    def _drain(self, unread: int | None) -> None:
        """Lingering close (:func:`linger`) through ``rfile``, which may hold part of the body already."""
        budget = _DRAIN_FACTOR * self.server.max_request_bytes
        budget = budget if unread is None else min(unread, budget)
        linger(self.connection, self.rfile.read1, budget, self.server.read_timeout)

    def _reply(self, status: int, payload: dict, close: bool = False) -> None:
        if self.request_version == "HTTP/0.9":  # a garbled or HTTP/0.9 request line: still send a status line
            self.request_version = self.protocol_version
        data = json.dumps(payload).encode()
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
        logger.info("%s %s", self.address_string(), format % args)


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
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        help=f"connections served at once; more get 503 (default: {DEFAULT_MAX_CONNECTIONS})",
    )
    parser.add_argument(
        "--reward-kwargs", default="{}", help="JSON object of the reward's constructor arguments"
    )
    return parser


def _checked_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """Refuse flags the server cannot work with (exit 2, one line); return the reward's keyword arguments."""
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be 0 to 65535, not {args.port}")
    for flag in ("max_request_mb", "max_image_pixels", "max_request_pixels", "read_timeout", "max_connections"):
        value = getattr(args, flag)
        if not (math.isfinite(value) and value > 0):
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
