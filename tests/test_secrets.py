"""Secrets stay out of a run's outputs: a token, password or API key given to a reward (in ``reward_kwargs``,
in a URL, or through the environment) reaches the reward, and nothing the run writes (tracker files, metrics,
checkpoints, the report, its printed output) holds it."""

import json
import stat
import threading
from pathlib import Path

import pytest
import torch

from tempflow.cli import main
from tempflow.config import TempFlowGRPOConfig
from tempflow.redaction import (
    REDACTED,
    environment_secrets,
    is_secret_name,
    redact,
    redact_text,
    redacted_config,
)
from tempflow.rewards import get_reward
from tempflow.rewards.remote import TOKEN_ENV, RemoteRewardError
from tempflow.rewards.server import RewardServer

TINY_RECIPE = str(Path(__file__).parents[1] / "recipes" / "tiny.yaml")


# --- what counts as secret --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [
    "token", "hf_token", "accessToken", "api_key", "X-Api-Key", "APIKey", "apikey", "password", "db_passwd",
    "client_secret", "Authorization", "auth", "credentials", "private_key", "AWS_SECRET_ACCESS_KEY",
    "WANDB_API_KEY", "cookie",
])
def test_secret_names(name):
    assert is_secret_name(name)


@pytest.mark.parametrize("name", ["tokenizer", "max_tokens", "num_tokens", "tokens", "author", "keys",
                                  "key_frames", "url", "model", "monkey", "passes", "sigma"])
def test_names_that_are_not_secret(name):
    assert not is_secret_name(name)


def test_redact_keeps_keys_and_replaces_secret_values_at_any_depth():
    value = {"remote": {"url": "http://127.0.0.1:8000", "token": "tok-1234567", "timeout": 5},
             "judge": {"headers": {"Authorization": "Bearer abcdefgh", "Accept": "json"},
                       "fallbacks": [{"api_key": 12345678}, {"name": "b", "password": ["x", "y"]}],
                       "token": None}}
    original = json.loads(json.dumps(value))
    assert redact(value, environ={}) == {
        "remote": {"url": "http://127.0.0.1:8000", "token": REDACTED, "timeout": 5},
        "judge": {"headers": {"Authorization": REDACTED, "Accept": "json"},
                  "fallbacks": [{"api_key": REDACTED}, {"name": "b", "password": REDACTED}],
                  "token": None}}  # unset stays visibly unset
    assert value == original  # the caller's (the reward's) values are untouched


def test_urls_lose_their_credentials_and_secret_query_parameters():
    text = "see https://alice:pa55word@example.org:8443/v1/score?model=big&api_key=q-secret-1&key=AIzaXYZ#top"
    assert redact_text(text, environ={}) == (f"see https://{REDACTED}@example.org:8443/v1/score?model=big"
                                             f"&api_key={REDACTED}&key={REDACTED}#top")
    token_as_user = "git+https://ghp_abcdef123456@github.com/o/r.git"
    assert redact_text(token_as_user, environ={}) == f"git+https://{REDACTED}@github.com/o/r.git"
    assert redact_text("'https://h/?token=abc123', 'x'", environ={}) == f"'https://h/?token={REDACTED}', 'x'"
    plain = "http://127.0.0.1:8000/score?batch=4 and a@b.com"
    assert redact_text(plain, environ={}) == plain


def test_a_secret_found_once_is_redacted_wherever_it_appears():
    value = {"remote": {"token": "s3cr3t-value", "note": "token is s3cr3t-value"},
             "other": ["https://h/?token=q-value-99", "q-value-99 again"]}
    assert redact(value, environ={}) == {"remote": {"token": REDACTED, "note": f"token is {REDACTED}"},
                             "other": [f"https://h/?token={REDACTED}", f"{REDACTED} again"]}


