"""``tempflow check-recipe``: does a recipe train what the official run it claims to reproduce trained?

The official configurations are records in ``tempflow/references/`` (one YAML file each: every value with the file,
quoted line and commit it was read from). A recipe names one (``reference``) and the process count its per-process
sizes were derived for (``recipe_num_processes``); the check compares the recipe's effective hyperparameters
(:mod:`tempflow.effective`) with the record's, prints each difference with both values and the official source
line, and fails on every difference that the recipe's ``deviations`` mapping does not state with a reason (and on a
stated deviation that is not one). Rewards and prompt sets are compared by name and arguments, never loaded. It also
prints the per-process sizes that keep the global batch on 8 and on 1 processes.

Exit codes: 0 the recipe matches its reference up to stated deviations (or claims none); 1 it does not; 2 bad input.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

REFERENCES_DIR = Path(__file__).parent / "references"
NO_REFERENCE = "none"
OTHER_PROCESS_COUNTS = (8, 1)
WEIGHT_SCALE_TOLERANCE = 0.01
"""Relative tolerance on the noise-aware weights' scale: the official scripts hard-code it to 3 digits."""


@dataclass(frozen=True)
class Reference:
    """One official configuration, in effective terms."""

    name: str
    title: str
    repository: str
    sources: dict[str, dict]
    num_processes: dict
    model_name_or_path: str
    values: dict[str, dict]

    def cite(self, entry: dict) -> str:
        """Where ``entry`` (one of :attr:`values`, or :attr:`num_processes`) was read: file, function, commit, line."""
        source = self.sources[entry["source"]]
        repository = source.get("repository", self.repository)
        where = f" {source['where']}" if "where" in source else ""
        return f"{repository} {source['file']}{where} @ {source['commit'][:7]}: `{entry['line']}`"


def load_references(directory: Path = REFERENCES_DIR) -> dict[str, Reference]:
    """Every record in ``directory``, with ``extends`` resolved (sources and values of the base, overridden)."""
    import yaml

    raw = {}
    for path in sorted(directory.glob("*.yaml")):
        record = yaml.safe_load(path.read_text(encoding="utf-8"))
        raw[record["name"]] = record

    def resolved(name: str) -> dict:
        record = dict(raw[name])
        if "extends" in record:
            base = resolved(record.pop("extends"))
            record = {**base, **record, "sources": {**base["sources"], **record.get("sources", {})},
                      "values": {**base["values"], **record.get("values", {})}}
        return record

    fields = ("name", "title", "repository", "sources", "num_processes", "model_name_or_path", "values")
    return {name: Reference(**{f: resolved(name)[f] for f in fields}) for name in raw}


@dataclass
class Comparison:
    """One hyperparameter of the recipe beside the reference's."""

    key: str
    ours: Any
    theirs: Any
    same: bool
    detail: str = ""
    """How the values were converted to compare them, when they were."""


def compare(config, reference: Reference, num_processes: int, model) -> list[Comparison]:
    """The recipe's effective hyperparameters on ``num_processes`` processes with ``model``'s configs
    (:class:`~tempflow.model_configs.ModelConfigs`) beside the reference's, key by key (the keys it records)."""
    from .effective import effective_hyperparameters, resolve_lora_modules

    ours = effective_hyperparameters(config, num_processes, model)
    results = []
    for key, entry in reference.values.items():
        theirs = entry["value"]
        if key == "lora_modules" and ours[key] is not None and theirs is not None:
            mine, official = resolve_lora_modules(model, ours[key]), resolve_lora_modules(model, theirs)
            results.append(Comparison(key, ours[key], theirs, mine == official, _module_difference(mine, official)))
        elif key == "beta":
            results.append(_compare_beta(config, model, ours, reference))
        elif key == "noise_aware_weight_scale" and ours[key] is not None and theirs is not None:
            same = math.isclose(ours[key], theirs, rel_tol=WEIGHT_SCALE_TOLERANCE)
            results.append(Comparison(key, round(ours[key], 4), theirs, same,
                                      "tempflow's is 1/mean(std) over the trained steps of this σ grid"))
        elif key == "rewards":
            official = sorted(theirs, key=lambda spec: spec["name"])
            same = _equal(ours[key], official)
            results.append(Comparison(key, ours[key], official, same, "" if same else _reward_difference(ours[key],
                                                                                                         official)))
        elif key in ("train_prompts", "eval_prompts") and ours[key] != theirs:
            results.append(Comparison(key, ours[key], theirs, False, _prompt_set_difference(ours[key], theirs)))
        else:
            results.append(Comparison(key, ours[key], theirs, _equal(ours[key], theirs)))
    return results


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


