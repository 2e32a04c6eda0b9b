"""The official prompt sets (``pickscore:train``, ``geneval:test``, ...): where each comes from, and fetching it on
first use from its repository at a pinned commit, verified, into a local cache.

Every set is one file of a public repository at a fixed commit, read from
``https://raw.githubusercontent.com/<repository>/<commit>/<path>`` (or from the mirror that
``TEMPFLOW_PROMPT_SETS_MIRROR`` names). A download is verified before it enters the cache: by its sha256 where
that is pinned, else by its git blob id (what the commit's tree names), else (a set no copy of which could be
checked) by the sha256 recorded at its first download, which every later read must match. The cache lives in
``TEMPFLOW_CACHE`` (default: ``tempflow`` under the Hugging Face cache home), under
``prompt_sets/<repository>/<commit>/<path>``; copying that folder makes the sets available to a machine without
internet. ``HF_HUB_OFFLINE=1`` or ``TEMPFLOW_OFFLINE=1`` keeps every read in the cache.

``load_prompts("geneval:train")`` reaches these sets through :mod:`tempflow.registry`; ``tempflow prompts list``
and ``tempflow prompts download`` (:func:`main`) show and fill the cache.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from .cache import CACHE_ENV, cache_root
from .registry import register_prompt_sets

RAW_BASE_URL = "https://raw.githubusercontent.com"
MIRROR_ENV = "TEMPFLOW_PROMPT_SETS_MIRROR"
OFFLINE_ENVS = ("HF_HUB_OFFLINE", "TEMPFLOW_OFFLINE")
DOWNLOAD_TIMEOUT_S = 60
"""Seconds a connection or a read may stall before the download counts as unreachable."""
RECORD_SUFFIX = ".sha256"
"""Beside a set whose digest is not pinned: the sha256 its first download had."""

FLOW_GRPO = ("yifan123/flow_grpo", "ac4c86e8cae021841f1fde853d340e0db67690dd")
GENEVAL = ("djghosh13/geneval", "af4902f24d3ca90ebbb446dd9891a59e0f82725f")
TEMPFLOW_GRPO = ("Shredded-Pork/TempFlow-GRPO", "63e4def7159940ba7d60e4e6250eee868342388c")
FLOW_GRPO_READERS = ("DiffusionNFT's checkout holds a byte-identical copy (same git blob); TempFlow-GRPO, a fork, "
                     "reads its own checkout's, which could not be checked")


@dataclass(frozen=True)
class OfficialPromptSet:
    """One official prompt file: its source, what verifies it, and who reads it.

    ``sha256`` and ``git_blob`` are the pinned digests (hex), ``None`` where unknown; ``size`` in bytes and
    ``count`` (prompts: lines or JSONL rows) are ``None`` where no copy could be measured.
    """

    name: str
    repository: str
    commit: str
    path: str
    sha256: str | None
    git_blob: str | None
    size: int | None
    count: int | None
    description: str
    used_by: str

    @property
    def format(self) -> str:
        """``jsonl`` (a ``prompt`` plus metadata a row) or ``txt`` (a prompt a line): what :func:`load_prompts` reads
        by the file's suffix."""
        return "jsonl" if self.path.endswith(".jsonl") else "txt"

    @property
    def source(self) -> str:
        """``repository@short-commit/path``, for listings."""
        return f"{self.repository}@{self.commit[:7]}/{self.path}"


def _flow_grpo_set(name, path, sha256, git_blob, size, count, description, used_by) -> OfficialPromptSet:
    return OfficialPromptSet(name, *FLOW_GRPO, path, sha256, git_blob, size, count, description,
                             f"{used_by}; {FLOW_GRPO_READERS}")


_PICKSCORE_RUNS = ("Flow-GRPO pickscore_sd3, TempFlow-GRPO pickscore_sd3(_pr) and pickscore_qwenimage(_pr), "
                   "DiffusionNFT sd3_pickscore, sd3_hpsv2 and sd3_multi_reward")
