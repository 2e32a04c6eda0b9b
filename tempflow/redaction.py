"""What counts as a secret in a run's settings, and how it is hidden where the run records them.

A reward's credentials (the reward server's ``token``, a hosted API's key, a password in a URL) must reach the
reward but not the run's records: tracker hyperparameters (TensorBoard's ``hparams.yml`` and event files,
wandb's config) are shared and uploaded. Hidden, as ``***`` with the key kept (a reader sees that it was set):

- the value under any key named like a secret (:func:`is_secret_name`: token, api_key, password, secret, auth,
  ...), at any depth of nested mappings and lists;
- in URLs, the ``user:password@`` part and query parameters named like a secret (``?token=``, ``?api_key=``);
- every secret value found that way, and the value of every environment variable named like a secret
  (``TEMPFLOW_REWARD_TOKEN``, ``HF_TOKEN``, ``WANDB_API_KEY``, ...), wherever else it appears in the text.

The run itself keeps the real values: only what is written down is redacted.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

REDACTED = "***"

_SECRET_WORDS = frozenset({
    "token", "password", "passwd", "pwd", "passphrase", "secret", "auth", "authorization", "oauth",
    "credential", "credentials", "apikey", "bearer", "cookie", "signature", "sig",
})
_SECRET_WORD_PAIRS = (("api", "key"), ("private", "key"), ("access", "key"))
_SECRET_QUERY_NAMES = frozenset({"key"})
"""Also secret as a URL query parameter (Google's ``?key=``), though too common a word for a mapping's key."""
_MIN_SECRET_LENGTH = 8
"""Shorter values (``1``, ``false``) are not searched for elsewhere in a text: they would hide plain words."""

_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^\s/?#@]+)@")
_QUERY_PARAMETER = re.compile(  # a value ends at a space or quote, before punctuation
    r"(?<=[?&;])(?P<name>[^\s=&#?;]+)=(?P<value>[^\s&#;'\"<>`]*?)(?=[.,:)\]]*(?:[\s&#;'\"<>`]|$))")


def is_secret_name(name: str) -> bool:
    """Whether a key or variable of this name holds a credential: one of its words (``hf_token`` → hf, token;
    ``apiKey`` → api, key) is token, password, secret, auth, ..., or it pairs api/private/access with key.
    ``tokenizer``, ``max_tokens`` and ``author`` are not."""
    words = {word.lower() for word in _WORD.findall(name)}
    return bool(words & _SECRET_WORDS) or any(a in words and b in words for a, b in _SECRET_WORD_PAIRS)


def _is_secret_query_name(name: str) -> bool:
    return is_secret_name(name) or name.lower() in _SECRET_QUERY_NAMES


def environment_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """The values of the environment variables named like a secret (``os.environ`` by default)."""
    environ = os.environ if environ is None else environ
    return [value for name, value in environ.items()
            if is_secret_name(name) and len(value) >= _MIN_SECRET_LENGTH]


def _secrets_in_text(text: str) -> Iterator[str]:
    for match in _URL_USERINFO.finditer(text):
        user, _, password = match["userinfo"].partition(":")
        yield password or user  # a bare userinfo is a token itself (https://TOKEN@host)
    for match in _QUERY_PARAMETER.finditer(text):
        if _is_secret_query_name(match["name"]):
            yield match["value"]


def _leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, Mapping):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


def _keeps_its_value(value: Any) -> bool:
    """Unset and on/off values are shown as they are: they hold no credential and say whether one was set."""
    return value is None or isinstance(value, bool) or value == ""


def _secrets_in(value: Any) -> Iterator[str]:
    if isinstance(value, Mapping):
        for key, item in value.items():
            if is_secret_name(str(key)):
                yield from (str(leaf) for leaf in _leaves(item) if not _keeps_its_value(leaf))
            else:
                yield from _secrets_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _secrets_in(item)
    elif isinstance(value, str):
        yield from _secrets_in_text(value)


def _hide_text(text: str, secrets: list[str]) -> str:
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    text = _QUERY_PARAMETER.sub(
        lambda m: f"{m['name']}={REDACTED}" if _is_secret_query_name(m["name"]) and m["value"] else m[0],
        text)
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


def _hide(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, Mapping):
        return {key: REDACTED if is_secret_name(str(key)) and not _keeps_its_value(item)
                else _hide(item, secrets) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_hide(item, secrets) for item in value)
    if isinstance(value, str):
        return _hide_text(value, secrets)
    return value


def _searchable(found: Iterator[str], environ: Mapping[str, str] | None) -> list[str]:
    """Secrets worth searching for, longest first (a secret inside another is hidden with the longer one)."""
    secrets = {s for s in found if len(s) >= _MIN_SECRET_LENGTH} | set(environment_secrets(environ))
    return sorted(secrets, key=len, reverse=True)


def redact(value: Any, environ: Mapping[str, str] | None = None) -> Any:
    """A copy of ``value`` (nested mappings, lists, strings) with its secrets and the environment's hidden."""
    return _hide(value, _searchable(_secrets_in(value), environ))


def redact_text(text: str, environ: Mapping[str, str] | None = None) -> str:
    """``text`` with URL credentials, secret query parameters and the environment's secrets hidden."""
    return _hide_text(text, _searchable(_secrets_in_text(text), environ))


def redacted_config(config: Any, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A config dataclass as a run records it (tracker hyperparameters): every field, its value as text with
    its secrets hidden. The config's own field names are not judged as secret names (``token_pruning_layers``
    holds none); what they hold is."""
    values = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}
    secrets = _searchable((secret for value in values.values() for secret in _secrets_in(value)), environ)
    return {name: _hide_text(str(_hide(value, secrets)), secrets) for name, value in values.items()}