REWARD_MEANINGS = {
    "geneval": "GenEval partial credit (the reward server's `scores`)",
    "geneval_strict": "GenEval strict 0/1",
    "pickscore": "PickScore",
}
"""How a reward's name reads in a difference (others read as their name)."""

REGISTERED_PROMPT_SET = re.compile(r"(^|\s)[A-Za-z_][\w-]*:[\w-]+")
"""A registered prompt set's name (``prefix:name``) in an effective ``train_prompts`` / ``eval_prompts`` value."""


def _reward_difference(mine: list[dict], official: list[dict]) -> str:
    """What differs between two reward lists, in words: rewards on one side only, then convention and weight."""
    ours, theirs = {spec["name"]: spec for spec in mine}, {spec["name"]: spec for spec in official}
    parts = []
    only_ours, only_theirs = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    if only_ours or only_theirs:
        parts.append(f"{', '.join(map(_reward_meaning, only_ours)) or 'nothing'} vs "
                     f"{', '.join(map(_reward_meaning, only_theirs)) or 'nothing'}")
    for name in sorted(set(ours) & set(theirs)):
        for field in [f for f in {**ours[name], **theirs[name]} if f != "name"]:
            if not _equal(ours[name].get(field), theirs[name].get(field)):
                parts.append(f"{_reward_meaning(name)} {_reward_field(field, ours[name].get(field))} vs "
                             f"{_reward_field(field, theirs[name].get(field))}")
    return "recipe vs reference: " + "; ".join(parts)


def _reward_meaning(name: str) -> str:
    return REWARD_MEANINGS.get(name, name)


def _reward_field(field: str, value: Any) -> str:
    if field == "scale" and isinstance(value, str):
        return "raw" if value == "1" else f"/{value.removeprefix('1/')}"
    if field == "jpeg_quality":
        return "scored as decoded" if value is None else f"JPEG-encoded at quality {value} before scoring"
    if field == "detector_bgr":
        return "with red and blue swapped for the detector" if value else "in RGB for the detector"
    return f"{field} {value!r}"


def _prompt_set_difference(mine: str | None, official: str | None) -> str:
    reads_a_file = mine is not None and not REGISTERED_PROMPT_SET.search(mine)
    if reads_a_file and official is not None and REGISTERED_PROMPT_SET.search(official):
        return (f"the recipe reads a file, the reference the registered set {official}: if the file holds the "
                "same prompts, state it as a deviation")
    return "another prompt set changes what is trained or measured"


def _module_difference(mine: list[str], official: list[str]) -> str:
    only_ours, only_theirs = sorted(set(mine) - set(official)), sorted(set(official) - set(mine))
    detail = f"{len(mine)} modules vs {len(official)} on the model's module names"
    if only_ours:
        detail += f"; only the recipe's: {len(only_ours)}, e.g. {', '.join(only_ours[:3])}"
    if only_theirs:
        detail += f"; only the reference's: {len(only_theirs)}, e.g. {', '.join(only_theirs[:3])}"
    return detail


