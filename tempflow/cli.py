"""The `tempflow` command line: thin wrappers that parse a config, build the parts and run them.

    tempflow train RECIPE.yaml [--key value ...]
    accelerate launch -m tempflow.cli train RECIPE.yaml [--key value ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


def _parse_config(recipe: str | None, overrides: list[str]):
    from trl import TrlParser

    from .config import TempFlowGRPOConfig

    if recipe and not Path(recipe).is_file():
        raise FileNotFoundError(f"recipe {recipe!r} does not exist")
    args = (["--config", recipe] if recipe else []) + overrides
    (config,) = TrlParser((TempFlowGRPOConfig,)).parse_args_and_config(args)
    return config


def train(recipe: str | None, overrides: list[str]) -> dict:
    from .trainer import TempFlowGRPOTrainer

    config = _parse_config(recipe, overrides)
    summary = TempFlowGRPOTrainer(config).train()
    final = summary.get("final", {})
    print(f"done: {summary['iterations']} iterations; outputs in {config.output_dir}")
    for key, value in final.items():
        if key != "iteration":
            print(f"  {key}: {value:.4f}")
    return summary


def _config_help() -> str:
    from trl import TrlParser

    from .config import TempFlowGRPOConfig

    return TrlParser((TempFlowGRPOConfig,)).format_help().split("options:", 1)[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tempflow", description="RL fine-tuning of flow-matching text-to-image models.")
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser(
        "train",
        help="fine-tune a model with TempFlow-GRPO or Flow-GRPO",
        description="Fine-tune with a YAML recipe; any config field can be overridden as --field value.",
        epilog="example: tempflow train recipes/shapes.yaml --max_steps 20 --output_dir outputs/demo\n\n"
        "config fields:" + "{config_help}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train_parser.add_argument("recipe", nargs="?", help="YAML recipe (fields of TempFlowGRPOConfig)")
    args, overrides = parser.parse_known_args(argv)
    from .rewards.combined import RewardError

    if args.command == "train" and {"-h", "--help"} & set(overrides):
        train_parser.epilog = train_parser.epilog.format(config_help=_config_help())
        train_parser.print_help()
        return 0
    try:
        if args.command == "train":
            train(args.recipe, overrides)
    except (ValueError, FileNotFoundError, RewardError) as err:
        print(f"tempflow: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
