"""Background reward scoring, the HTTP reward server and the ``remote`` reward client (loopback only); the
server's hardening against hostile requests (limits, timeouts, JSON errors, its command's flags)."""

import base64
import contextlib
import json
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from tempflow.rewards import get_reward, to_uint8
from tempflow.rewards.remote import TOKEN_ENV, RemoteRewardError, encode_png, images_from_uint8
from tempflow.rewards.server import DEFAULT_MAX_IMAGE_PIXELS, RewardServer, main
from tempflow.shapes.world import render_scene, sample_prompt


@pytest.fixture(autouse=True)
def _no_token_in_environment(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)


@contextlib.contextmanager
def serving(reward, name="test", **kwargs):
    server = RewardServer(reward, name, port=0, **kwargs)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def quantized_images(count, seed=0, size=(24, 20)):
    """Random images already on the 8-bit grid, so PNG transport changes nothing."""
    images = torch.rand(count, 3, *size, generator=torch.Generator().manual_seed(seed))
    return images_from_uint8(to_uint8(images))


def shapes_batch(count, seed=0):
    rng = np.random.default_rng(seed)
    items = [sample_prompt(rng) for _ in range(count)]
    arrays = np.stack([render_scene(item["spec"], rng) for item in items])
    arrays[-1] = 240  # an empty canvas: a partial score below 1
    return images_from_uint8(arrays), [item["prompt"] for item in items], [item["spec"] for item in items]


def post(url, body: bytes, headers=None):
    """``(status, decoded JSON)`` of a raw POST."""
    request = urllib.request.Request(url, data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def score_body(images, prompts, **metadata):
    return json.dumps(
        {"images": [encode_png(a) for a in to_uint8(images)], "prompts": prompts, "metadata": metadata}
    ).encode()


def png_body(pngs: list[bytes], **metadata) -> bytes:
    images = [base64.b64encode(png).decode() for png in pngs]
    return json.dumps({"images": images, "prompts": ["p"] * len(pngs), "metadata": metadata}).encode()


def bilevel_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of any size, built a row at a time (12000x12000: 17 KB, like the attack)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, row = zlib.compressobj(9), bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def exchange(server, data: bytes, wait_s: float = 10.0, hang_up: bool = False):
    """Send raw bytes (then, with ``hang_up``, end the stream), read until the server closes:
    ``(status, headers, JSON body or None, seconds)``."""
    start = time.monotonic()
    with socket.create_connection(server.server_address[:2], timeout=wait_s) as sock:
        sock.sendall(data)
        if hang_up:
            sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    elapsed = time.monotonic() - start
    head, _, body = reply.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), headers, json.loads(body) if body else None, elapsed


# ---------------------------------------------------------------------------------------- server and client


def test_remote_scores_equal_local_scores():
    images = quantized_images(5)
    with serving(get_reward("brightness"), "brightness") as server:
        remote = get_reward("remote", url=server.url, batch_size=2)
        assert remote(images, ["p"] * 5) == get_reward("brightness")(images, ["p"] * 5)
        with urllib.request.urlopen(f"{server.url}/health", timeout=30) as response:
            assert json.loads(response.read()) == {"status": "ok", "reward": "brightness"}

    images, prompts, specs = shapes_batch(6)
    local = get_reward("shapes")(images, prompts, spec=specs)
    assert min(local) < 1.0
    with serving(get_reward("shapes"), "shapes") as server:
        assert get_reward("remote", url=server.url, batch_size=4)(images, prompts, spec=specs) == local