def _compare_beta(config, model, ours: dict, reference: Reference) -> Comparison:
    """β compared in the reference's KL convention: the same number means a different KL strength under the other
    (step_variance divides by 2·s²·(−Δ), noise_scale by 2·s², so β_noise_scale = β_step_variance / (−Δ))."""
    from .effective import trained_step_dts

    theirs = reference.values["beta"]["value"]
    their_convention = reference.values.get("kl_normalization", {}).get("value")
    if ours["beta"] == 0 or theirs == 0 or their_convention in (None, config.kl_normalization):
        return Comparison("beta", ours["beta"], theirs, _equal(ours["beta"], theirs))
    dts = trained_step_dts(config, model)
    if dts is None:
        return Comparison("beta", ours["beta"], theirs, False, f"recipe in {config.kl_normalization}, reference in "
                                                               f"{their_convention}")
    converted = ours["beta"] / dts if their_convention == "noise_scale" else ours["beta"] * dts
    detail = (f"the recipe's {ours['beta']:g} ({config.kl_normalization}) is {float(converted.min()):.3g}.."
              f"{float(converted.max()):.3g} in {their_convention} at the trained steps")
    return Comparison("beta", ours["beta"], theirs, False, detail)


def sizes_for(config, from_processes: int, to_processes: int) -> str:
    """The per-process sizes that keep ``config``'s global batch and optimizer steps per iteration when its
    ``from_processes`` processes become ``to_processes``, as ``--field value`` overrides (or why none exist)."""
    prompts = Fraction(config.prompts_per_iteration * from_processes, to_processes)
    if prompts.denominator != 1:
        return (f"none: {config.prompts_per_iteration * from_processes} prompts do not split evenly over "
                f"{to_processes} processes (a prompt's group stays on one process)")
    rows = config.rows_per_iteration * int(prompts) // config.prompts_per_iteration  # rows grow with the prompts
    steps = config.optimizer_steps_per_iteration // config.num_iterations
    micro_batches = math.ceil(rows / config.per_device_train_batch_size)
    accumulation = math.ceil(micro_batches / steps)
    uneven = "" if micro_batches % steps == 0 else " (the last optimizer step of a pass takes fewer micro-batches)"
    return (f"--per_device_train_batch_size {config.per_device_train_batch_size} --prompts_per_iteration "
            f"{int(prompts)} --gradient_accumulation_steps {accumulation}{uneven}")


@dataclass
class Report:
    reference: Reference
    num_processes: int
    model_source: str
    """Where the model's configs were read (its published config, or a local pipeline directory)."""
    comparisons: list[Comparison]
    stated: dict[str, str]
    scaling: dict[int, str]

    @property
    def unstated(self) -> list[Comparison]:
        return [c for c in self.comparisons if not c.same and c.key not in self.stated]

    @property
    def stale(self) -> list[str]:
        """Stated deviations that are not: the recipe matches the reference there, or the reference lacks the key."""
        differing = {c.key for c in self.comparisons if not c.same}
        return sorted(key for key in self.stated if key not in differing)

    @property
    def passed(self) -> bool:
        return not self.unstated and not self.stale

    def lines(self) -> list[str]:
        ref = self.reference
        official = ref.num_processes["value"]
        out = [f"reference {ref.name}: {ref.title} ({ref.repository})",
               f"processes: {self.num_processes} (the official run: {official}; {ref.cite(ref.num_processes)})",
               f"model shape from: {self.model_source}"]
        same = [c.key for c in self.comparisons if c.same]
        out.append(f"same as the reference ({len(same)}): {', '.join(same)}")
        deviations = [c for c in self.comparisons if not c.same and c.key in self.stated]
        if deviations:
            out.append(f"stated deviations ({len(deviations)}):")
            for c in deviations:
                out += self._difference(c) + [f"      reason: {self.stated[c.key]}"]
        if self.unstated:
            out.append(f"differences the recipe does not state ({len(self.unstated)}):")
            for c in self.unstated:
                out += self._difference(c)
        for key in self.stale:
            out.append(f"stated deviation `{key}` is not one: the recipe matches the reference there (or the "
                       "reference does not record it); remove it from `deviations`")
        out.append("the same global batch and optimizer steps per iteration on other process counts:")
        out += [f"  {n} process{'es' if n > 1 else ''}: {sizes}" for n, sizes in self.scaling.items()]
        verdict = "PASS" if self.passed else "FAIL"
        out.append(f"{verdict}: {len(self.unstated)} unstated difference(s), {len(self.stale)} stale deviation(s)")
        return out

    def _difference(self, c: Comparison) -> list[str]:
        entry = self.reference.values[c.key]
        lines = [f"  {c.key}: recipe {c.ours!r}, reference {c.theirs!r}", f"      {self.reference.cite(entry)}"]
        if c.detail:
            lines.append(f"      ({c.detail})")
        if entry.get("note"):
            lines.append(f"      note: {entry['note']}")
        return lines