def test_environment_secrets_are_the_values_of_secret_named_variables():
    environ = {TOKEN_ENV: "env-token-123", "HF_TOKEN": "hf_abcdefgh", "TOKENIZERS_PARALLELISM": "false",
               "HOME": "/home/me", "SOME_TOKEN": "short", "PATH": "/usr/bin"}
    assert sorted(environment_secrets(environ)) == ["env-token-123", "hf_abcdefgh"]
    shown = redact({"x": {"header": "Bearer env-token-123"}}, environ=environ)
    assert shown == {"x": {"header": f"Bearer {REDACTED}"}}


def test_config_fields_keep_their_names_and_non_secret_values():
    remote = {"url": "http://u:p4ssw0rd@h:1/?sig=0a1b2c3d4e", "token": "tok-1234567"}
    config = TempFlowGRPOConfig(reward_funcs=["remote"], reward_kwargs={"remote": remote},
                                token_pruning_layers=[2], token_pruning_keep_ratio=0.5)
    shown = redacted_config(config, environ={})
    assert shown["token_pruning_layers"] == "[2]" and shown["token_pruning_keep_ratio"] == "0.5"
    assert shown["reward_kwargs"] == str({"remote": {"url": f"http://{REDACTED}@h:1/?sig={REDACTED}",
                                                     "token": REDACTED}})
    assert set(shown) == set(TempFlowGRPOConfig.field_names())
    assert config.reward_kwargs["remote"]["token"] == "tok-1234567"  # the run itself keeps the real value


# --- a real run -------------------------------------------------------------------------------------------
KWARGS_TOKEN = "kw-token-7Qz1xV9pL2"
ENV_TOKEN = "env-token-Hc4Wm8sTq0"
URL_PASSWORD = "url-pass-Zr6Nb3yKe5"
QUERY_KEY = "query-key-Fv2Lp7dXa1"
NESTED_PASSWORD = "nested-pass-Uj8Ge4cRw6"
HEADER_VALUE = "header-bearer-Ot5Sy1hBn9"
SECRETS = {"reward_kwargs token": KWARGS_TOKEN, "environment token": ENV_TOKEN, "URL password": URL_PASSWORD,
           "URL query key": QUERY_KEY, "nested list password": NESTED_PASSWORD, "header value": HEADER_VALUE}


class KeyedReward:
    """An evaluation reward that takes credentials the way a hosted scoring API would; it scores brightness
    and records what it was given."""

    received: list[dict] = []

    def __init__(self, endpoint: str, headers: dict, fallbacks: list, trace: str):
        given = {"endpoint": endpoint, "headers": headers, "fallbacks": fallbacks, "trace": trace}
        KeyedReward.received.append(given)

    def __call__(self, images, prompts, **metadata):
        return images.mean(dim=(1, 2, 3)).tolist()


def _files_holding(root: Path, secret: bytes) -> list[str]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return sorted(str(p.relative_to(root)) for p in files if secret in p.read_bytes())


