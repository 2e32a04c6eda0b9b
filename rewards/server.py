"""Serve any registered reward over HTTP (``tempflow serve-reward NAME``) for the ``remote`` reward client.
Standard library only: a threaded ``http.server`` whose requests score one at a time under a lock (the model
is loaded once and may not be thread-safe). ``GET /health`` answers ``{"status": "ok", "reward": NAME}``;
``POST /score`` takes the wire format of :mod:`tempflow.rewards.remote`. Bad requests get a 4xx status with
``{"error": message}`` (400 malformed, 401 bad token, 404, 411, 413 too large); a reward that raises gets 500;
the server keeps serving either way."""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from . import get_reward
from .remote import TOKEN_ENV, decode_png, finite_or_none, images_from_uint8

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_MB = 64.0
_DRAIN_FACTOR = 4  # read and drop up to this many times the limit so the client can read our 413


class RequestError(Exception):
    """A request the server answers with a 4xx status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_score_request(body: bytes):
    """JSON body → ``(images [B, 3, H, W], prompts, metadata)``, or :class:`RequestError` (400)."""
    try:
        request = json.loads(body)
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
    try:
        arrays = [decode_png(text) for text in images]
    except ValueError as err:
        raise RequestError(400, str(err)) from None
    if len({a.shape for a in arrays}) > 1:
        raise RequestError(400, "all images of a request must have the same size")
    return images_from_uint8(np.stack(arrays)), prompts, metadata


class RewardServer(ThreadingHTTPServer):
    """A threaded HTTP server for one reward.

    Args:
        reward (callable): the reward to serve.
        name (str): its name, reported by ``/health`` and in error messages.
        host (str, default ``127.0.0.1``), port (int, default 8000; 0 picks a free port).
        token (str, optional): when set, ``/score`` requires ``Authorization: Bearer <token>``.
        max_request_bytes (int, default 64 MiB): larger bodies get 413.
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
    ):
        super().__init__((host, port), _RewardHandler)
        self.reward, self.reward_name, self.token = reward, name, token
        self.max_request_bytes = max_request_bytes
        self.score_lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def score(self, body: bytes) -> list:
        images, prompts, metadata = parse_score_request(body)
        with self.score_lock:
            scores = list(self.reward(images, prompts, **metadata))
        if len(scores) != len(prompts):
            raise RuntimeError(f"returned {len(scores)} scores for {len(prompts)} images")
        return [finite_or_none(score) for score in scores]


class _RewardHandler(BaseHTTPRequestHandler):
    server: RewardServer
    server_version = "tempflow-reward/1"
    timeout = 120  # seconds a slow client may stall before its connection is dropped

    def do_GET(self):
        if self.path != "/health":
            return self._reply(404, {"error": f"no such path {self.path!r}; use GET /health or POST /score"})
        self._reply(200, {"status": "ok", "reward": self.server.reward_name})

    def do_POST(self):
        length = None
        try:
            length = self._content_length()
            if self.path != "/score":
                raise RequestError(404, f"no such path {self.path!r}; use POST /score")
            self._check_token()
            if length > self.server.max_request_bytes:
                limit_mb = self.server.max_request_bytes / 2**20
                raise RequestError(
                    413, f"request of {length} bytes exceeds the server's limit of {limit_mb:g} MB"
                )
            body, length = self.rfile.read(length), 0
            scores = self.server.score(body)
        except RequestError as err:
            self._discard(length)
            return self._reply(err.status, {"error": str(err)})
        except Exception as err:
            logger.exception("reward %r failed", self.server.reward_name)
            message = f"reward {self.server.reward_name!r} raised {type(err).__name__}: {err}"
            return self._reply(500, {"error": message})
        self._reply(200, {"scores": scores})

    def _content_length(self) -> int:
        try:
            length = int(self.headers["Content-Length"])
        except (TypeError, ValueError):
            raise RequestError(411, "a Content-Length header is required") from None
        if length < 0:
            raise RequestError(400, "negative Content-Length")
        return length

    def _check_token(self) -> None:
        if self.server.token is None:
            return
        expected = f"Bearer {self.server.token}".encode()
        if not hmac.compare_digest(self.headers.get("Authorization", "").encode(), expected):
            raise RequestError(401, "missing or wrong token (send `Authorization: Bearer <token>`)")

    def _discard(self, length: int | None) -> None:
        """Read the unread body so that closing the connection does not reset it before the client reads."""
        remaining = min(length or 0, _DRAIN_FACTOR * self.server.max_request_bytes)
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            if not chunk:
                break
            remaining -= len(chunk)

    def _reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        logger.info("%s %s", self.address_string(), format % args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tempflow serve-reward", description="Serve a reward over HTTP.")
    parser.add_argument("reward", help="a registered reward name or a 'package.module:function' path")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port (0 picks a free one)")
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        help=f"shared secret clients must send (default: ${TOKEN_ENV})",
    )
    parser.add_argument(
        "--max-request-mb",
        type=float,
        default=DEFAULT_MAX_REQUEST_MB,
        help="largest request body accepted, in MiB",
    )
    parser.add_argument(
        "--reward-kwargs", default="{}", help="JSON object of the reward's constructor arguments"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """``tempflow serve-reward``: load the reward once, then serve until interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        reward_kwargs = json.loads(args.reward_kwargs)
    except ValueError as err:
        parser.error(f"--reward-kwargs is not JSON: {err}")
    if not isinstance(reward_kwargs, dict):
        parser.error("--reward-kwargs must be a JSON object")
    reward = get_reward(args.reward, **reward_kwargs)
    server = RewardServer(
        reward,
        args.reward,
        args.host,
        args.port,
        args.token,
        max_request_bytes=int(args.max_request_mb * 2**20),
    )
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