_GENEVAL_RUNS = "Flow-GRPO geneval_sd3, TempFlow-GRPO geneval_sd3(_pr), DiffusionNFT sd3_geneval"
_OCR_RUNS = "Flow-GRPO general_ocr_sd3, TempFlow-GRPO general_ocr_sd3, DiffusionNFT sd3_ocr"
_HPSV2_RUNS = ("TempFlow-GRPO flux and flux_pr (config/dgx.py @ 63e4def: `dataset/hpsv2` of its own checkout); "
               "no stored copy of that folder could be read, so its digest is not pinned")

OFFICIAL_PROMPT_SETS: dict[str, OfficialPromptSet] = {s.name: s for s in (
    _flow_grpo_set("pickscore:train", "dataset/pickscore/train.txt",
                   "2f425adcbb9a6d0feee7c6c448e1cb83a1f71deca9434b803907e2578eca837f",
                   "a437bd921c03fbc00c4e7ce148ae2d28fcd6e49b", 2906730, 25432,
                   "Pick-a-Pic prompts (the unfiltered set: some are NSFW, as Flow-GRPO's README warns)",
                   f"training prompts of {_PICKSCORE_RUNS}"),
    _flow_grpo_set("pickscore:test", "dataset/pickscore/test.txt",
                   "d75c025fa451866e70f7e36243f7cdd93095523cb51f5f9651f2ce3236d20262",
                   "45f05231b969fb5f74c8debd606b22cd3be27f8e", 239891, 2048,
                   "held-out Pick-a-Pic prompts", f"evaluation prompts of {_PICKSCORE_RUNS}"),
    _flow_grpo_set("geneval:train", "dataset/geneval/train_metadata.jsonl", None,
                   "0b97e8a6802c08fc7537cd00c76ae79c851bddcb", None, None,
                   "GenEval-style prompts with the detector's metadata (tag, include, exclude)",
                   f"training prompts of {_GENEVAL_RUNS}"),
    _flow_grpo_set("geneval:test", "dataset/geneval/test_metadata.jsonl",
                   "cec4b24b9fee7bac21c8f787054ecc8dc9ff831674037713a4cd35e0f0a74a28",
                   "27cdaf5cc1356fe15aeadbb8df55682ca74228f0", 340835, 2212,
                   "held-out GenEval-style prompts with metadata, six tasks", f"evaluation prompts of {_GENEVAL_RUNS}"),
    _flow_grpo_set("ocr:train", "dataset/ocr/train.txt", None, "3ce0521b77b0a9031191d66ecc36ebaaf27a3922", None, None,
                   "text-rendering prompts (the text to render in quotes)", f"training prompts of {_OCR_RUNS}"),
    _flow_grpo_set("ocr:test", "dataset/ocr/test.txt",
                   "4dd8caf3ab6ade73bd376c7d14c6ca49b6eacfb1bd321e22c40714ae4a98d4dc",
                   "8deb4f8d8f2e863f45353354243669b3c991a6a2", 217565, 1018,
                   "held-out text-rendering prompts", f"evaluation prompts of {_OCR_RUNS}"),
    OfficialPromptSet("geneval:benchmark", *GENEVAL, "prompts/evaluation_metadata.jsonl",
                      "5c48e0813e812e3c373fa5c8ed07a8f0a483be30272b4427b0559c8048e67c13",
                      "efc21c7e639cd45554a1e44fac87157211f16d51", 85209, 553,
                      "the GenEval benchmark's own 553 prompts with metadata",
                      "evaluation the way papers report GenEval; no official training run reads it"),
    OfficialPromptSet("hpsv2:train", *TEMPFLOW_GRPO, "dataset/hpsv2/train.txt", None, None, None, None,
                      "the prompts of TempFlow-GRPO's FLUX runs (a prompt a line, as its loader reads them; "
                      "content not seen)", f"training prompts of {_HPSV2_RUNS}"),
    OfficialPromptSet("hpsv2:test", *TEMPFLOW_GRPO, "dataset/hpsv2/test.txt", None, None, None, None,
                      "the held-out prompts of TempFlow-GRPO's FLUX runs (content not seen)",
                      f"evaluation prompts of {_HPSV2_RUNS}"),
)}