def test_edit_rewards_get_the_source_images_through_the_server():
    """An edit's source images travel as PNGs beside the outputs, count against the same limits, and reach the
    reward as ``source_images``; a reward that does not take them gets 400, not 500."""
    outputs, sources = quantized_images(3, seed=1), quantized_images(3, seed=2)

    def change(images, prompts, source_images):
        return (images - source_images).abs().mean(dim=(1, 2, 3)).tolist()

    with serving(change) as server:
        remote = get_reward("remote", url=server.url, batch_size=2)
        scores = remote(outputs, ["a", "b", "c"], source_images=sources)
    assert scores == pytest.approx(change(outputs, None, sources), abs=1e-6)
    with serving(lambda images, prompts: [0.0] * len(prompts)) as server:
        with pytest.raises(RemoteRewardError, match="HTTP 400: `metadata` does not fit reward"):
            get_reward("remote", url=server.url, retries=0)(outputs, ["a", "b", "c"], source_images=sources)
    with serving(change, max_request_pixels=4 * 24 * 20) as server:  # 3 outputs + 3 sources: over the limit
        with pytest.raises(RemoteRewardError, match="HTTP 413"):
            get_reward("remote", url=server.url, retries=0)(outputs, ["a", "b", "c"], source_images=sources)


def _stalled_client(server, announced=100_000):
    """A client that sends its headers and a first slice of the body, then nothing."""
    client = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10)
    client.sendall(f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: {announced}\r\n\r\n{{".encode())
    return client


def test_a_load_of_clients_is_served_within_the_connection_limit_and_nothing_is_lost():
    """64 clients at once and 4 that stall mid-body, against 8 connections: the stalled ones get 408 and free their
    slots, the others are refused (503) or served, retry, and every batch ends scored exactly as locally."""
    brightness = get_reward("brightness")

    def slow_brightness(images, prompts):
        time.sleep(0.01)
        return brightness(images, prompts)

    batches = [quantized_images(2, seed=i) for i in range(64)]
    with serving(slow_brightness, max_connections=8, read_timeout=0.5) as server:
        stalled = [_stalled_client(server) for _ in range(4)]
        results = [None] * len(batches)

        def call(index):
            remote = get_reward("remote", url=server.url, retries=20, retry_wait=0.05, timeout=30)
            results[index] = remote(batches[index], ["p", "p"])

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(batches))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        answers = [client.recv(4096) for client in stalled]
        for client in stalled:
            client.close()
        assert server.peak_connections <= 8 and server.busy_refusals > 0
    assert all(b"408" in answer.split(b"\r\n")[0] for answer in answers)
    for batch, result in zip(batches, results):
        assert result == brightness(batch, ["p", "p"])


def test_a_client_refused_past_its_retries_fails_loudly():
    with serving(get_reward("brightness"), "brightness", max_connections=1, read_timeout=5) as server:
        holder = _stalled_client(server)
        time.sleep(0.2)  # the one slot is taken
        with pytest.raises(RemoteRewardError, match="HTTP 503: the server is serving its limit of 1 connections"):
            get_reward("remote", url=server.url, retries=2, retry_wait=0.01)(quantized_images(1), ["p"])
        holder.close()


def test_bad_requests_get_4xx_with_a_message_and_the_server_keeps_serving():
    images = quantized_images(2)
    good = score_body(images, ["a", "b"])
    with serving(get_reward("brightness"), max_request_bytes=len(good) + 100) as server:
        score_url = f"{server.url}/score"
        bad_png = json.dumps({"images": [base64.b64encode(b"not a png").decode()], "prompts": ["a"]}).encode()
        cases = [
            (b"{not json", 400, "malformed JSON"),
            (json.dumps({"images": [encode_png(to_uint8(images)[0])]}).encode(), 400, "`prompts`"),
            (json.dumps({"images": [], "prompts": []}).encode(), 400, "non-empty"),
            (bad_png, 400, "image 0 is not a valid PNG"),
            (score_body(images, ["a"]), 400, "2 images but 1 prompts"),
            (score_body(quantized_images(2, size=(64, 64)), ["a", "b"]), 413, "exceeds the server's limit"),
        ]
        for body, status, message in cases:
            code, answer = post(score_url, body)
            assert code == status and message in answer["error"], (code, answer)
            assert post(score_url, good) == (200, {"scores": get_reward("brightness")(images, ["a", "b"])})
        assert post(f"{server.url}/elsewhere", good)[0] == 404


def test_a_failing_reward_gets_500_naming_it_and_is_not_retried():
    calls = []

    def fragile(images, prompts, **metadata):
        calls.append(len(prompts))
        if len(prompts) == 1:
            raise ValueError("cannot score a single image")
        return [0.5] * len(prompts)

    with serving(fragile, "fragile") as server:
        remote = get_reward("remote", url=server.url, retries=3, retry_wait=0)
        with pytest.raises(
            RemoteRewardError, match="HTTP 500: reward 'fragile' raised ValueError: cannot score"
        ):
            remote(quantized_images(1), ["a"])
        assert remote(quantized_images(2), ["a", "b"]) == [0.5, 0.5]
    assert calls == [1, 2]


def test_a_token_is_required_when_set():
    images = quantized_images(2)
    with serving(get_reward("brightness"), token="s3cret") as server:
        for token in (None, "wrong"):
            with pytest.raises(RemoteRewardError, match="HTTP 401: missing or wrong token"):
                get_reward("remote", url=server.url, token=token, retries=0)(images, ["a", "b"])
        expected = get_reward("brightness")(images, ["a", "b"])
        assert get_reward("remote", url=server.url, token="s3cret")(images, ["a", "b"]) == expected


def test_an_unreachable_server_fails_clearly_after_the_retries(monkeypatch):
    with socket.socket() as probe:  # a port that nothing listens on once the socket is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    waits = []
    monkeypatch.setattr("tempflow.rewards.remote.time.sleep", waits.append)
    remote = get_reward("remote", url=f"http://127.0.0.1:{port}", retries=2, retry_wait=0.5, timeout=5)
    with pytest.raises(RemoteRewardError, match=r"no answer after 3 attempt\(s\); last error: .*refused"):
        remote(quantized_images(1), ["a"])
    assert waits == [0.5, 1.0]


def test_serve_reward_command_serves_until_stopped():
    command = [
        sys.executable,
        "-c",
        "import sys; from tempflow.rewards.server import main; sys.exit(main())",
        "brightness",
        "--port",
        "0",
        "--token",
        "t0k",
    ]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as process:
        try:
            ready, _, _ = select.select([process.stdout], [], [], 60)
            line = process.stdout.readline() if ready else ""
            url = re.search(r"http://\S+", line)
            assert url, f"no address announced: {line!r}"
            images = quantized_images(3)
            remote = get_reward("remote", url=url.group(0), token="t0k", retries=0)
            assert remote(images, ["p"] * 3) == get_reward("brightness")(images, ["p"] * 3)
        finally:
            process.terminate()
            process.wait(timeout=30)


def test_serve_reward_rejects_bad_reward_kwargs():
    with pytest.raises(SystemExit):
        main(["brightness", "--reward-kwargs", "[1, 2]"])
    with pytest.raises(SystemExit):
        main(["brightness", "--reward-kwargs", "{oops"])


# ---------------------------------------------------------------------------------- hostile requests


def test_a_huge_content_length_gets_413_at_once_and_the_connection_closes():
    with serving(get_reward("brightness")) as server:
        for length in ("1000000000000", "9" * 40):
            status, headers, answer, seconds = exchange(
                server, f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode()
            )
            assert status == 413 and "exceeds the server's limit" in answer["error"], answer
            assert headers["connection"] == "close" and headers["content-type"] == "application/json"
            assert seconds < 1.0  # the answer and the end of the connection, without a byte of body sent
        assert exchange(server, b"GET /health HTTP/1.1\r\n\r\n")[0] == 200


def test_a_stalled_client_gets_408():
    with serving(get_reward("brightness"), read_timeout=0.5) as server:
        head = b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
        status, headers, answer, seconds = exchange(server, head + b'{"images": [')
        assert status == 408 and "sent nothing for 0.5 s within the body" in answer["error"], answer
        assert headers["connection"] == "close" and 0.4 < seconds < 5
        stalled_headers = b"POST /score HTTP/1.1\r\nHost: x\r\n"
        status, _, answer, _ = exchange(server, stalled_headers)
        assert status == 408 and "within the headers" in answer["error"], answer
        assert exchange(server, b"GET /health HTTP/1.1\r\n\r\n")[0] == 200


def test_deeply_nested_json_gets_400():
    images = quantized_images(1)
    nested = json.loads(score_body(images, ["p"]))
    nested["metadata"] = {"spec": [json.loads("[" * 70 + "]" * 70)]}
    with serving(get_reward("brightness")) as server:
        for body in (b"[" * 100_000, b'{"images": ' + b"[" * 100_000, json.dumps(nested).encode()):
            status, answer = post(f"{server.url}/score", body)
            assert status == 400 and "nested over 64 levels deep" in answer["error"], answer
        nested["metadata"] = {"spec": [json.loads("[" * 50 + "]" * 50)]}
        assert post(f"{server.url}/score", json.dumps(nested).encode())[0] == 200


@pytest.mark.parametrize(
    "request_bytes, status, message",
    [
        (b"PUT /score HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 501, "method 'PUT' is not supported"),
        (b"DELETE /health HTTP/1.1\r\n\r\n", 501, "method 'DELETE' is not supported"),
        (b"GARBAGE\r\n\r\n", 400, "Bad request syntax"),
        (b"POST /score HTTP/9.x\r\n\r\n", 400, "Bad request version"),
        (b"GET /health HTTP/2.0\r\n\r\n", 505, "Invalid HTTP version"),
        (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414, "Request-URI Too Long"),
        (b"GET /health HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", 431, "Line too long"),
        (b"GET /health HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n", 431, "Too many headers"),
        (b"GET /score HTTP/1.1\r\n\r\n", 405, "use POST /score"),
        (b"POST /health HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405, "use GET /health"),
        (b"POST /score HTTP/1.1\r\n\r\n", 411, "Content-Length header is required"),
        (b"POST /score HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411, "chunked"),
        (b"POST /score HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400, "invalid Content-Length '-5'"),
        (b"POST /score HTTP/1.1\r\nContent-Length: 1e3\r\n\r\n", 400, "invalid Content-Length"),
        (b"POST /score HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx", 400, "conflicting"),
        (b"POST /score HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}", 400, "the body ended after 2 of the 10"),
    ],
)
def test_every_error_is_json_even_from_http_server(request_bytes, status, message):
    with serving(get_reward("brightness"), read_timeout=5) as server:
        code, headers, answer, _ = exchange(server, request_bytes, hang_up=True)
        assert code == status and headers["content-type"] == "application/json", (code, headers, answer)
        assert message in answer["error"], answer
        assert exchange(server, b"GET /health HTTP/1.1\r\n\r\n")[0] == 200


def test_head_gets_a_bodiless_501():
    with serving(get_reward("brightness")) as server:
        status, headers, answer, _ = exchange(server, b"HEAD /health HTTP/1.1\r\n\r\n")
        assert status == 501 and answer is None and headers["content-type"] == "application/json"


@pytest.fixture
def decoded(monkeypatch):
    """The images that get decoded, each with whether it was on the scoring thread (one request at a time)."""
    from tempflow.rewards import server as server_module

    calls, decode = [], server_module.png_pixels

    def spy(data):
        calls.append(threading.current_thread() is spy.server.scoring_thread)
        return decode(data)

    monkeypatch.setattr(server_module, "png_pixels", spy)
    spy.calls = calls
    return spy


# Pillow warns about the bomb here; the command makes it refuse instead (see the fuzz test)
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_limits_refuse_before_decoding(decoded):
    bomb = bilevel_png(12_000, 12_000)  # 144 Mpx: decoding it took 4.8 GB
    assert len(bomb) < 25_000
    with serving(get_reward("brightness")) as server:
        decoded.server = server
        start = time.monotonic()
        status, answer = post(f"{server.url}/score", png_body([bomb]))
        assert time.monotonic() - start < 1.0
        assert (status, answer) == (
            413,
            {
                "error": "image 0 is 12000x12000 = 144000000 pixels, over the server's limit of "
                f"{DEFAULT_MAX_IMAGE_PIXELS} pixels per image"
            },
        )
        assert post(f"{server.url}/score", png_body([bilevel_png(8, 8), bomb]))[0] == 413
        assert decoded.calls == []
        assert post(f"{server.url}/score", png_body([bilevel_png(4096, 4096)]))[0] == 200  # at the limit
        assert decoded.calls == [True]  # on the scoring thread: one request's pixels at a time

    with serving(get_reward("brightness"), max_request_pixels=3 * 32 * 32) as server:
        decoded.server, decoded.calls[:] = server, []
        status, answer = post(f"{server.url}/score", png_body([bilevel_png(32, 32)] * 4))
        assert status == 413 and answer["error"] == (
            "4 images of 32x32 are 4096 pixels, over the server's limit of 3072 pixels per request "
            "(send fewer images per request)"
        )
        assert decoded.calls == []
        assert post(f"{server.url}/score", png_body([bilevel_png(32, 32)] * 3)) == (
            200,
            {"scores": [0.0] * 3},
        )


def test_bad_images_are_named_without_object_reprs():
    good = base64.b64decode(encode_png(to_uint8(quantized_images(1))[0]))
    start = good.index(b"IDAT") + 6  # past the chunk type and the zlib header
    corrupt = good[:start] + bytes(50) + good[start + 50 :]
    cases = [
        ([good, b"GIF89a not a png"], "image 1 is not a valid PNG"),
        ([good, good[:-30]], "image 1 is not a valid PNG (image file is truncated)"),
        ([good, corrupt], "image 1 is not a valid PNG (broken data stream"),
        (
            [good, bilevel_png(3, 3)],
            "all images of a request must have the same size: image 0 is 20x24, image 1 is 3x3",
        ),
        ([bilevel_png(0, 5)], "image 0 is not a valid PNG"),  # Pillow refuses a zero width
    ]
    with serving(get_reward("brightness")) as server:
        for pngs, message in cases:
            status, answer = post(f"{server.url}/score", png_body(pngs))
            assert status == 400 and answer["error"].startswith(message), answer
            assert " at 0x" not in answer["error"] and "<" not in answer["error"], answer
        body = json.dumps(
            {"images": [encode_png(to_uint8(quantized_images(1))[0]), "%%%"], "prompts": ["a", "b"]}
        )
        assert post(f"{server.url}/score", body.encode()) == (400, {"error": "image 1 is not valid base64"})


def test_only_the_reward_failing_gets_500():
    def spec_reward(images, prompts, spec):
        return [float(len(s)) for s in spec]

    images = quantized_images(2)
    with serving(spec_reward, "specs") as server:
        url = f"{server.url}/score"
        assert post(url, score_body(images, ["a", "b"], spec=["x", "yy"])) == (200, {"scores": [1.0, 2.0]})
        for metadata, message in [
            ({}, "missing a required argument: 'spec'"),
            ({"spec": [1, 2], "other": [1, 2]}, "unexpected keyword argument 'other'"),
            ({"spec": [1, 2], "images": [1, 2]}, "multiple values for argument 'images'"),
        ]:
            body = {**json.loads(score_body(images, ["a", "b"])), "metadata": metadata}
            status, answer = post(url, json.dumps(body).encode())
            assert status == 400 and "`metadata` does not fit reward 'specs'" in answer["error"], answer
            assert message in answer["error"]
        status, answer = post(url, score_body(images, ["a", "b"], spec=[1, 2]))  # the reward's own TypeError
        assert status == 500 and answer["error"].startswith("reward 'specs' raised TypeError"), answer

    for result, message in [
        (3.0, "returned something other than a list of numbers"),
        (["high", "low"], "returned something other than a list of numbers"),
        ([1.0], "returned 1 scores for 2 images"),
    ]:
        with serving(lambda images, prompts, result=result: result, "odd") as server:
            status, answer = post(f"{server.url}/score", score_body(images, ["a", "b"]))
            assert status == 500 and answer["error"].startswith(f"reward 'odd' {message}"), answer


def test_the_client_retries_408_but_no_other_4xx(monkeypatch):
    monkeypatch.setattr("tempflow.rewards.remote.time.sleep", lambda seconds: None)
    statuses = []

    class Flaky(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            status = self.server.plan[len(statuses)]
            statuses.append(status)
            body = json.dumps({"scores": [0.5]} if status == 200 else {"error": f"status {status}"}).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    fake = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=fake.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        remote = get_reward("remote", url=f"http://127.0.0.1:{fake.server_address[1]}", retries=3)
        fake.plan = [408, 503, 200]
        assert remote(quantized_images(1), ["a"]) == [0.5] and statuses == [408, 503, 200]
        for status in (400, 413, 500):
            statuses.clear()
            fake.plan = [status, 200]
            with pytest.raises(RemoteRewardError, match=f"HTTP {status}: status {status}"):
                remote(quantized_images(1), ["a"])
            assert statuses == [status]
    finally:
        fake.shutdown()
        fake.server_close()


def run_main(argv, capsys):
    """``(exit status, stderr)`` of ``tempflow serve-reward`` run in this process until it exits."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-request-mb", "-1"], "--max-request-mb must be a positive number, not -1"),
        (["--max-request-mb", "nan"], "--max-request-mb must be a positive number"),
        (["--max-request-mb", "1e-9"], "less than a byte"),
        (["--max-image-pixels", "0"], "--max-image-pixels must be a positive number, not 0"),
        (["--max-request-pixels", "-5"], "--max-request-pixels must be a positive number"),
        (["--read-timeout", "0"], "--read-timeout must be a positive number"),
        (["--token", ""], "must be non-empty printable ASCII"),
        (["--token", "two words"], "must be non-empty printable ASCII"),
        (["--port", "65536"], "--port must be 0 to 65535, not 65536"),
        (["--port", "-1"], "--port must be 0 to 65535, not -1"),
        (["--port", "http"], "invalid int value: 'http'"),
        (["--reward-kwargs", "[1, 2]"], "--reward-kwargs must be a JSON object"),
    ],
)
def test_serve_reward_refuses_bad_flags_in_one_line(flags, message, capsys):
    status, err = run_main(["brightness", *flags], capsys)
    assert status == 2 and err.startswith("tempflow serve-reward: error: ") and err.count("\n") == 1, err
    assert message in err


def test_serve_reward_names_an_unloadable_reward_or_a_busy_port(capsys, tmp_path, monkeypatch):
    status, err = run_main(["no_such_reward", "--port", "0"], capsys)
    assert status == 2 and err.count("\n") == 1
    assert err.startswith("tempflow serve-reward: error: cannot load reward 'no_such_reward': unknown reward")

    (tmp_path / "exploding_reward.py").write_text("raise RuntimeError('no GPU\\nhere')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    status, err = run_main(["exploding_reward:score", "--port", "0"], capsys)
    assert status == 2 and err.count("\n") == 1
    assert "cannot load reward 'exploding_reward:score'" in err and "no GPU here" in err, err

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        status, err = run_main(["brightness", "--port", str(port)], capsys)
    assert status == 2, err
    assert err == f"tempflow serve-reward: error: cannot listen on 127.0.0.1:{port}: Address already in use\n"


def test_an_empty_token_variable_means_no_token(monkeypatch):
    from tempflow.rewards.server import build_parser

    monkeypatch.setenv(TOKEN_ENV, "")
    assert build_parser().parse_args(["brightness"]).token is None


def test_the_server_refuses_limits_it_cannot_work_with():
    with pytest.raises(ValueError, match="must be positive"):
        RewardServer(get_reward("brightness"), "brightness", port=0, read_timeout=0)
