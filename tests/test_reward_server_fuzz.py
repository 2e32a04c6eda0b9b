"""A bounded, seeded fuzz of ``tempflow serve-reward`` in its own process, over loopback: hostile and randomly
mutated requests all get a JSON answer with a 4xx status (501/505 for a bad method or HTTP version, 200 for
a valid request, never 500), the server's peak memory stays bounded, and it still scores at the end."""

import base64
import json
import random
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest

from tempflow.rewards.remote import encode_png

SEED = 1234
MUTATIONS = 500  # plus about 80 fixed cases: under 1000 requests in all
MAX_IMAGE_PIXELS = 1024 * 1024
MAX_REQUEST_PIXELS = 4 * MAX_IMAGE_PIXELS
MAX_REQUEST_IMAGES = 8
# Peak RSS over the idle server's (after one small request): a full request decodes to 12 bytes per pixel
# (float32), 48 MiB at these limits, beside the bodies in memory; measured +103 to +148 MB (idle 539 MB) on a
# 2-core CPU box.
# Without the limits, the one 12000x12000 bomb below took 4.8 GB; decoding on each connection's thread
# multiplied that by the burst, and let memory creep up ~23 MB a request by using a malloc arena per thread.
RSS_HEADROOM_MB = 200
ERROR_STATUSES = set(range(400, 500)) | {501, 505}
RANDOM_KINDS = ("bytes", "truncated png", "huge header", "base64", "types", "lengths")
RANDOM_KINDS += ("mutated body", "mutated request")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bilevel_png(width: int, height: int, rows: int | None = None) -> bytes:
    """An all-black 1-bit PNG built a row at a time (12000x12000: 17 KB); with ``rows``, only that many rows
    of data follow the header, so that only the header is honest."""
    compressor, row = zlib.compressobj(9), bytes(1 + (width + 7) // 8)
    idat = (
        b"".join(compressor.compress(row) for _ in range(height if rows is None else rows))
        + compressor.flush()
    )
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def grey16_png(width: int, height: int) -> bytes:
    """A 16-bit greyscale PNG of a left-to-right ramp (Pillow opens it in mode "I;16")."""
    row = b"\x00" + np.linspace(0, 65535, width).astype(">u2").tobytes()
    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(row * height))
            + png_chunk(b"IEND", b""))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def body_of(images: list[str], prompts=None, metadata=None) -> bytes:
    prompts = ["p"] * len(images) if prompts is None else prompts
    return json.dumps({"images": images, "prompts": prompts, "metadata": metadata or {}}).encode()


def post(body: bytes, path: str = "/score", length: str | None = None) -> bytes:
    length = str(len(body)) if length is None else length
    return f"POST {path} HTTP/1.1\r\nHost: fuzz\r\nContent-Length: {length}\r\n\r\n".encode() + body


