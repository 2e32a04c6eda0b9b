"""The whole GPU check as one command that fits a short GPU lease (≤ 8 minutes on one H100).

    python benchmarks/gpu_suite.py --output DIR              # on the GPU machine (BENCHMARKS.md: the device command)
    python benchmarks/gpu_suite.py --dry-run --output DIR    # the same parts on the CPU at cut sizes (CI runs it)

Parts start in order of value, one at a time (two in the dry run), each in its own process under its own time
budget and never past the suite's: the GPU tests (``tests/test_gpu.py``: kernels, then models and DeepSpeed), the
training memory table (SD3.5-M 512 px, FLUX-dev 1024 px and a Wan-1.3B video step, ``throughput.py
--memory-table``), the attention benchmark (kernels and a FLUX-dev step) and the SD3.5-M throughput benchmark
(eager, then compiled, in one run). A
part that fails or runs out of time is recorded with the tail of its output, and the suite goes on; results a part
wrote before failing are kept.

The dry run makes the same calls with CPU arguments appended (argparse keeps the last value): the real SD3.5-M,
FLUX-dev and Wan-1.3B configurations with one or two blocks, 64 px (Wan: 5 frames), float32, Triton's interpreter,
one thread per part.

Writes DIR/gpu_suite.json (every part's status and results), DIR/gpu_suite.md (the tables) and DIR/gpu_suite.log
(every part's output), all three rewritten after each part. Exits 0 when every part passed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).parents[1]
TESTS = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py", "--junitxml", "{result}"]
CPU_CUT = ("--device", "cpu", "--dtype", "fp32", "--cut-layers", "--resolution", "64", "--text-tokens", "16",
           "--steps", "2", "--children", "2")
MEMORY = ["benchmarks/throughput.py", "--dtype", "bf16", "--memory-table", "--output", "{result}"]
REQUIRED_MODULES = ("diffusers", "accelerate", "peft", "transformers", "yaml", "tempflow.attention", "tempflow.rewards")
MIN_PART_S = 20
"""A part with less time left than this is not started: importing torch and the models takes most of it."""
OUTPUT_TAIL_LINES = 40
LOG_BYTES_PER_PART = 2 << 20


@dataclass(frozen=True)
class Part:
    name: str
    kind: str
    """``tests`` (a JUnit XML result) or the benchmark whose JSON it writes: memory, attention, throughput."""
    budget_s: int
    """Its time limit, sized for an H100 (BENCHMARKS.md has the estimates)."""
    args: list[str]
    """After the Python interpreter; ``{result}`` is where the part writes its results."""
    dry_run_args: tuple[str, ...] = ()
    """Appended in the dry run."""


PARTS = [
    Part("tests-kernels", "tests", 120, [*TESTS, "-k", "kernel"]),
    Part("tests-models", "tests", 180, [*TESTS, "-k", "not kernel"]),  # DeepSpeed's fused Adam last
    # N and G cut from the recipes' 10 and 6 to fit the lease; memory follows the micro-batch, which stays the recipe's
    Part("memory-sd35m", "memory", 90, [*MEMORY, "--size", "sd35m", "--steps", "4"], CPU_CUT),
    Part("memory-flux-dev", "memory", 90, [*MEMORY, "--size", "flux-dev", "--steps", "3", "--children", "2"],
         CPU_CUT),
    Part("attention", "attention", 60,
         ["benchmarks/attention.py", "--sections", "kernels", "transformer", "--output", "{result}"],
         ("--device", "cpu", "--repeats", "1")),
    # whole transformer steps per attention method at the recipes' sizes, and the `auto` decision table (issue 27);
    # it replaces the flex kernel rows (attention-flex) that the H200 run of 2026-11-28 asked for
    Part("attention-auto", "attention-steps", 200,
         ["benchmarks/attention_steps.py", "--time-limit", "170", "--output", "{result}"], ("--dry-run",)),
    # Wan 2.1 1.3B (random weights, real config): one training iteration at the card's 480x832 with 17 of its 81
    # frames (7 800 tokens), N = 3, G = 2, checkpointing only; the time comes from throughput's second repeat
    Part("memory-wan-1.3b", "memory", 45,
         [*MEMORY, "--size", "wan-1.3b", "--num-frames", "17", "--steps", "3", "--children", "2", "--checkpointing-only"],
         (*CPU_CUT, "--width", "64", "--num-frames", "5")),
    Part("throughput", "throughput", 220,
         ["benchmarks/throughput.py", "--size", "sd35m", "--dtype", "bf16", "--compile", "--seeds", "1", "--repeats",
          "1", "--floor-batch-sizes", "2", "8", "48", "--output", "{result}"],
         (*CPU_CUT, "--repeats", "1", "--floor-batch-sizes", "1", "2", "--train-batch-size", "2", "--lora-rank", "4",
          "--compile-backend", "eager")),
]


def part_env(part: Part, dry_run: bool) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if dry_run:
        # on the CPU even where a GPU exists; one thread each: small ops, and OpenMP's waits on a shared CPU
        env.update(TEMPFLOW_GPU_DRY_RUN="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
        if part.kind == "tests":
            env["TRITON_INTERPRET"] = "1"  # read when the kernels are first built
    return env


def run_part(part: Part, dry_run: bool, timeout_s: float, work: Path) -> tuple[dict, str]:
    """Run one part in its own process group, killed whole at its timeout. Returns its record and its output."""
    result = work / f"{part.name}.{'xml' if part.kind == 'tests' else 'json'}"
    args = [arg.replace("{result}", str(result)) for arg in [*part.args, *(part.dry_run_args if dry_run else ())]]
    log = work / f"{part.name}.log"
    start = time.monotonic()
    with log.open("w") as output:
        process = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=part_env(part, dry_run), stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = process.wait(timeout_s)
            status = "passed" if returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # with the compile workers and other children it started
            process.wait()
            returncode, status = None, "timed out"
    text = log.read_text(errors="replace")
    record = {"name": part.name, "kind": part.kind, "status": status, "seconds": round(time.monotonic() - start, 1),
              "timeout_s": round(timeout_s), "returncode": returncode, "command": ["python", *args],
              "results": read_results(part, result), "output_tail": text.splitlines()[-OUTPUT_TAIL_LINES:]}
    return record, text


def read_results(part: Part, path: Path):
    """The part's JSON, or its tests' outcomes from the JUnit XML; None if it wrote none (or only part of one)."""
    try:
        if part.kind != "tests":
            return json.loads(path.read_text())
        cases = list(ElementTree.parse(path).getroot().iter("testcase"))
    except (OSError, ValueError, ElementTree.ParseError):
        return None
    tests = []
    for case in cases:
        outcome, message = "passed", ""
        for tag, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            element = case.find(tag)
            if element is not None:
                outcome, message = name, element.get("message", "")
                break
        tests.append({"test": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0)),
                      "message": message.splitlines()[0][:200] if message else ""})
    return tests


def missing_modules() -> list[str]:
    """What the parts import and this Python cannot find: on the GPU machine, wheels not installed, or tempflow not
    installed (its ``attention`` and ``rewards`` folders map into the package only through an install)."""
    missing = []
    for name in REQUIRED_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ImportError:  # the parent package itself is missing or fails to import
            found = False
        if not found:
            missing.append(name)
    return missing


def say(line: str) -> None:
    sys.stdout.write(line + "\n")  # one write: lines from the worker threads do not interleave
    sys.stdout.flush()


def device_description(dry_run: bool) -> str:
    """The GPU as nvidia-smi names it, read without a CUDA context in this process (the parts need the memory)."""
    if dry_run or shutil.which("nvidia-smi") is None:
        return "cpu"
    query = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True)
    return query.stdout.strip() or "unknown GPU"


# --- the Markdown report ---------------------------------------------------------------------------------------


def _number(value, digits=3) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return "n/a" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(_number(cell) for cell in row) + " |" for row in rows), ""]


def tests_section(parts: list[dict]) -> list[str]:
    rows = [[f"{p['name']}: {t['test']}", t["outcome"], t["seconds"], t["message"].replace("|", "/")]
            for p in parts for t in p["results"]]
    return ["## Tests", "", *_table(["test", "outcome", "seconds", "message"], rows)]


def memory_section(parts: list[dict]) -> list[str]:
    results = [p["results"] for p in parts]
    def size(r):  # a video's frame size and frame count
        return f"{r['resolution']}x{r['width']}, {r['num_frames']} frames" if "num_frames" in r else r["resolution"]

    rows = [[r["size"], size(r), f"{r['N']}, {r['G']}", row["gradient_checkpointing"], row["ema_offload"],
             row.get("peak_gb"), row.get("seconds"), row.get("error", "")] for r in results for row in r["memory_table"]]
    rss = ", ".join(f"{r['size']} {r['process_peak_rss_gb']:.1f}" for r in results)
    return ["## One training iteration (LoRA, recipe settings)", "",
            *_table(["model", "px", "N, G", "gradient checkpointing", "EMA offload", "peak GPU GiB", "s / iteration",
                     "error"], rows), f"Peak host memory (RSS) of each process, GiB: {rss}.", ""]


def attention_section(parts: list[dict]) -> list[str]:
    lines = []
    for r in (p["results"] for p in parts):
        lines += [f"## Attention ({r['dtype']}, block-sparse kernel: {r['kernel']})", ""]
        lines += _table(["shape", "tokens", "method", "ms", "vs dense", "relative error"],
                        [[k["shape"], k["tokens"], k["method"], k["ms"], k["speedup"], k["rel_error"]]
                         for k in r.get("kernels", [])])
        lines += _table(["FLUX step", "ms", "vs dense", "relative error"],
                        [[t["method"], t["ms"], t["speedup"], t["rel_error"]] for t in r.get("transformer", [])])
    return lines


def throughput_section(parts: list[dict]) -> list[str]:
    lines = ["## Throughput", ""]
    for r in (p["results"] for p in parts):
        lines += [f"{r['size']} at {r['resolution']} px ({r['dtype']}), N = {r['N']}, G = {r['G']}, {r['seeds']} seed(s).",
                  "", "- ms per latent-evaluation by batch: "
                  + ", ".join(f"B{b} {ms:.2f}" for b, ms in r["floor_ms_per_latent_eval"].items()),
                  f"- branched rollout {r['tempflow_s']:.2f} s: {r['tempflow_vs_floor']:.2f} of the floor, "
                  f"{r['speedup_vs_reference']:.2f}x the reference loop; peak GPU GiB {_number(r['tempflow_peak_gb'])}",
                  "- training inner step / plain fwd+bwd, checkpointing off, on: "
                  + ", ".join(f"{t['ratio']:.2f} (peak GPU GiB {_number(t['peak_gb'])})" for t in r["training"].values())]
        if "compile" in r:  # absent when compiling failed or ran out of time
            c = r["compile"]
            lines += ["- ms per latent-evaluation, eager → compiled: "
                      + ", ".join(f"B{b} {c['eager_ms_per_latent_eval'][b]:.2f} → {ms:.2f}"
                                  for b, ms in c["compiled_ms_per_latent_eval"].items()),
                      f"- rollout eager {c['eager_rollout_s']:.2f} s → compiled {c['compiled_rollout_s']:.2f} s "
                      f"({c['rollout_speedup']:.2f}x); compile {c['compile_s']:.0f} s, {c['graphs_compiled']} graph(s)"]
        lines.append("")
    return lines


def attention_steps_section(parts: list[dict]) -> list[str]:
    return [p["results"]["markdown"] for p in parts]  # attention_steps.py renders its own table


SECTIONS = {"tests": tests_section, "memory": memory_section, "attention": attention_section,
            "attention-steps": attention_steps_section, "throughput": throughput_section}


def markdown(suite: dict, parts: list[dict]) -> str:
    lines = [f"# GPU suite: {suite['device']}{' (dry run)' if suite['dry_run'] else ''}", "",
             f"{suite['started']}, torch {suite['torch']}, {suite['seconds']:.0f} s of a {suite['time_budget_s']:.0f} s "
             "budget.", ""]
    lines += _table(["part", "status", "seconds", "time limit"],
                    [[p["name"], p["status"], p["seconds"], p["timeout_s"]] for p in parts])
    for kind, section in SECTIONS.items():
        chosen = [p for p in parts if p["kind"] == kind and p["results"]]
        if chosen:
            try:
                lines += section(chosen)
            except (KeyError, TypeError, ValueError) as err:  # results a part left half-written: the report goes on
                lines += [f"({kind}: results not rendered: {err!r})", ""]
    return "\n".join(lines)


# --- the run ---------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="directory for gpu_suite.json, .md and .log")
    parser.add_argument("--dry-run", action="store_true", help="run every part on the CPU at cut sizes")
    parser.add_argument("--time-budget", type=float, default=480, help="seconds for the whole suite")
    parser.add_argument("--jobs", type=int, help="parts at once; default 1 (one GPU), 2 in the dry run (two cores)")
    parser.add_argument("--parts", nargs="+", choices=[p.name for p in PARTS], help="run only these (default all)")
    args = parser.parse_args(argv)
    missing = missing_modules()
    if missing:
        say(f"cannot import {', '.join(missing)}: install the wheels and tempflow first (BENCHMARKS.md, GPU suite)")
        return 2
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    deadline = start + args.time_budget
    suite = {"device": device_description(args.dry_run), "dry_run": args.dry_run,
             "torch": importlib.metadata.version("torch"), "time_budget_s": args.time_budget,
             "started": datetime.datetime.now().isoformat(timespec="seconds"), "seconds": 0.0}
    records, logs = [], []
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as work:

        def attempt(part: Part) -> tuple[dict, str]:
            timeout_s = min(part.budget_s, deadline - time.monotonic())
            if timeout_s < MIN_PART_S:
                return {"name": part.name, "kind": part.kind, "status": "not run: out of time", "seconds": 0.0,
                        "timeout_s": 0, "results": None}, ""
            say(f"{part.name}: running (at most {timeout_s:.0f} s)")
            return run_part(part, args.dry_run, timeout_s, Path(work))

        selected = [part for part in PARTS if not args.parts or part.name in args.parts]
        with ThreadPoolExecutor(args.jobs or (2 if args.dry_run else 1)) as pool:
            for future in [pool.submit(attempt, part) for part in selected]:  # started in order, reported in order
                record, text = future.result()
                say(f"{record['name']}: {record['status']} in {record['seconds']:.0f} s")
                records.append(record)
                logs.append(f"===== {record['name']}: {record['status']} in {record['seconds']:.0f} s\n"
                            + text[-LOG_BYTES_PER_PART:])
                suite["seconds"] = time.monotonic() - start
                (output / "gpu_suite.json").write_text(json.dumps({"suite": suite, "parts": records}, indent=2))
                (output / "gpu_suite.md").write_text(markdown(suite, records))
                (output / "gpu_suite.log").write_text("\n".join(logs))
    print(markdown(suite, records))
    return 0 if all(r["status"] == "passed" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