class PromptSetUnavailable(FileNotFoundError):
    """A set is not in the cache and cannot be fetched now (offline, unreachable, or the server refused it)."""


class PromptSetDigestError(ValueError):
    """A set's file (downloaded or cached) does not have the digest that identifies it."""


class UnpinnedDigestWarning(UserWarning):
    """A set without a pinned digest was downloaded: what it holds was checked against nothing."""


def official_prompt_set(name: str) -> OfficialPromptSet:
    """The table's entry for ``name``; a ``ValueError`` listing the known sets for any other name."""
    try:
        return OFFICIAL_PROMPT_SETS[name]
    except KeyError:
        raise ValueError(f"unknown prompt set {name!r}; known: {', '.join(OFFICIAL_PROMPT_SETS)}") from None


def git_blob_id(content: bytes) -> str:
    """The id git gives ``content`` as a file (``git hash-object``): sha1 over ``blob <size>\\0`` + content."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def cached_path(prompt_set: OfficialPromptSet) -> Path:
    """Where ``prompt_set``'s file lives in the cache: named by repository, commit and path."""
    return cache_root() / "prompt_sets" / prompt_set.repository / prompt_set.commit / prompt_set.path


def source_url(prompt_set: OfficialPromptSet) -> str:
    """The file at its pinned commit, on GitHub's raw host or on the mirror ``$TEMPFLOW_PROMPT_SETS_MIRROR``."""
    base = os.environ.get(MIRROR_ENV) or RAW_BASE_URL
    return f"{base.rstrip('/')}/{prompt_set.repository}/{prompt_set.commit}/{prompt_set.path}"


def downloads_off() -> str | None:
    """The variable that forbids network access (``HF_HUB_OFFLINE`` / ``TEMPFLOW_OFFLINE`` set true), or None."""
    for variable in OFFLINE_ENVS:
        if os.environ.get(variable, "").strip().lower() in {"1", "true", "yes", "on"}:
            return variable
    return None


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + RECORD_SUFFIX)


def expected_digest(prompt_set: OfficialPromptSet, path: Path) -> tuple[str, str] | None:
    """``(kind, hex)`` the file must have: the pinned sha256, else the pinned git blob id, else the sha256 recorded
    at the first download into ``path``; None when nothing is pinned and nothing was recorded yet."""
    if prompt_set.sha256:
        return "sha256", prompt_set.sha256
    if prompt_set.git_blob:
        return "git blob", prompt_set.git_blob
    record = _record_path(path)
    return ("sha256 recorded at first download", record.read_text().strip()) if record.is_file() else None


def content_digest(kind: str, content: bytes) -> str:
    return git_blob_id(content) if kind == "git blob" else hashlib.sha256(content).hexdigest()


def verify_cached(prompt_set: OfficialPromptSet, path: Path) -> None:
    """Raise :class:`PromptSetDigestError` unless the cached file at ``path`` has its expected digest."""
    expected = expected_digest(prompt_set, path)
    if expected is None:
        raise PromptSetDigestError(f"prompt set {prompt_set.name!r}: {path} has no record of its first download's "
                                   f"sha256 ({_record_path(path).name}); delete the file and run `tempflow prompts "
                                   f"download {prompt_set.name}`")
    kind, digest = expected
    found = content_digest(kind, path.read_bytes())
    if found != digest:
        raise PromptSetDigestError(f"prompt set {prompt_set.name!r}: cached file {path} does not match its {kind} "
                                   f"(expected {digest}, found {found}); delete it and run `tempflow prompts download "
                                   f"{prompt_set.name}`")


