"""Fuzzed bad input (recipes and prompt files cut short, values of the wrong type or size, stray bytes, non-UTF-8,
edit rows with missing or wrong images, eval and sample flags out of range) only ever ends `tempflow train`,
`eval` or `sample` with one line on stderr and exit 2, before the model loads. Mutations that leave the input
valid reach the model check, which fails the same way (no model there)."""

import contextlib
import io
import json
import random
import re
from pathlib import Path

import pytest
from PIL import Image

from tempflow.cli import main

RECIPE = Path(__file__).parents[1] / "recipes" / "tiny.yaml"
VALUES = [b"[]", b"{}", b"-1", b"1e309", b"99999999999999999999999999", b"nan", b'""', b"[1, [2, {3: 4}]]", b"null",
          b"true", b"\xff\xfe", b"!!python/object:os.system ''", b"&a [*a]", b'"' + b"x" * 100_000 + b'"']


def _run(argv) -> tuple[int, list[str]]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exit_:  # a flag argparse refuses
            code = exit_.code
    return code, [line for line in err.getvalue().splitlines() if line.strip()]


def _mutate(data: bytes, rng: random.Random, rows) -> bytes:
    lines = data.split(b"\n")
    kind = rng.randrange(6)
    if kind == 0:
        return data[: rng.randrange(len(data))]
    if kind == 1:
        i = rng.randrange(len(data))
        return data[:i] + bytes([rng.randrange(256)]) + data[i:]
    if kind == 2:
        del lines[rng.randrange(len(lines))]
        return b"\n".join(lines)
    if kind == 3:
        lines[rng.randrange(len(lines))] = rng.choice(rows)
        return b"\n".join(lines)
    if kind == 4:
        return b"\xff\xfe" + data
    return rng.choice([b"", b"\n\n", b"[1, 2]", b'"just a string"', data * 20])


def _assert_one_line_exit_2(code, lines, what):
    one_line = len(lines) == 1 and re.match(r"tempflow( eval| sample)?: error: ", lines[0])
    assert code == 2 and one_line, (what, code, lines[:3])


def test_fuzzed_recipes_fail_in_one_line(tmp_path):
    rng = random.Random(0)
    recipe = RECIPE.read_bytes()
    keys = [line.split(b":")[0] for line in recipe.split(b"\n") if b":" in line and not line.startswith(b"#")]
    rows = [key + b": " + value for key in keys for value in VALUES] + [b"unknown_key: 1", b"\t- x", b"env: [1]"]
    for n in range(150):
        path = tmp_path / f"recipe{n}.yaml"
        path.write_bytes(_mutate(recipe, rng, rows))
        code, lines = _run(["train", str(path), "--output_dir", str(tmp_path / f"out{n}"),
                            "--model_name_or_path", str(tmp_path / "no-model")])
        _assert_one_line_exit_2(code, lines, path.read_bytes()[:300])
        assert not (tmp_path / f"out{n}").exists()


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_fuzzed_prompt_files_fail_in_one_line(tmp_path, suffix):
    rng = random.Random(1)
    Image.new("RGB", (8, 8)).save(tmp_path / "source.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    prompts = "\n".join(json.dumps({"prompt": f"a red square {i}", "task": "single_object"}) for i in range(6))
    edits = "\n".join(json.dumps({"image": "source.png", "instruction": "make it blue"}) for _ in range(3))
    rows = ([b'{"prompt": ' + value + b"}" for value in VALUES]
            + [b'{"image": ' + image + b', "instruction": "x"}'
               for image in (b'"missing.png"', b'"broken.png"', b'["source.png", 3]', b"[]", *VALUES[:6])])
    for n in range(100):
        path = tmp_path / f"prompts{n}{suffix}"
        path.write_bytes(_mutate(rng.choice([prompts, edits]).encode(), rng, rows))
        code, lines = _run(["train", str(RECIPE), "--train_prompts", str(path), "--eval_prompts", "none",
                            "--output_dir", str(tmp_path / f"out{n}"), "--model_name_or_path", str(tmp_path / "none")])
        _assert_one_line_exit_2(code, lines, path.read_bytes()[:300])


def test_non_utf8_input_is_named(tmp_path):
    recipe, prompts = tmp_path / "recipe.yaml", tmp_path / "prompts.txt"
    recipe.write_bytes(b"learning_rate: 1.0e-3\n\xff\n")
    prompts.write_bytes(b"a red square\n\xfe\n")
    code, lines = _run(["train", str(recipe), "--output_dir", str(tmp_path / "out")])
    assert code == 2 and lines == [f"tempflow: error: recipe {str(recipe)!r} is not UTF-8 text (byte 0xff at position 22)"]
    code, lines = _run(["train", str(RECIPE), "--train_prompts", str(prompts), "--output_dir", str(tmp_path / "out")])
    assert code == 2 and lines == [f"tempflow: error: prompt file {str(prompts)!r} is not UTF-8 text (byte 0xfe at "
                                   "position 13)"]


FLAG_VALUES = ["nan", "inf", "-inf", "-1", "0", "1e309", "99999999999999999999", "63", "100001", "4097", "x",
               "", "0.5", "-0.0001", "1"]
SAMPLING_FLAGS = ["--num-steps", "--guidance-scale", "--resolution", "--width", "--num-frames",
                  "--max-sequence-length", "--batch-size", "--seed", "--limit", "--pag-scale",
                  "--pag-softness"]


def test_fuzzed_eval_and_sample_flags_fail_in_one_line(tmp_path):
    """With the shipped ShapesWorld model (sizes are checked against its own multiple, 8) and an output that is
    a file, so that flags which all pass still end, at the output check, before the model loads."""
    rng = random.Random(2)
    (tmp_path / "a-file").write_text("")
    for _ in range(200):
        command = rng.choice(["eval", "sample"])
        flags = SAMPLING_FLAGS + (["--samples-per-prompt"] if command == "eval" else ["--prompt"])
        argv = [command, "--model", "shapes", "--output", str(tmp_path / "a-file")]
        for flag in rng.sample(flags, rng.randint(1, 3)):
            argv += [flag, rng.choice(FLAG_VALUES)]
        code, lines = _run(argv)
        _assert_one_line_exit_2(code, lines, argv)
