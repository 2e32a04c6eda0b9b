"""The reward server under attack and misuse (loopback only; addresses 127.0.0.2-5 stand for other hosts):
clients that trickle their headers, connections without the token, bursts, oversized requests, rewards that
raise ``SystemExit``, PNGs of every colour type and bit depth, and the memory held by request bodies."""

import base64
import contextlib
import http.client
import json
import random
import select
import socket
import struct
import threading
import time
import warnings
import zlib

import numpy as np
import pytest
from test_reward_server import post, quantized_images, score_body, serving

from tempflow.rewards import get_reward
from tempflow.rewards.remote import RemoteRewardError, encode_png, png_pixels
from tempflow.rewards.server import main

TOKEN = "s3cret"
OTHER_HOST = "127.0.0.2"  # Linux routes all of 127/8 to loopback: a second client address without a network


@pytest.fixture(autouse=True)
def _other_loopback_addresses():
    with socket.socket() as probe:
        try:
            probe.bind((OTHER_HOST, 0))
        except OSError:
            pytest.skip(f"{OTHER_HOST} is not a loopback address here")


def connect(server, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(server.server_address[:2], timeout=10, source_address=(source, 0))


def answer_of(sock: socket.socket):
    """``(status, JSON body)`` of the server's answer, read as far as its Content-Length."""
    reply = b""
    while b"\r\n\r\n" not in reply or len(reply.partition(b"\r\n\r\n")[2]) < _content_length(reply):
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection after {reply!r}"
        reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body) if body else None


def _content_length(reply: bytes) -> int:
    head = reply.partition(b"\r\n\r\n")[0].decode("latin-1").lower()
    return int(head.partition("content-length:")[2].split("\r\n")[0] or 0)


def health(server, source: str = "127.0.0.1") -> int:
    with connect(server, source) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n\r\n")
        return answer_of(sock)[0]


def scoring_request(body: bytes, token: str | None = TOKEN) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"POST /score HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {len(body)}\r\n\r\n".encode() + body


# ------------------------------------------------------------------------------------------ slow clients


class SlowHeaderClient(threading.Thread):
    """Sends a request head without the token one byte at a time, a pause of 0.5-2 s (seeded) between bytes,
    and connects again whenever the server closes the connection."""

    HEAD = b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nX-Padding: " + b"a" * 200 + b"\r\n\r\n"

    def __init__(self, server, source: str, seed: int, stop: threading.Event):
        super().__init__(daemon=True)
        self.server, self.source, self.stop = server, source, stop
        self.rng, self.connections = random.Random(seed), 0

    def run(self):
        while not self.stop.is_set():
            try:
                sock = connect(self.server, self.source)
            except OSError:
                continue
            self.connections += 1
            with sock, contextlib.suppress(OSError):
                for index in range(len(self.HEAD)):
                    sock.sendall(self.HEAD[index : index + 1])
                    if self.stop.wait(self.rng.uniform(0.5, 2.0)):
                        break