@pytest.mark.filterwarnings("ignore:this recipe's per-process sizes were derived for")
def test_no_secret_reaches_a_run_output(tiny_sd3_dir, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv(TOKEN_ENV, ENV_TOKEN)
    KeyedReward.received.clear()
    scored = []
    brightness = get_reward("brightness")

    def served(images, prompts, **metadata):
        scored.append(len(images))
        return brightness(images, prompts)

    server = RewardServer(served, "brightness", port=0, token=KWARGS_TOKEN)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    keyed = f"{__name__}:KeyedReward"
    keyed_kwargs = {"endpoint": f"https://alice:{URL_PASSWORD}@scores.example/v1?model=x&api_key={QUERY_KEY}",
                    "headers": {"Authorization": f"Bearer {HEADER_VALUE}", "Accept": "application/json"},
                    "fallbacks": [{"url": "https://b.example", "password": NESTED_PASSWORD}],
                    "trace": f"run started with {ENV_TOKEN}"}  # from the environment, under a plain name
    reward_kwargs = {"remote": {"url": server.url, "token": KWARGS_TOKEN}, keyed: keyed_kwargs}
    out = tmp_path / "run"
    try:
        code = main(["train", TINY_RECIPE, "--model_name_or_path", tiny_sd3_dir, "--output_dir", str(out),
                     "--max_sequence_length", "16", "--max_steps", "1", "--num_eval_prompts", "2",
                     "--reward_funcs", "remote", "--eval_reward_funcs", keyed, "--report_to", "tensorboard",
                     "--reward_kwargs", json.dumps(reward_kwargs)])
        report = main(["report", str(out)])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    printed = capfd.readouterr()
    assert code == 0 and report == 0, printed.err[-2000:]
    assert scored, "the remote reward was never scored: its token did not reach the server"
    assert KeyedReward.received and all(given == keyed_kwargs for given in KeyedReward.received)

    tracker_files = [p for p in (out / "tempflow").rglob("*") if p.is_file()]
    assert any(p.name == "hparams.yml" for p in tracker_files)
    assert any("tfevents" in p.name for p in tracker_files)
    assert "checkpoint-1" in {p.name for p in out.iterdir()} and (out / "report").is_dir()
    leaks = {label: _files_holding(out, secret.encode()) for label, secret in SECRETS.items()}
    leaks.update({f"{label} (printed)": ["stdout/stderr"] for label, secret in SECRETS.items()
                  if secret in printed.out + printed.err})
    assert {label: files for label, files in leaks.items() if files} == {}
    hparams = next(p for p in tracker_files if p.name == "hparams.yml").read_text()
    assert f"token: {REDACTED}" in hparams.replace("'", "")  # the key shows the token was set

    tracker_dir = out / "tempflow"
    assert stat.S_IMODE(tracker_dir.stat().st_mode) == 0o700
    assert all(not stat.S_IMODE(p.stat().st_mode) & 0o077 for p in tracker_files)


# --- error lines ----------------------------------------------------------------------------------------
def test_a_remote_reward_error_hides_its_urls_credentials(caplog):
    caplog.set_level("INFO", logger="tempflow.rewards.server")  # its access log sees the request line
    server = RewardServer(get_reward("brightness"), "brightness", port=0, token=KWARGS_TOKEN)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    host = server.url.removeprefix("http://")
    messages = []
    try:
        for url in (f"http://alice:{URL_PASSWORD}@{host}", f"http://{host}/?token={QUERY_KEY}"):
            with pytest.raises(RemoteRewardError) as caught:  # unreachable; 404 echoing the query
                get_reward("remote", url=url, token=KWARGS_TOKEN, retries=0)(torch.zeros(1, 3, 8, 8), ["a"])
            messages.append(str(caught.value))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert f"http://{REDACTED}@{host}" in messages[0] and f"?token={REDACTED}" in messages[1]
    assert not [m for m in messages for secret in (URL_PASSWORD, QUERY_KEY) if secret in m]
    assert "/?token=" in caplog.text and QUERY_KEY not in caplog.text


class UnreachableReward:
    def __init__(self, endpoint: str):
        raise ValueError(f"cannot reach {endpoint}")


def test_an_error_line_hides_credentials(tmp_path, capsys):
    endpoint = f"https://alice:{URL_PASSWORD}@scores.example/v1?api_key={QUERY_KEY}"
    kwargs = {f"{__name__}:UnreachableReward": {"endpoint": endpoint}}
    code = main(["train", TINY_RECIPE, "--output_dir", str(tmp_path / "run"), "--eval_prompts", "none",
                 "--reward_funcs", f"{__name__}:UnreachableReward", "--reward_kwargs", json.dumps(kwargs)])
    err = capsys.readouterr().err
    assert code == 2 and f"cannot reach https://{REDACTED}@scores.example/v1?api_key={REDACTED}" in err, err
    assert URL_PASSWORD not in err and QUERY_KEY not in err
