"""Background reward scoring, the HTTP reward server and the ``remote`` reward client (loopback only)."""

import base64
import contextlib
import json
import re
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from tempflow.rewards import get_reward, to_uint8
from tempflow.rewards.async_scoring import AsyncRewardScorer
from tempflow.rewards.combined import RewardError
from tempflow.rewards.remote import TOKEN_ENV, RemoteRewardError, encode_png, images_from_uint8
from tempflow.rewards.server import RewardServer, main
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


# ------------------------------------------------------------------------------------------- async scoring


def test_async_scoring_matches_sync_scoring_in_order():
    def slow_brightness(images, prompts, **metadata):
        time.sleep(0.05 if images.shape[0] == 3 else 0.0)  # the first batch finishes last with two workers
        return get_reward("brightness")(images, prompts)

    batches = [quantized_images(n, seed=n) for n in (3, 2, 4)]
    with AsyncRewardScorer(slow_brightness, max_workers=2) as scorer:
        futures = [scorer.submit(batch, ["p"] * len(batch)) for batch in batches]
        results = [future.result(timeout=30) for future in futures]
    assert results == [get_reward("brightness")(batch, ["p"] * len(batch)) for batch in batches]

    images, prompts, specs = shapes_batch(4)
    with AsyncRewardScorer(get_reward("shapes"), name="shapes") as scorer:
        assert scorer.submit(images, prompts, spec=specs).result(timeout=30) == get_reward("shapes")(
            images, prompts, spec=specs
        )


def test_async_scoring_errors_name_the_reward():
    def broken(images, prompts, **metadata):
        raise ValueError("model exploded")

    with AsyncRewardScorer(broken, name="boom") as scorer:
        future = scorer.submit(torch.zeros(2, 3, 4, 4), ["a", "b"])
        with pytest.raises(RewardError, match="'boom' raised ValueError: model exploded"):
            future.result(timeout=30)
        assert AsyncRewardScorer(broken).name == "broken"


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
            (bad_png, 400, "not a base64 PNG"),
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