def exchange(port: int, data: bytes, hang_up: bool = True, wait_s: float = 20.0):
    """Send raw bytes (then end the stream unless the case is a stall); ``(status, headers, body bytes)``."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        try:
            sock.sendall(data)
            if hang_up:
                sock.shutdown(socket.SHUT_WR)
        except (
            BrokenPipeError,
            ConnectionResetError,
        ):  # the server answered early; its answer is still there
            pass
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return int(re.search(r"VmHWM:\s+(\d+) kB", status.read()).group(1)) / 1024


class Cases:
    """Request bytes with the statuses each may get, drawn from one seeded generator."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        arrays = np.random.default_rng(seed).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
        self.pngs = [base64.b64decode(encode_png(a)) for a in arrays]
        self.valid = body_of([b64(p) for p in self.pngs[:2]])
        self.bomb = bilevel_png(12_000, 12_000)
        self.at_cap = body_of([b64(bilevel_png(1024, 1024))] * 4)  # exactly MAX_REQUEST_PIXELS

    def fixed(self):
        """``(name, request bytes, allowed statuses, hang_up)`` for each known attack."""
        bomb, png = b64(self.bomb), self.pngs[0]
        yield "valid", post(self.valid), {200}, True
        yield "at the pixel limits", post(self.at_cap), {200}, True
        yield "12000x12000 bomb", post(body_of([bomb])), {413}, True
        yield "bomb after a good image", post(body_of([b64(png), bomb])), {413}, True
        yield "bomb header, no data", post(body_of([b64(bilevel_png(12_000, 12_000, rows=0))])), {413}, True
        yield "one pixel over", post(body_of([b64(bilevel_png(1025, 1024))])), {413}, True
        yield "too many pixels", post(body_of([b64(bilevel_png(1024, 1024))] * 5)), {413}, True
        yield "too many images", post(body_of([b64(png)] * (MAX_REQUEST_IMAGES + 1))), {413}, True
        yield "16-bit greyscale", post(body_of([b64(grey16_png(16, 16))])), {200}, True
        yield "huge Content-Length", post(b"", length="1000000000000"), {413}, False
        yield "huger Content-Length", post(b"", length="9" * 5000), {413}, False
        yield "body over the limit", post(bytes(5 * 2**20)), {413}, True
        yield "deep JSON", post(b"[" * 100_000), {400}, True
        yield (
            "deep metadata",
            post(body_of([b64(png)], metadata={"spec": [json.loads("[" * 80 + "]" * 80)]})),
            {400},
            True,
        )
        yield "empty body", post(b""), {400}, True
        yield "no images", post(body_of([])), {400}, True
        yield "mismatched prompts", post(body_of([b64(png)] * 2, prompts=["a"])), {400}, True
        yield "mismatched metadata", post(body_of([b64(png)] * 2, metadata={"spec": [1]})), {400}, True
        yield "metadata named images", post(body_of([b64(png)], metadata={"images": [1]})), {400}, True
        yield "mixed sizes", post(body_of([b64(png), b64(bilevel_png(8, 8))])), {400}, True
        yield "zero width", post(body_of([b64(bilevel_png(0, 8))])), {400}, True
        for value in ("", "abc", "-1", "+5", "1e3", "0x10", "１２", "12, 12"):
            yield f"Content-Length {value!r}", post(self.valid, length=value), {400, 411}, True
        two = b"POST /score HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}"
        yield "two Content-Lengths", two, {400}, True
        yield "no Content-Length", b"POST /score HTTP/1.1\r\n\r\n" + self.valid, {411}, True
        chunked = b"POST /score HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        yield "chunked", chunked, {411}, True
        yield "short body", post(self.valid[:-10], length=str(len(self.valid))), {400}, True
        for method in ("PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "FOO", "P0ST"):
            yield f"method {method}", f"{method} /score HTTP/1.1\r\n\r\n".encode(), {501}, True
        for path in ("/", "/score/", "/score?x=1", "/../etc/passwd", "*", "/%00", "/" + "a" * 5000):
            yield f"path {path[:20]}", post(self.valid, path=path), {404}, True
        yield "GET /score", b"GET /score HTTP/1.1\r\n\r\n", {405}, True
        yield "POST /health", post(self.valid, path="/health"), {405}, True
        yield "long request line", b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", {414}, True
        yield "long header", b"GET /health HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", {431}, True
        yield "many headers", b"GET /health HTTP/1.1\r\n" + b"X: y\r\n" * 120 + b"\r\n", {431}, True
        yield "garbage line", b"\x00\xff garbage \x01\r\n\r\n", {400}, True
        yield "HTTP/2.0", b"GET /health HTTP/2.0\r\n\r\n", {505}, True
        yield "bad version", b"GET /health HTTP/x\r\n\r\n", {400}, True
        yield "wrong types", post(b'{"images": "abc", "prompts": []}'), {400}, True
        yield "stalled body", post(self.valid)[: -len(self.valid) // 2], {408}, False
        yield "stalled headers", b"POST /score HTTP/1.1\r\nContent-Le", {408}, False

    def random(self):
        """One randomly built or mutated request."""
        rng = self.rng
        png = rng.choice(self.pngs)
        kind = rng.choice(RANDOM_KINDS)
        if kind == "bytes":
            return kind, post(rng.randbytes(rng.randrange(1, 4096))), {400}
        if kind == "truncated png":
            return kind, post(body_of([b64(png[: rng.randrange(len(png))])])), {200, 400}
        if kind == "huge header":
            width, height = rng.randrange(1, 2**31), rng.randrange(1, 2**31)
            if width * height <= MAX_IMAGE_PIXELS:
                width = MAX_IMAGE_PIXELS + 1
            header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            data = b"\x89PNG\r\n\x1a\n" + header + png[33 : 33 + rng.randrange(len(png) - 33)]
            return kind, post(body_of([b64(data)])), {400, 413}
        if kind == "base64":
            text = b64(png)
            cut = rng.randrange(len(text))
            text = text[:cut] + rng.choice(["!", "é", " ", "=", "%%", "\x00"]) + text[cut + 1 :]
            return kind, post(body_of([text])), {400}
        if kind == "types":
            field = rng.choice(["images", "prompts", "metadata"])
            value = rng.choice([None, 3, "x", 1.5, [1, 2], {"a": 1}, [None], [[b64(png)]], True])
            request = json.loads(self.valid)
            request[field] = value
            return kind, post(json.dumps(request).encode()), {200, 400}  # metadata null is no metadata
        if kind == "lengths":
            images, prompts = rng.randrange(0, 4), rng.randrange(0, 4)
            request = body_of([b64(png)] * images, prompts=["p"] * prompts)
            return kind, post(request), {200} if images == prompts > 0 else {400}
        if kind == "mutated body":
            return kind, post(self._mutated(self.valid)), {200, 400, 413}
        return kind, self._mutated(post(self.valid), head_only=True), {200} | ERROR_STATUSES

    def _mutated(self, data: bytes, head_only: bool = False) -> bytes:
        data = bytearray(data)
        end = data.index(b"\r\n\r\n") if head_only else len(data)
        for _ in range(self.rng.randrange(1, 5)):
            where = self.rng.randrange(end)
            action = self.rng.choice(["flip", "insert", "delete"])
            if action == "flip":
                data[where] ^= 1 << self.rng.randrange(8)
            elif action == "insert":
                data[where:where] = bytes([self.rng.randrange(256)])
            else:
                del data[where]
        return bytes(data)


def check(name: str, reply, allowed: set) -> None:
    status, headers, body = reply
    assert status in allowed, (name, status, body[:300])
    assert headers.get("content-type") == "application/json", (name, headers)
    answer = json.loads(body)
    if status != 200:
        assert isinstance(answer.get("error"), str) and answer["error"], (name, answer)
        assert " at 0x" not in answer["error"], (name, answer)


@pytest.fixture
def server_process(tmp_path):
    """``(process, port, stderr path)`` of ``python -m tempflow.rewards.server brightness`` on a free port."""
    stderr_path = tmp_path / "server.err"
    limits = ["--max-image-pixels", str(MAX_IMAGE_PIXELS), "--max-request-pixels", str(MAX_REQUEST_PIXELS),
              "--max-request-images", str(MAX_REQUEST_IMAGES)]
    command = [
        sys.executable,
        "-m",
        "tempflow.rewards.server",
        "brightness",
        "--port",
        "0",
        "--max-request-mb",
        "4",
        "--read-timeout",
        "1",
        *limits,
    ]
    with (
        open(stderr_path, "w") as stderr,
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True) as process,
    ):
        try:
            ready, _, _ = select.select([process.stdout], [], [], 60)
            line = process.stdout.readline() if ready else ""
            port = re.search(r"http://127\.0\.0\.1:(\d+)", line)
            assert port, f"no address announced: {line!r}; {stderr_path.read_text()}"
            yield process, int(port.group(1)), stderr_path
        finally:
            process.terminate()
            process.wait(timeout=30)


def test_fuzzing_the_server_gets_json_4xx_within_bounded_memory(server_process):
    process, port, stderr_path = server_process
    cases = Cases(SEED)
    check("warm-up", exchange(port, post(cases.valid)), {200})
    baseline = peak_rss_mb(process.pid)
    start, count = time.monotonic(), 1

    for name, data, allowed, hang_up in cases.fixed():
        check(name, exchange(port, data, hang_up=hang_up), allowed)
        count += 1
    for _ in range(MUTATIONS):
        name, data, allowed = cases.random()
        check(name, exchange(port, data), allowed)
        count += 1

    replies, burst = [], [post(cases.at_cap), post(body_of([b64(cases.bomb)] * 3))] * 4
    threads = [threading.Thread(target=lambda d=d: replies.append(exchange(port, d))) for d in burst]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(status for status, _, _ in replies) == [200] * 4 + [413] * 4
    count += len(burst)

    check("still serving", exchange(port, post(cases.valid)), {200})
    assert process.poll() is None
    peak = peak_rss_mb(process.pid)
    seconds = time.monotonic() - start
    print(f"{count + 1} requests in {seconds:.1f} s; server peak RSS {peak:.0f} MB, idle {baseline:.0f} MB")
    assert count + 1 <= 1000 and seconds < 60
    assert peak < baseline + RSS_HEADROOM_MB, (peak, baseline)
    assert "Traceback" not in stderr_path.read_text()