@pytest.mark.parametrize("attacker", [OTHER_HOST, "127.0.0.1"], ids=["another address", "the same address"])
def test_slow_header_clients_without_the_token_leave_real_clients_scored(attacker):
    """16 clients that trickle their headers without the token beside 4 real ones (the training client, its
    retries shortened): every batch is scored. Before the head deadline, the token check on its header line,
    the per-address cap and the eviction of slow connections, the 16 held every slot and every request got 503."""
    brightness = get_reward("brightness")
    images = quantized_images(2)
    expected = brightness(images, ["a", "b"])
    stop, latencies, failures = threading.Event(), [], []
    with serving(brightness, token=TOKEN, max_connections=16, head_timeout=2.0, read_timeout=5) as server:
        attackers = [SlowHeaderClient(server, attacker, seed, stop) for seed in range(16)]
        for thread in attackers:
            thread.start()
        time.sleep(1.0)  # every attacker holds a connection, some past the server's patience
        end = time.monotonic() + 3.0

        def score_batches():
            remote = get_reward("remote", url=server.url, token=TOKEN, retries=3, retry_wait=0.1, timeout=10)
            while time.monotonic() < end:
                start = time.monotonic()
                try:
                    scores = remote(images, ["a", "b"])
                except RemoteRewardError as err:
                    failures.append(str(err))
                    continue
                latencies.append(time.monotonic() - start)
                if scores != expected:
                    failures.append(f"scored {scores}, not {expected}")

        clients = [threading.Thread(target=score_batches) for _ in range(4)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(timeout=60)
        stop.set()
        admission = server.admission
        print(f"attackers from {attacker}: {len(latencies)} batches scored, {len(failures)} failed; latency "
              f"median {np.median(latencies) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms; "
              f"{admission.address_refusals} refused for their address, {admission.evictions} slow ones closed")
    assert not failures and len(latencies) > 20, failures[:3]
    assert sum(thread.connections for thread in attackers) > 16  # the server did close their connections
    assert max(latencies) < 2.0


def test_a_trickled_head_or_body_gets_408_at_its_deadline():
    """The deadline holds however steadily the bytes come: each one alone is well within ``read_timeout``."""
    with serving(get_reward("brightness"), read_timeout=5, head_timeout=1.0, body_timeout=1.0) as server:
        for at_once, trickled, part in [
            (b"POST /score HTTP/1.1\r\n", b"X: y\r\n" * 100, "the headers"),
            (scoring_request(b"", token=None).replace(b": 0", b": 100"), b"{" * 100, "the body (100 bytes announced)"),
        ]:
            start = time.monotonic()
            with connect(server) as sock:
                sock.sendall(at_once)
                for index in range(len(trickled)):  # a byte every 0.1 s, until the server answers
                    sock.sendall(trickled[index : index + 1])
                    if select.select([sock], [], [], 0.1)[0]:
                        break
                status, answer = answer_of(sock)
            assert status == 408 and answer["error"] == f"the client did not send {part} within 1 s", answer
            assert 0.9 < time.monotonic() - start < 3.0
        assert health(server) == 200


def test_the_token_is_checked_as_soon_as_its_header_line_arrives():
    with serving(get_reward("brightness"), token=TOKEN, read_timeout=5) as server:
        with connect(server) as sock:  # the head goes on, but its Authorization line was wrong
            start = time.monotonic()
            sock.sendall(b"POST /score HTTP/1.1\r\nAuthorization: Bearer wrong\r\nX-More: ")
            status, answer = answer_of(sock)
            assert status == 401 and "missing or wrong token" in answer["error"], answer
            assert time.monotonic() - start < 1.0  # not the read timeout (5 s) nor the head timeout (10 s)
        for request in (  # a head that ends without the token: any request but GET /health
            scoring_request(b"{}", token=None),
            b"POST /elsewhere HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            b"PUT /score HTTP/1.1\r\n\r\n",
        ):
            with connect(server) as sock:
                sock.sendall(request)
                assert answer_of(sock)[0] == 401
        assert health(server) == 200
        images = quantized_images(2)
        with connect(server) as sock:
            sock.sendall(scoring_request(score_body(images, ["a", "b"])))
            assert answer_of(sock) == (200, {"scores": get_reward("brightness")(images, ["a", "b"])})


def wait_until(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def stalled(server, source: str, token: str | None = None) -> socket.socket:
    """A connection that sent part of its head (with the token line, if given) and then nothing."""
    sock = connect(server, source)
    sock.sendall(b"POST /score HTTP/1.1\r\n" + (f"Authorization: Bearer {token}\r\n".encode() if token else b""))
    return sock


def test_unauthenticated_connections_are_capped_per_address():
    with serving(get_reward("brightness"), token=TOKEN, max_connections=4, head_timeout=30) as server:
        assert server.admission.per_ip == 2  # half of max_connections
        holders = [stalled(server, OTHER_HOST) for _ in range(2)]
        time.sleep(0.2)
        with connect(server, OTHER_HOST) as sock:  # a third from that address
            status, answer = answer_of(sock)
        assert status == 503 and answer["error"].startswith(
            f"{OTHER_HOST} has 2 connections that have not authenticated yet"
        ), answer
        assert health(server, "127.0.0.1") == 200  # another address is served
        holders[0].sendall(f"Authorization: Bearer {TOKEN}\r\n".encode())  # it no longer counts
        wait_until(lambda: health(server, OTHER_HOST) == 200, seconds=3)  # none waits 7.5 s to be closed
        for sock in holders:
            sock.close()


def test_a_slow_connection_gives_its_slot_to_a_newcomer_once_it_has_waited():
    """Two connections that trickle their heads hold both slots: a newcomer is refused while they are young, and
    takes the oldest one's slot (which is closed) once it has waited a quarter of the head timeout."""
    with serving(get_reward("brightness"), max_connections=2, head_timeout=4.0) as server:
        oldest = stalled(server, OTHER_HOST)
        time.sleep(0.1)
        youngest = stalled(server, "127.0.0.3")
        assert health(server) == 503  # both are younger than 1 s
        time.sleep(1.0)
        assert health(server) == 200  # the oldest was closed for it
        oldest.settimeout(2)
        assert oldest.recv(100) == b""
        assert server.admission.evictions == 1 and server.peak_connections == 2
        youngest.sendall(b"Host: x\r\n\r\n")  # the other still holds its slot, and is answered
        assert answer_of(youngest)[0] == 411
        oldest.close()
        youngest.close()


def test_a_burst_of_connections_is_answered_not_reset():
    """256 connections at once against 4 slots: each gets 200 or 503 (before: about a quarter got a reset, and the
    listen backlog of 5 dropped connection attempts, which the client's kernel retried after 1 s)."""
    body = score_body(quantized_images(1), ["p"])
    with serving(get_reward("brightness"), max_connections=4) as server:
        port, barrier, statuses = server.server_address[1], threading.Barrier(256), []

        def one():
            barrier.wait()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                connection.request("POST", "/score", body=body)
                statuses.append(connection.getresponse().status)
            except OSError as err:
                statuses.append(type(err).__name__)
            finally:
                connection.close()

        threads = [threading.Thread(target=one) for _ in range(256)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert len(statuses) == 256 and set(statuses) <= {200, 503}, sorted(map(str, statuses))[-5:]
    assert 200 in statuses


def test_the_listen_backlog_holds_a_burst_while_the_server_is_busy():
    """Connections completed by the kernel while nothing accepts them: the backlog (before: 5) holds at least
    ``max_connections`` of them, so a burst is not dropped while the server is busy."""
    with serving(get_reward("brightness"), max_connections=16) as server:
        server.shutdown()  # stop accepting, keep listening
        pending = []
        for _ in range(40):
            sock = socket.socket()
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect(server.server_address[:2])
            pending.append(sock)
        time.sleep(0.3)
        completed = sum(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 and _connected(sock)
                        for sock in pending)
        for sock in pending:
            sock.close()
    assert completed == 40


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------- request limits


def test_too_many_images_get_413_naming_the_flag_and_the_client_sends_once():
    images, sources = quantized_images(5), quantized_images(5, seed=1)
    with serving(lambda images, prompts, source_images=None: [0.0] * len(prompts),
                 max_request_images=8) as server:
        requests, score = [], server.score
        server.score = lambda body: requests.append(len(body)) or score(body)
        remote = get_reward("remote", url=server.url, retries=3, retry_wait=0.01, batch_size=9)
        with pytest.raises(RemoteRewardError, match=r"HTTP 413: 9 images are over the server's limit of 8 images "
                                                    r"per request \(--max-request-images\)"):
            remote(quantized_images(9), ["p"] * 9)
        assert len(requests) == 1  # refused as too large: not sent again
        with pytest.raises(RemoteRewardError, match="5 images and their 5 source images are 10 images, over"):
            remote(images, ["p"] * 5, source_images=sources)
        assert get_reward("remote", url=server.url, batch_size=4)(images, ["p"] * 5, source_images=sources) == [0.0] * 5


def test_a_request_of_many_tiny_images_is_refused_fast_and_blocks_nobody():
    """The attack of issue 38: 300 000 1x1 PNGs in one request held the scoring thread for 45 s (another client
    waited 31 s); the default cap of 128 images refuses it once its JSON is parsed."""
    one_pixel = encode_png(np.zeros((1, 1, 3), dtype=np.uint8))
    body = json.dumps({"images": [one_pixel] * 300_000, "prompts": ["p"] * 300_000}).encode()
    images = quantized_images(2)
    with serving(get_reward("brightness")) as server:
        start = time.monotonic()
        status, answer = post(f"{server.url}/score", body)
        seconds = time.monotonic() - start
        assert status == 413 and answer["error"].startswith(
            "300000 images are over the server's limit of 128 images per request"
        ), answer
        assert seconds < 5.0, seconds
        assert post(f"{server.url}/score", score_body(images, ["a", "b"]))[0] == 200


def test_request_bodies_in_memory_are_bounded_while_the_reward_is_slow(monkeypatch):
    """12 requests of half the body limit while the reward is blocked: the server reads only as many bodies as
    four body limits hold (one being scored), and every request is scored once the reward goes on."""
    from tempflow.rewards import server as server_module

    release, read, parse = threading.Event(), [], server_module.parse_score_request

    def blocked(images, prompts):
        release.wait(30)
        return [1.0] * len(prompts)

    monkeypatch.setattr(server_module, "parse_score_request", lambda body, *limits: read.append(1) or parse(body, *limits))
    body = score_body(quantized_images(2, size=(64, 64)), ["a", "b"])
    with serving(blocked, max_request_bytes=2 * len(body), max_connections=16) as server:
        replies = []
        threads = [threading.Thread(target=lambda: replies.append(post(f"{server.url}/score", body)))
                   for _ in range(12)]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(read) >= 8)
        time.sleep(0.5)  # time for more to be read, were they allowed
        held = len(read)
        release.set()
        for thread in threads:
            thread.join(timeout=60)
    assert held == 8, held  # 4 body limits of two bodies each
    assert replies == [(200, {"scores": [1.0, 1.0]})] * 12


# ---------------------------------------------------------------------------------------- rewards and PNGs


def test_a_reward_raising_systemexit_or_keyboardinterrupt_gets_500_and_the_server_goes_on():
    raised = []

    def abrupt(images, prompts):
        for kind in (SystemExit, KeyboardInterrupt):
            if kind not in raised:
                raised.append(kind)
                raise kind("stop")
        return [0.5] * len(prompts)

    with serving(abrupt, "abrupt") as server:
        remote = get_reward("remote", url=server.url, retries=0)
        for name in ("SystemExit", "KeyboardInterrupt"):
            with pytest.raises(RemoteRewardError, match=f"HTTP 500: reward 'abrupt' raised {name}: stop"):
                remote(quantized_images(1), ["a"])
        assert remote(quantized_images(2), ["a", "b"]) == [0.5, 0.5]


def png_file(samples: np.ndarray, bit_depth: int, colour_type: int, palette=None, transparency=None) -> bytes:
    """A PNG written by the specification, not by Pillow: ``samples`` is ``[H, W, channels]``, packed MSB first
    below 8 bits, big-endian at 16."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width, _ = samples.shape
    rows = []
    for row in samples:
        if bit_depth == 16:
            data = row.astype(">u2").tobytes()
        elif bit_depth == 8:
            data = row.astype(np.uint8).tobytes()
        else:
            data = np.packbits(np.unpackbits(row.astype(np.uint8).reshape(-1, 1), axis=1)[:, -bit_depth:]).tobytes()
        rows.append(b"\x00" + data)
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    chunks = chunk(b"IHDR", header)
    if palette is not None:
        chunks += chunk(b"PLTE", palette.astype(np.uint8).tobytes())
    if transparency is not None:
        chunks += chunk(b"tRNS", transparency)
    chunks += chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


# (bit depth, colour type) of every kind of PNG: 0 grey, 2 RGB, 3 palette, 4 grey + alpha, 6 RGB + alpha
PNG_KINDS = [(1, 0), (2, 0), (4, 0), (8, 0), (16, 0), (8, 2), (16, 2), (1, 3), (2, 3), (4, 3), (8, 3),
             (8, 4), (16, 4), (8, 6), (16, 6)]
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# and each without an alpha channel once more with a tRNS chunk (transparency)
PNG_CASES = [(depth, kind, False) for depth, kind in PNG_KINDS] + [
    (depth, kind, True) for depth, kind in PNG_KINDS if kind in (0, 2, 3)
]


@pytest.mark.parametrize("bit_depth, colour_type, with_transparency", PNG_CASES)
def test_every_kind_of_png_decodes_to_its_colours(bit_depth, colour_type, with_transparency):
    """Samples scaled to 8 bits (16-bit ones within 1 of v*255/65535), palette entries looked up, alpha and
    transparency dropped, and no warning; before, 16-bit greyscale was clipped (mid-grey decoded as white)."""
    rng = np.random.default_rng(bit_depth * 10 + colour_type)
    samples = rng.integers(0, 2**bit_depth, (5, 7, CHANNELS[colour_type]))
    palette = rng.integers(0, 256, (2**bit_depth, 3)) if colour_type == 3 else None
    transparency = None
    if with_transparency and colour_type == 3:  # an alpha per palette entry
        transparency = bytes(rng.integers(0, 256, 2**bit_depth, dtype=np.uint8))
    elif with_transparency:  # the grey or RGB sample of the first pixel is transparent
        transparency = struct.pack(f">{CHANNELS[colour_type]}H", *map(int, samples[0, 0]))
    data = png_file(samples, bit_depth, colour_type, palette, transparency)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decoded = png_pixels(data).astype(int)
    if colour_type == 3:
        expected = palette[samples[..., 0]]
    else:
        colour = samples[..., :1] if colour_type in (0, 4) else samples[..., :3]
        expected = np.broadcast_to(colour * 255 / (2**bit_depth - 1), samples.shape[:2] + (3,))
    assert decoded.shape == (5, 7, 3)
    assert np.abs(decoded - expected).max() <= (1 if bit_depth == 16 else 0)


def test_sixteen_bit_grey_decodes_like_its_colour_twin_and_scores_mid_grey_as_half():
    samples = np.random.default_rng(0).integers(0, 2**16, (6, 6, 1))
    grey = png_file(samples, 16, 0)
    assert np.array_equal(png_pixels(grey), png_pixels(png_file(np.repeat(samples, 3, axis=2), 16, 2)))
    mid_grey = png_file(np.full((8, 8, 1), 32768), 16, 0)
    body = json.dumps({"images": [base64.b64encode(mid_grey).decode()], "prompts": ["p"]}).encode()
    with serving(get_reward("brightness")) as server:
        status, answer = post(f"{server.url}/score", body)
    assert status == 200 and answer["scores"][0] == pytest.approx(32768 / 65535, abs=1 / 255)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-request-images", "0"], "--max-request-images must be a positive number, not 0"),
        (["--head-timeout", "-1"], "--head-timeout must be a positive number, not -1"),
        (["--body-timeout", "inf"], "--body-timeout must be a positive number, not inf"),
        (["--max-unauthenticated-per-ip", "0"], "--max-unauthenticated-per-ip must be a positive number, not 0"),
    ],
)
def test_the_new_flags_refuse_bad_values_in_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["brightness", *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err == f"tempflow serve-reward: error: {message}\n"