def fetch(prompt_set: OfficialPromptSet) -> Path:
    """The verified cached file of ``prompt_set``, downloaded first when the cache lacks it."""
    path = cached_path(prompt_set)
    if path.is_file():
        verify_cached(prompt_set, path)
        return path
    variable = downloads_off()
    if variable:
        raise PromptSetUnavailable(f"prompt set {prompt_set.name!r} is not in the cache {cache_root()} and downloads "
                                   f"are off ({variable}=1): run `tempflow prompts download {prompt_set.name}` on a "
                                   f"machine with internet and copy its cache folder here (set by {CACHE_ENV})")
    _download(prompt_set, path)
    return path


def _download(prompt_set: OfficialPromptSet, path: Path) -> None:
    """Stream the file into a temporary file beside ``path``, verify it, then rename it into place: processes of
    one launch that start together each write their own temporary file, and every rename is atomic."""
    url = source_url(prompt_set)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as out:
            _stream(prompt_set, url, out)
        content = Path(temporary).read_bytes()
        expected = expected_digest(prompt_set, path)
        if expected is None:
            _record_first_download(prompt_set, path, hashlib.sha256(content).hexdigest())
        else:
            kind, digest = expected
            found = content_digest(kind, content)
            if found != digest:
                raise PromptSetDigestError(f"prompt set {prompt_set.name!r}: the download from {url} does not match "
                                           f"its {kind} (expected {digest}, found {found}); nothing was cached")
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def _record_first_download(prompt_set: OfficialPromptSet, path: Path, sha256: str) -> None:
    record = _record_path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{record.name}.", suffix=".part")
    with os.fdopen(handle, "w") as out:
        out.write(sha256 + "\n")
    os.replace(temporary, record)
    warnings.warn(f"prompt set {prompt_set.name!r}: digest not pinned (no copy of {prompt_set.source} could be "
                  f"checked); its first download has sha256 {sha256}, recorded in {record}, and every later read "
                  "must match it", UnpinnedDigestWarning, stacklevel=2)


def _stream(prompt_set: OfficialPromptSet, url: str, out) -> None:
    """Copy ``url`` into ``out`` with a progress bar; network failures become :class:`PromptSetUnavailable`."""
    from http.client import HTTPException
    from urllib.error import HTTPError
    from urllib.request import Request, urlopen

    from tqdm.auto import tqdm

    def unreachable(reason) -> PromptSetUnavailable:
        reason = " ".join(str(reason).split()) or type(reason).__name__
        return PromptSetUnavailable(
            f"prompt set {prompt_set.name!r} is not in the cache {cache_root()} and {url} cannot be read ({reason}): "
            f"run `tempflow prompts download {prompt_set.name}` where it can, and copy the cache folder here (set by "
            f"{CACHE_ENV}), or point {MIRROR_ENV} at a mirror")

    try:
        response = urlopen(Request(url, headers={"User-Agent": "tempflow"}), timeout=DOWNLOAD_TIMEOUT_S)
    except HTTPError as err:
        raise unreachable(f"HTTP {err.code} {err.reason}") from None
    except (OSError, HTTPException) as err:
        raise unreachable(getattr(err, "reason", err)) from None
    total = int(response.headers.get("Content-Length") or 0) or None
    with response, tqdm(total=total, unit="B", unit_scale=True, desc=f"prompt set {prompt_set.name}") as bar:
        while True:
            try:
                chunk = response.read(1 << 16)
            except (OSError, HTTPException) as err:
                raise unreachable(err) from None
            if not chunk:
                break
            out.write(chunk)
            bar.update(len(chunk))


def load_official_prompt_set(name: str) -> list[dict]:
    """Records of the official set ``name`` (``{"prompt": ..., **metadata}``, as :func:`load_prompts` reads a
    file): GenEval rows keep ``tag``, ``include`` and ``exclude``."""
    from .prompts import load_prompts

    return load_prompts(str(fetch(official_prompt_set(name))))


def _load_by_prefix(prefix: str, name: str) -> list[dict]:
    return load_official_prompt_set(f"{prefix}:{name}")


