"""The official prompt sets: fetched on first use from a loopback server standing in for GitHub, verified (sha256,
git blob id, or the first download's record), cached, read offline, and the one-line failures of the CLI."""

import hashlib
import re
import shutil
import socket
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
from conftest import GENEVAL_FIXTURE_ROWS

from tempflow import prompt_sets
from tempflow.cli import EXIT_BAD_INPUT, main
from tempflow.prompt_sets import (
    OFFICIAL_PROMPT_SETS,
    PromptSetDigestError,
    PromptSetUnavailable,
    UnpinnedDigestWarning,
    cached_path,
    fetch,
    git_blob_id,
    source_url,
)
from tempflow.prompts import load_prompts

TINY_RECIPE = str(Path(__file__).parents[1] / "recipes" / "tiny.yaml")
GENEVAL_TAGS = {"single_object", "two_object", "counting", "colors", "position", "color_attr"}


def _lines(content: bytes) -> list[str]:
    return content.decode().splitlines()


def _cached_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_first_use_downloads_verifies_and_caches_and_later_reads_need_no_server(official_prompt_sets):
    served = official_prompt_sets
    records = load_prompts("pickscore:train")
    assert [r["prompt"] for r in records] == _lines(served.contents["pickscore:train"])
    real = OFFICIAL_PROMPT_SETS["pickscore:train"]
    assert served.requests == [f"/yifan123/flow_grpo/{real.commit}/dataset/pickscore/train.txt"]
    path = cached_path(real)
    assert path.read_bytes() == served.contents["pickscore:train"]
    assert path.parts[-6:] == ("yifan123", "flow_grpo", real.commit, "dataset", "pickscore", "train.txt")

    served.stop()
    assert load_prompts("pickscore:train") == records
    assert len(served.requests) == 1


def test_geneval_rows_keep_their_metadata_and_verify_by_git_blob(official_prompt_sets):
    entry = OFFICIAL_PROMPT_SETS["geneval:train"]
    assert entry.sha256 is None and entry.git_blob  # as the real set: only its blob id is known
    records = load_prompts("geneval:train")
    assert records == GENEVAL_FIXTURE_ROWS
    assert {r["tag"] for r in records} == GENEVAL_TAGS
    assert all("include" in r for r in records) and any("exclude" in r for r in records)


@pytest.mark.parametrize("name", ["pickscore:test", "geneval:train"])  # pinned by sha256; by git blob only
def test_a_download_with_the_wrong_digest_is_refused_and_nothing_is_cached(official_prompt_sets, monkeypatch, name):
    import dataclasses

    entry = OFFICIAL_PROMPT_SETS[name]
    content = official_prompt_sets.contents[name]
    if entry.sha256:
        wrong, found = hashlib.sha256(b"another file").hexdigest(), hashlib.sha256(content).hexdigest()
        monkeypatch.setitem(OFFICIAL_PROMPT_SETS, name, dataclasses.replace(entry, sha256=wrong))
    else:
        wrong = hashlib.sha1(b"blob 12\0another file").hexdigest()
        found = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
        monkeypatch.setitem(OFFICIAL_PROMPT_SETS, name, dataclasses.replace(entry, git_blob=wrong))
    with pytest.raises(PromptSetDigestError) as caught:
        load_prompts(name)
    message = str(caught.value)
    assert name in message and source_url(entry) in message and wrong in message and found in message
    assert "\n" not in message
    assert _cached_files(prompt_sets.cache_root()) == []


def test_a_cached_file_changed_later_is_refused_and_download_replaces_it(official_prompt_sets, capsys):
    path = fetch(OFFICIAL_PROMPT_SETS["ocr:test"])
    path.write_text("a tampered prompt\n")
    with pytest.raises(PromptSetDigestError, match="ocr:test.*does not match its sha256"):
        load_prompts("ocr:test")
    assert main(["prompts", "download", "ocr:test"]) == 0
    assert path.read_bytes() == official_prompt_sets.contents["ocr:test"]
    assert "ocr:test" in capsys.readouterr().out


