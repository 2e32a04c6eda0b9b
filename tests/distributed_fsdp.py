"""Run by tests/test_distributed.py under `accelerate launch` with an FSDP2 config on 2 CPU processes: builds a trainer
(full fine-tuning with a KL reference and EMA, or DiffusionNFT with LoRA and its old policy) and writes, per rank, what
each of its weight sets holds on this process to `OUT/rank{N}.json`: whether it is a shard, its elements here and
whole."""

import json
import sys
from pathlib import Path

from torch.distributed.tensor import DTensor

from tempflow.config import parse_config
from tempflow.trainer import TempFlowGRPOTrainer


def held(tensors) -> dict:
    tensors = list(tensors)
    return {"sharded": all(isinstance(t, DTensor) for t in tensors),
            "local": sum((t.to_local() if isinstance(t, DTensor) else t).numel() for t in tensors),
            "whole": sum(t.numel() for t in tensors)}


def main(recipe: str, out: str, *overrides: str) -> None:
    trainer = TempFlowGRPOTrainer(parse_config(recipe, list(overrides)))
    facts = {"trainable": held(trainer.trainable), "model": held(trainer.model.parameters())}
    if trainer.ema is not None:
        facts["ema"] = held(trainer.ema.shadow_params)
    if trainer.old_policy is not None:
        facts["old_policy"] = held(trainer.old_policy.weights)
    if trainer.policy._frozen_reference is not None:
        facts["reference"] = held(trainer.policy._frozen_reference.parameters())
    Path(out, f"rank{trainer.accelerator.process_index}.json").write_text(json.dumps(facts))
    trainer.accelerator.state.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