def _register_prefixes() -> None:
    """``pickscore:``, ``geneval:``, ... become prompt sources; the loader reads the table at call time."""
    for prefix in dict.fromkeys(name.partition(":")[0] for name in OFFICIAL_PROMPT_SETS):
        register_prompt_sets(prefix)(partial(_load_by_prefix, prefix))


_register_prefixes()


def digest_status(prompt_set: OfficialPromptSet) -> str:
    if prompt_set.sha256:
        return "sha256 pinned"
    if prompt_set.git_blob:
        return "git blob pinned"
    record = _record_path(cached_path(prompt_set))
    if record.is_file():
        return f"digest not pinned (sha256 {record.read_text().strip()[:12]}… recorded at first download)"
    return "digest not pinned"


def cache_status(prompt_set: OfficialPromptSet) -> str:
    path = cached_path(prompt_set)
    if not path.is_file():
        return "not cached"
    try:
        verify_cached(prompt_set, path)
    except PromptSetDigestError:
        return f"cached at {path}, DOES NOT VERIFY (tempflow prompts download {prompt_set.name} replaces it)"
    return f"cached at {path}"


def _size_text(prompt_set: OfficialPromptSet) -> str:
    if prompt_set.size is None:
        return "size not known"
    return f"{prompt_set.size} bytes, {prompt_set.count} {'rows' if prompt_set.format == 'jsonl' else 'lines'}"


def list_lines() -> list[str]:
    """``tempflow prompts list``: a line per set (name, source, size, digest status, cache state)."""
    rows = [(s.name, s.source, _size_text(s), digest_status(s), cache_status(s)) for s in OFFICIAL_PROMPT_SETS.values()]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f"official prompt sets (cache: {cache_root() / 'prompt_sets'})"]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[4] for row in rows]
    return lines


def download(prompt_set: OfficialPromptSet) -> Path:
    """:func:`fetch`, after deleting a cached copy that does not verify (a set without a pinned digest stays
    checked against its first download's record)."""
    path = cached_path(prompt_set)
    if path.is_file():
        try:
            verify_cached(prompt_set, path)
        except PromptSetDigestError:
            path.unlink()
    return fetch(prompt_set)


def main(argv: list[str]) -> int:
    """``tempflow prompts list`` / ``tempflow prompts download NAME... | --all``. Exit 2 on an unknown name or a
    set that cannot be fetched (one line each)."""
    parser = argparse.ArgumentParser(
        prog="tempflow prompts",
        description="The official prompt sets (use them as `train_prompts: geneval:train`, `--prompts pickscore:test`"
        "): fetched on first use from their repository at a pinned commit, verified, and cached in $TEMPFLOW_CACHE "
        "(default: tempflow under the Hugging Face cache home). For machines without internet, download here and "
        "copy the cache folder.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="each set: source, size, digest status, cached or not")
    download_parser = commands.add_parser("download", help="fill the cache (for machines without internet)")
    download_parser.add_argument("names", nargs="*", metavar="NAME", help="sets to download (see `list`)")
    download_parser.add_argument("--all", action="store_true", help="every set")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            print("\n".join(list_lines()))
            return 0
        if not args.names and not args.all:
            raise ValueError("name the sets to download, or --all; known: " + ", ".join(OFFICIAL_PROMPT_SETS))
        prompt_sets = [official_prompt_set(name) for name in (OFFICIAL_PROMPT_SETS if args.all else args.names)]
    except ValueError as err:
        print(f"tempflow: error: {err}", file=sys.stderr)
        return 2
    failed = False
    for prompt_set in prompt_sets:  # one failure (a set missing upstream) leaves the others to fetch
        try:
            path = download(prompt_set)
        except (PromptSetUnavailable, PromptSetDigestError) as err:
            print(f"tempflow: error: {err}", file=sys.stderr)
            failed = True
        else:
            print(f"{prompt_set.name}: {path} ({digest_status(prompt_set)})")
    return 2 if failed else 0