def test_a_set_without_pinned_digest_records_its_first_download_and_checks_later_reads(official_prompt_sets):
    entry = OFFICIAL_PROMPT_SETS["hpsv2:train"]
    assert entry.sha256 is None and entry.git_blob is None
    content = official_prompt_sets.contents["hpsv2:train"]
    with pytest.warns(UnpinnedDigestWarning, match="hpsv2:train.*digest not pinned"):
        records = load_prompts("hpsv2:train")
    assert [r["prompt"] for r in records] == _lines(content)
    path = cached_path(entry)
    record = path.with_name(path.name + ".sha256")
    assert record.read_text().strip() == hashlib.sha256(content).hexdigest()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning comes once, at the first download
        assert load_prompts("hpsv2:train") == records
    path.write_bytes(content + b"one more prompt\n")
    with pytest.raises(PromptSetDigestError, match="sha256 recorded at first download"):
        load_prompts("hpsv2:train")


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("why", ["HF_HUB_OFFLINE", "TEMPFLOW_OFFLINE", "unreachable"])
def test_without_network_and_an_empty_cache_prompts_download_says_one_line_and_exits_2(
        official_prompt_sets, monkeypatch, capsys, why):
    if why == "unreachable":
        monkeypatch.setenv("TEMPFLOW_PROMPT_SETS_MIRROR", f"http://127.0.0.1:{_closed_port()}")
    else:
        monkeypatch.setenv(why, "1")
    assert main(["prompts", "download", "pickscore:train"]) == EXIT_BAD_INPUT
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "'pickscore:train'" in error and "`tempflow prompts download pickscore:train`" in error
    assert "TEMPFLOW_CACHE" in error
    with pytest.raises(PromptSetUnavailable):  # a FileNotFoundError: what every command reports in one line
        load_prompts("pickscore:train")
    assert official_prompt_sets.requests == []
    assert _cached_files(prompt_sets.cache_root()) == []


def test_a_set_missing_upstream_fails_alone_and_download_all_fetches_the_others(official_prompt_sets, capsys):
    entry = OFFICIAL_PROMPT_SETS["hpsv2:test"]
    del official_prompt_sets.files[f"{entry.repository}/{entry.commit}/{entry.path}"]  # the server answers 404
    with pytest.warns(UnpinnedDigestWarning):  # hpsv2:train still downloads, unpinned
        assert main(["prompts", "download", "--all"]) == EXIT_BAD_INPUT
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("tempflow: error:")]  # beside progress bars
    assert len(errors) == 1 and "'hpsv2:test'" in errors[0] and "HTTP 404" in errors[0]
    assert len(out.splitlines()) == len(OFFICIAL_PROMPT_SETS) - 1
    assert not cached_path(entry).exists() and cached_path(OFFICIAL_PROMPT_SETS["hpsv2:train"]).is_file()


def test_offline_with_an_empty_cache_eval_and_train_say_one_line_and_exit_2(official_prompt_sets, monkeypatch,
                                                                             tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["eval", "--prompts", "geneval:test", "--output", str(tmp_path / "eval")]) == EXIT_BAD_INPUT
    assert main(["train", TINY_RECIPE, "--train_prompts", "pickscore:train",
                 "--output_dir", str(tmp_path / "run")]) == EXIT_BAD_INPUT
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    for line, name in zip(lines, ["geneval:test", "pickscore:train"]):
        assert line.startswith("tempflow: error: ") and f"tempflow prompts download {name}" in line
    assert not (tmp_path / "eval").exists() and not (tmp_path / "run").exists()


def test_an_unknown_set_name_lists_the_known_ones(official_prompt_sets, capsys):
    assert main(["prompts", "download", "geneval:tran"]) == EXIT_BAD_INPUT
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "'geneval:tran'" in error
    assert all(name in error for name in OFFICIAL_PROMPT_SETS)
    with pytest.raises(ValueError, match="unknown prompt set 'pickscore:eval'"):
        load_prompts("pickscore:eval")
    assert official_prompt_sets.requests == []


def test_prompts_list_shows_which_sets_are_cached_and_where(official_prompt_sets, capsys):
    assert main(["prompts", "list"]) == 0
    before = capsys.readouterr().out.splitlines()
    assert len(before) == 1 + len(OFFICIAL_PROMPT_SETS) and all(line.endswith("not cached") for line in before[1:])
    path = fetch(OFFICIAL_PROMPT_SETS["pickscore:test"])
    with pytest.warns(UnpinnedDigestWarning):
        fetch(OFFICIAL_PROMPT_SETS["hpsv2:test"])
    assert main(["prompts", "list"]) == 0
    after = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert after["pickscore:test"].endswith(f"cached at {path}") and "sha256 pinned" in after["pickscore:test"]
    assert "git blob pinned" in after["geneval:train"] and after["geneval:train"].endswith("not cached")
    assert "digest not pinned" in after["hpsv2:train"] and "digest not pinned (sha256" in after["hpsv2:test"]
    assert sum(not line.endswith("not cached") for line in after.values()) == 2


