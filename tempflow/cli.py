"""The `tempflow` command line: thin wrappers that parse arguments, build the parts and run them.

    tempflow train RECIPE.yaml [--key value ...]       fine-tune (also: accelerate launch -m tempflow.cli train ...)
    tempflow eval [--model M] [--lora DIR] ...         score a model (+ LoRA) on a prompt set
    tempflow sample --prompt "..." [--lora DIR] ...    generate images (or videos: animated WebP / MP4)
    tempflow pretrain-shapes                           rebuild the ShapesWorld pipeline
    tempflow serve-reward NAME [--port P] [--token T]  run a reward behind HTTP (the `remote` reward calls it)
    tempflow check-recipe RECIPE.yaml                  compare a recipe with the official run it reproduces
    tempflow plan RECIPE.yaml --gpus N --gpu-memory G  memory per GPU under DDP / ZeRO-2 / ZeRO-3 / FSDP2
    tempflow report OUTPUT_DIR                         an HTML page of a run: proxy vs gold, diversity, KL, guards
    tempflow prompts list | download NAME... | --all   the official prompt sets (geneval:train, ...) and their cache

Exit codes: 0 done; 1 check-recipe found an unstated difference, or plan found no layout that fits; 2 bad input
(a clear one-line message, nothing written); 3 training diverged (too many non-finite steps) or a guard stopped it
(reward hacking, diversity collapse; a checkpoint was written); 128+N stopped by signal N after writing a checkpoint
(resume with ``--resume_from_checkpoint latest``).
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
from pathlib import Path

from .errors import NonFiniteTrainingError, RewardError
from .redaction import redact_text

EXIT_BAD_INPUT = 2
EXIT_TRAINING_FAILED = 3
EXIT_INTERRUPTED = 128  # + the signal number, as shells report it; a checkpoint was saved first


def train(recipe: str | None, overrides: list[str]) -> dict:
    from .config import parse_config
    from .preflight import check_training_inputs
    from .progress import say

    config = parse_config(recipe, overrides)  # before the trainer's heavy imports a bad recipe fails at once,
    check_training_inputs(config)  # as do a missing file, an unknown reward or model, an output_dir in use
    say(f"training {config.model_name_or_path} with {config.algorithm} into {config.output_dir}; importing "
        "torch, diffusers and accelerate ...")  # they take seconds: the first line must not wait for them
    from .trainer import TempFlowGRPOTrainer

    trainer = TempFlowGRPOTrainer(config)
    summary = trainer.train()
    trainer.accelerator.state.destroy_process_group()  # a process group left to exit teardown can abort there
    if not trainer.accelerator.is_main_process:
        return summary
    if summary["interrupted_by"]:
        print(f"stopped by {summary['interrupted_by']} after {summary['iterations']} iterations; checkpoint saved "
              f"in {config.output_dir} (resume with --resume_from_checkpoint latest)")
        return summary
    if summary["stopped_by_guard"]:
        return summary
    final = summary.get("final", {})
    print(f"done: {summary['iterations']} iterations; outputs in {config.output_dir}")
    for key, value in final.items():
        if key != "iteration":
            print(f"  {key}: {value:.4f}")
    return summary


def _load_for_sampling(args):
    from .policies import load_policy
    from .rollout import RolloutEngine

    softpag = _softpag(args)  # checked before the (slow) load; its layers and heads once the model is there
    policy = load_policy(
        args.model,
        resolution=args.resolution,
        guidance_scale=args.guidance_scale,
        max_sequence_length=args.max_sequence_length,
        negative_prompt=args.negative_prompt,
        width=args.width,
        num_frames=args.num_frames,
    )
    if args.lora:
        policy.load_lora(args.lora)
    policy.set_softpag(softpag)
    return policy, RolloutEngine(policy, noise_level=0.0, batch_size=args.batch_size)


def _softpag(args):
    from .attention.softpag import SoftPAG

    heads = None if args.pag_heads is None else tuple(args.pag_heads)
    return SoftPAG(scale=args.pag_scale, layers=tuple(args.pag_layers), heads=heads, softness=args.pag_softness)


def _check_sampling_inputs(args) -> None:
    """What eval and sample can check before torch loads: the model and the sizes it can take, the LoRA, the
    rewards, the prompts and the output folder."""
    from . import limits, preflight

    preflight.check_model(args.model)
    problem = limits.sample_size_problem(limits.pixel_multiple(args.model), args.resolution, args.width,
                                         args.num_frames)
    if problem:
        name, why = problem
        raise ValueError(f"argument --{name.replace('_', '-')}: {why} (got {getattr(args, name)})")
    if why := limits.text_length_problem(args.max_sequence_length):
        raise ValueError(f"argument --max-sequence-length: {why} (got {args.max_sequence_length})")
    if args.lora:
        preflight.check_lora(args.lora)
    preflight.check_reward_names(getattr(args, "rewards", ()))
    if not getattr(args, "prompt", None):
        preflight.check_prompt_source(args.prompts)
    preflight.check_output_folder(args.output, "--output")


def evaluate(args) -> dict:
    """Score ODE samples of a prompt set with rewards; write eval.json and a grid into --output."""
    _check_sampling_inputs(args)
    import dataclasses
    import json

    from .evaluation import best_of_samples, sample_prompt_set, score_images, scores_by_task
    from .plots import save_image_grid
    from .prompts import load_prompts, task_labels
    from .rewards.combined import CombinedReward
    from .video import frame_strips

    records = load_prompts(args.prompts)[: args.limit]
    reward = CombinedReward.from_names(args.rewards)
    policy, engine = _load_for_sampling(args)
    k = args.samples_per_prompt
    images = sample_prompt_set(policy, engine, records, list(range(len(records))), args.seed, args.num_steps, k,
                               progress=True)
    _, components = score_images(reward, images, records * k, progress=True)
    labels = task_labels(records)
    summary = {"model": args.model, "lora": args.lora, "prompts": args.prompts, "num_prompts": len(records),
               "samples_per_prompt": k, "num_steps": args.num_steps, "guidance_scale": args.guidance_scale,
               "softpag": policy.softpag and dataclasses.asdict(policy.softpag),
               "rewards": {name: float(values.nanmean()) for name, values in components.items()},
               "per_task": scores_by_task(components, labels * k) if labels else {}}
    if k > 1:  # each prompt's best of its k samples: pass@k for 0/1 rewards
        best = best_of_samples(components, k)
        summary["best_of_k"] = {name: float(values.nanmean()) for name, values in best.items()}
        summary["per_task_best_of_k"] = scores_by_task(best, labels) if labels else {}
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "eval.json").write_text(json.dumps(summary, indent=2))
    save_image_grid(frame_strips(images[:16]), [r["prompt"] for r in records[:16]], output / "eval_grid.png")
    _print_scores(summary, k)
    return summary


def _print_scores(summary: dict, k: int) -> None:
    """Each reward's mean (pass@1 for a 0/1 reward) and, with k samples per prompt, the best of k (pass@k);
    per task beneath when the prompts name tasks."""
    for name, value in summary["rewards"].items():
        best = f"   best of {k} (pass@{k}): {summary['best_of_k'][name]:.4f}" if k > 1 else ""
        print(f"{name}: {value:.4f}{best}")
        for label, per_task in (("", summary["per_task"]), (f"best of {k}: ", summary.get("per_task_best_of_k"))):
            if per_task:
                print(f"  {label}" + ", ".join(f"{task} {score:.3f}" for task, score in per_task[name].items()))


def sample(args) -> None:
    """Generate one sample per prompt and save them as PNG files (videos: animated WebP, GIF or MP4), and a grid
    (videos: of frame strips)."""
    _check_sampling_inputs(args)
    from .evaluation import sample_prompt_set
    from .plots import save_image_grid
    from .prompts import load_prompts
    from .rewards import to_pil
    from .video import frame_strips, is_video, save_video

    records = [{"prompt": p} for p in args.prompt] if args.prompt else load_prompts(args.prompts)[: args.limit]
    policy, engine = _load_for_sampling(args)
    samples = sample_prompt_set(policy, engine, records, list(range(len(records))), args.seed, args.num_steps,
                                progress=True)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    if is_video(samples):
        for i, video in enumerate(samples):
            save_video(video, output / f"{i:04d}.{args.video_format}", getattr(policy, "frame_rate", 16))
    else:
        for i, image in enumerate(to_pil(samples)):
            image.save(output / f"{i:04d}.png")
    save_image_grid(frame_strips(samples), [r["prompt"] for r in records], output / "grid.png")
    kind = f"videos (.{args.video_format})" if is_video(samples) else "images"
    print(f"wrote {len(records)} {kind} and grid.png to {output}")


def _add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="shapes", help="pipeline directory or hub id (default: shapes)")
    parser.add_argument("--lora", help="directory holding pytorch_lora_weights.safetensors")
    parser.add_argument("--num-steps", type=_steps, default=20, help="ODE steps (default 20)")
    parser.add_argument("--guidance-scale", type=_non_negative_float, default=4.5,
                        help="CFG / guidance scale (default 4.5)")
    parser.add_argument("--resolution", type=_positive_int, default=64,
                        help="image size in pixels (default 64; the height when --width is given)")
    parser.add_argument("--width", type=_positive_int, default=None,
                        help="width in pixels (qwen_image, wan; default: square)")
    parser.add_argument("--num-frames", type=_positive_int, default=None,
                        help="video frames (wan; default 81)")
    parser.add_argument("--negative-prompt", default=None, help="CFG's negative prompt (default: the family's)")
    parser.add_argument("--max-sequence-length", type=_positive_int, default=None,
                        help="T5 tokens per prompt (default: the pipeline's)")
    parser.add_argument("--batch-size", type=_positive_int, default=64, help="latents per transformer call")
    parser.add_argument("--seed", type=_seed, default=0, help="noise seed (default 0)")
    parser.add_argument("--limit", type=_positive_int, default=None, help="use only the first N prompts")
    parser.add_argument("--pag-scale", type=_non_negative_float, default=0.0,
                        help="SoftPAG (perturbed-attention guidance) scale s; 0 (default) turns it off")
    parser.add_argument("--pag-layers", type=int, nargs="+", default=[],
                        help="blocks whose attention SoftPAG perturbs (FLUX: double blocks, then single blocks)")
    parser.add_argument("--pag-heads", type=int, nargs="+", default=None,
                        help="heads SoftPAG perturbs in those blocks (default: all)")
    parser.add_argument("--pag-softness", type=_unit_float, default=1.0,
                        help="SoftPAG u in [0, 1]: perturbed heads give (1-u)*attention + u*V (default 1: PAG)")


def _number(text: str, kind: type):
    try:
        value = kind(text)
    except ValueError:
        kind_name = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"must be {kind_name}, not {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, not {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _steps(text: str) -> int:
    from .limits import MAX_STEPS

    value = _positive_int(text)
    if value > MAX_STEPS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_STEPS} (the scheduler's training timesteps), "
                                         f"not {value}")
    return value


def _seed(text: str) -> int:
    from .limits import MAX_SEED

    value = _number(text, int)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must lie in [0, {MAX_SEED}], not {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be non-negative, not {value:g}")
    return value


def _unit_float(text: str) -> float:
    value = _number(text, float)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], not {value:g}")
    return value


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        """One line, without argparse's usage text: ``tempflow eval: error: ...``, exit status 2."""
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = _ArgumentParser(
        prog="tempflow",
        description="RL fine-tuning of flow-matching text-to-image and text-to-video models (SD3/SD3.5, FLUX.1, "
        "Qwen-Image, Wan 2.1).",
        epilog="exit codes: 0 done, 2 bad input, 3 training diverged or stopped by a guard, 128+N stopped by signal N "
        "(checkpoint saved)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser(
        "train",
        help="fine-tune a model with TempFlow-GRPO or Flow-GRPO",
        description="Fine-tune with a YAML recipe: TempFlow-GRPO, Flow-GRPO or DiffusionNFT. Model families: "
        "sd3 (SD3/SD3.5), flux (FLUX.1), qwen_image (Qwen-Image), wan (Wan 2.1 text-to-video, 1.3B and 14B).",
        epilog="example: tempflow train recipes/shapes.yaml --max_steps 20 --output_dir outputs/demo",
    )
    train_parser.add_argument("recipe", nargs="?", help="YAML recipe (fields of TempFlowGRPOConfig)")
    eval_parser = commands.add_parser(
        "eval", help="score a model (and LoRA) on a prompt set",
        description="Sample the prompts with the ODE and score them; writes eval.json and eval_grid.png.",
        epilog="example: tempflow eval --lora outputs/shapes --rewards shapes shapes_strict",
    )
    _add_sampling_arguments(eval_parser)
    eval_parser.add_argument("--prompts", default="shapes:eval",
                             help="prompt file, shapes:eval (default) or an official set (tempflow prompts list)")
    eval_parser.add_argument("--rewards", nargs="+", default=["shapes", "shapes_strict"], help="reward names")
    eval_parser.add_argument("--output", default="outputs/eval", help="output directory")
    eval_parser.add_argument("--samples-per-prompt", type=_positive_int, default=1, metavar="K",
                             help="independent noise seeds per prompt (default 1); with K > 1 each reward is also "
                             "reported as the best of K per prompt, which is pass@K for 0/1 rewards")
    sample_parser = commands.add_parser(
        "sample", help="generate images from a model (and LoRA)",
        epilog='example: tempflow sample --prompt "a photo of a red circle" --lora outputs/shapes',
    )
    _add_sampling_arguments(sample_parser)
    sample_parser.add_argument("--prompt", nargs="+", help="prompt text(s)")
    sample_parser.add_argument("--prompts", default="shapes:eval",
                               help="prompt file or set (as eval's), used without --prompt")
    sample_parser.add_argument("--output", default="outputs/samples", help="output directory")
    sample_parser.add_argument("--video-format", choices=["webp", "gif", "mp4"], default="webp",
                               help="file format of video samples (default webp; mp4 needs tempflow[video])")
    commands.add_parser("pretrain-shapes", help="pretrain the ShapesWorld pipeline (see --help)", add_help=False)
    commands.add_parser("serve-reward", help="serve a registered reward over HTTP (see --help)", add_help=False)
    commands.add_parser("check-recipe", help="compare a recipe with the official run it reproduces (see --help)",
                        add_help=False)
    commands.add_parser("plan", help="memory per GPU of a recipe under each layout (see --help)", add_help=False)
    commands.add_parser("report", help="an HTML page of a run's curves, samples and guards (see --help)",
                        add_help=False)
    commands.add_parser("prompts", help="list or download the official prompt sets (see --help)", add_help=False)

    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["pretrain-shapes"]:
        from .shapes.pretrain import main as pretrain_main

        return pretrain_main(argv[1:]) or 0
    if argv[:1] == ["serve-reward"]:
        from .rewards.server import main as serve_reward

        return serve_reward(argv[1:]) or 0
    if argv[:1] == ["check-recipe"]:
        from .recipe_check import main as check_recipe

        return check_recipe(argv[1:])
    if argv[:1] == ["plan"]:
        from .memory_plan import main as plan_memory

        return plan_memory(argv[1:])
    if argv[:1] == ["report"]:
        from .report import main as report

        return report(argv[1:])
    if argv[:1] == ["prompts"]:
        from .prompt_sets import main as prompt_sets

        return prompt_sets(argv[1:])
    if argv[:1] == ["train"] and {"-h", "--help"} & set(argv):
        from .config_help import SYNTAX, FieldHelpFormatter, add_config_groups

        train_parser.formatter_class = FieldHelpFormatter
        train_parser.usage = "%(prog)s [-h] [recipe] [--field value ...]"
        train_parser.description += " " + SYNTAX
        add_config_groups(train_parser)  # for the help only: parse_config parses the fields
        train_parser.print_help()
        return 0
    args, overrides = parser.parse_known_args(argv)
    if args.command != "train" and overrides:
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    try:
        if args.command == "train":
            summary = train(args.recipe, overrides)
            if summary["interrupted_by"]:
                return EXIT_INTERRUPTED + int(getattr(signal, summary["interrupted_by"]))
            if summary["stopped_by_guard"]:
                event = summary["stopped_by_guard"]
                print(f"tempflow: training stopped by guard {event['guard']} at iteration {event['iteration']}: "
                      f"{event['message']}; checkpoint saved (tempflow report OUTPUT_DIR shows the curves)",
                      file=sys.stderr)
                return EXIT_TRAINING_FAILED
        elif args.command == "eval":
            evaluate(args)
        elif args.command == "sample":
            sample(args)
    except (ValueError, FileNotFoundError, RewardError) as err:  # a reward's error may quote credentials
        print(f"tempflow: error: {redact_text(str(err))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NonFiniteTrainingError as err:
        print(f"tempflow: training stopped: {redact_text(str(err))}", file=sys.stderr)
        return EXIT_TRAINING_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