def check(config, reference_name: str | None = None, num_processes: int | None = None) -> Report | None:
    """Compare ``config`` with its reference (``reference_name``, default the recipe's ``reference``); None when the
    recipe claims no official run. Raises ``ValueError`` for bad input."""
    from .effective import EFFECTIVE_KEYS

    name = reference_name or config.reference
    if name is None:
        raise ValueError("the recipe names no `reference` (an official run, or `none`); pass --reference NAME "
                         "(`tempflow check-recipe --list`)")
    if name == NO_REFERENCE:
        return None
    references = load_references()
    if name not in references:
        raise ValueError(f"unknown reference {name!r}; known: {', '.join(sorted(references))}")
    stated = dict(config.deviations or {})
    unknown = sorted(set(stated) - set(EFFECTIVE_KEYS))
    if unknown:
        raise ValueError(f"`deviations` names unknown hyperparameters {unknown}; `tempflow check-recipe --keys` "
                         "lists them")
    processes = num_processes or config.recipe_num_processes
    if processes is None:
        raise ValueError("the recipe states no `recipe_num_processes` (the process count its per-process sizes were "
                         "derived for); pass --num-processes N")
    from .model_configs import pipeline_configs

    reference = references[name]
    model = pipeline_configs(config.model_name_or_path)
    scaling = {n: sizes_for(config, processes, n) for n in OTHER_PROCESS_COUNTS if n != processes}
    return Report(reference, processes, model.source, compare(config, reference, processes, model), stated, scaling)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="tempflow check-recipe",
        description="Compare a recipe's effective hyperparameters with the official configuration it reproduces "
        "(README: Fidelity). Any config field can be overridden as --field value before the check.",
        epilog="exit codes: 0 matches up to stated deviations, 1 an unstated difference, 2 bad input",
    )
    parser.add_argument("recipe", nargs="?", help="YAML recipe")
    parser.add_argument("--reference", help="official configuration to compare with (default: the recipe's)")
    parser.add_argument("--num-processes", type=int, help="processes to compute global counts for (default: the "
                        "recipe's recipe_num_processes)")
    parser.add_argument("--list", action="store_true", help="list the official configurations and exit")
    parser.add_argument("--keys", action="store_true", help="list the compared hyperparameters and exit")
    args, overrides = parser.parse_known_args(argv)
    try:
        if args.list:
            for name, reference in sorted(load_references().items()):
                print(f"{name}: {reference.title} ({reference.repository}, {reference.num_processes['value']} processes)")
            return 0
        if args.keys:
            from .effective import EFFECTIVE_KEYS

            for key, meaning in EFFECTIVE_KEYS.items():
                print(f"{key}: {meaning}")
            return 0
        if args.recipe is None:
            raise ValueError("name a recipe (tempflow check-recipe RECIPE.yaml)")
        if args.num_processes is not None and args.num_processes < 1:
            raise ValueError(f"--num-processes must be at least 1, not {args.num_processes}")
        from .config import parse_config

        report = check(parse_config(args.recipe, overrides), args.reference, args.num_processes)
    except (ValueError, FileNotFoundError) as err:
        print(f"tempflow: error: {err}", file=sys.stderr)
        return 2
    if report is None:
        print(f"{args.recipe}: claims no official run (reference: {NO_REFERENCE}); nothing to compare")
        return 0
    print("\n".join(report.lines()))
    return 0 if report.passed else 1