def test_prompts_download_all_fills_the_cache_for_offline_use(official_prompt_sets, monkeypatch, capsys):
    with pytest.warns(UnpinnedDigestWarning):
        assert main(["prompts", "download", "--all"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(OFFICIAL_PROMPT_SETS)
    official_prompt_sets.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, content in official_prompt_sets.contents.items():
        assert cached_path(OFFICIAL_PROMPT_SETS[name]).read_bytes() == content
        assert len(load_prompts(name)) == len(content.splitlines())


def test_concurrent_downloads_of_one_set_leave_one_good_file(official_prompt_sets):
    official_prompt_sets.delay = 0.5  # both threads are inside their download before either finishes
    entry = OFFICIAL_PROMPT_SETS["geneval:test"]
    start = threading.Barrier(2)
    paths, errors = [], []

    def download():
        start.wait()
        try:
            paths.append(fetch(entry))
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=download) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(official_prompt_sets.requests) == 2
    assert paths[0] == paths[1]
    assert list(paths[0].parent.iterdir()) == [paths[0]]  # no temporary file left beside it
    assert paths[0].read_bytes() == official_prompt_sets.contents["geneval:test"]


def test_the_mirror_variable_replaces_the_raw_github_host(official_prompt_sets, monkeypatch):
    entry = OFFICIAL_PROMPT_SETS["geneval:benchmark"]
    monkeypatch.delenv("TEMPFLOW_PROMPT_SETS_MIRROR")
    assert source_url(entry) == (f"https://raw.githubusercontent.com/djghosh13/geneval/{entry.commit}/"
                                 "prompts/evaluation_metadata.jsonl")
    monkeypatch.setenv("TEMPFLOW_PROMPT_SETS_MIRROR", official_prompt_sets.url + "/")
    assert source_url(entry) == f"{official_prompt_sets.url}/djghosh13/geneval/{entry.commit}/" \
                                "prompts/evaluation_metadata.jsonl"
    assert load_prompts("geneval:benchmark") == GENEVAL_FIXTURE_ROWS
    assert official_prompt_sets.requests == [f"/djghosh13/geneval/{entry.commit}/prompts/evaluation_metadata.jsonl"]


def test_git_blob_id_is_what_git_hash_object_gives():
    # printed by `git hash-object` for "hello\n" and for an empty file
    assert git_blob_id(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"
    assert git_blob_id(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
    content = bytes(range(256)) * 3 + b"a photo of a kite\n"
    assert git_blob_id(content) == hashlib.sha1(f"blob {len(content)}\0".encode() + content).hexdigest()
    if shutil.which("git"):
        hashed = subprocess.run(["git", "hash-object", "--stdin"], input=content, capture_output=True, check=True)
        assert git_blob_id(content) == hashed.stdout.decode().strip()


def test_the_table_pins_well_formed_sources():
    hex_digits = re.compile(r"[0-9a-f]+")
    for name, entry in OFFICIAL_PROMPT_SETS.items():
        assert entry.name == name and re.fullmatch(r"[a-z0-9_]+:[a-z0-9_]+", name)
        assert len(entry.commit) == 40 and hex_digits.fullmatch(entry.commit), name
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", entry.repository), name
        assert entry.sha256 is None or (len(entry.sha256) == 64 and hex_digits.fullmatch(entry.sha256)), name
        assert entry.git_blob is None or (len(entry.git_blob) == 40 and hex_digits.fullmatch(entry.git_blob)), name
        assert entry.format == Path(entry.path).suffix.lstrip("."), name
        assert (entry.size is None) == (entry.count is None), name
        assert entry.size is None or entry.size > entry.count > 0, name
        assert entry.description and entry.used_by
    # the sets the official runs read, and the GenEval benchmark
    assert {"pickscore:train", "pickscore:test", "geneval:train", "geneval:test", "ocr:train", "ocr:test",
            "geneval:benchmark", "hpsv2:train", "hpsv2:test"} <= set(OFFICIAL_PROMPT_SETS)
    # no copy of TempFlow-GRPO's dataset/hpsv2 could be read: nothing about it may claim to be verified
    assert all(OFFICIAL_PROMPT_SETS[n].sha256 is None and OFFICIAL_PROMPT_SETS[n].git_blob is None
               for n in ("hpsv2:train", "hpsv2:test"))


def test_listing_and_the_loader_import_nothing_heavy(tmp_path):
    code = ("import sys; from tempflow.prompt_sets import main; main(['list']); "
            "from tempflow.registry import prompt_set_loader; assert prompt_set_loader('geneval:test'); "
            "print(sorted(m for m in ('torch', 'numpy', 'diffusers', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={"TEMPFLOW_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.stdout.strip().splitlines()[-1] == "[]"
