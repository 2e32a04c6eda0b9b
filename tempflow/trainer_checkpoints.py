"""Weights and checkpoints of a training run: LoRA or full-transformer export (gathered under ZeRO-3 and FSDP),
accelerate checkpoints written atomically with the trainer's state and a manifest, LoRA-only checkpoint hooks, the
EMA, old policy and RNG states as safetensors instead of accelerate's pickles (per process under FSDP), and exact
resume from a checkpoint verified first (DeepSpeed's partial-checkpoint options included)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from .run_directory import (
    CHECKPOINT_PREFIX,
    TEMPORARY_PREFIX,
    TRAINER_STATE,
    checkpoint_to_resume,
    print_notice,
    prune_checkpoints,
    write_manifest,
)
from .sharding import save_whole_model
from .state_files import load_rng_state, load_tensors, save_rng_state, save_tensors


class CheckpointMixin:
    """Saving and resuming, for :class:`~tempflow.trainer.TempFlowGRPOTrainer`."""

    def save_model(self, directory: str | Path) -> None:
        """Export the trained weights: LoRA in the diffusers format (``pipeline.load_lora_weights(directory)``),
        or the full transformer with ``save_pretrained``. Uses the EMA weights when EMA is on. Sharded weights
        (ZeRO-3, FSDP) are gathered whole: every process takes part, the main one writes."""
        self.accelerator.wait_for_everyone()
        model = self.accelerator.unwrap_model(self.model)
        whole = contextlib.nullcontext()
        if self.deepspeed_zero_stage == 3:
            import deepspeed

            whole = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
        with self._ema_weights(), whole:
            if self.config.use_lora:
                self.policy.save_lora(directory, model, write=self.accelerator.is_main_process)
            elif self.sharded:
                state = self.accelerator.get_state_dict(model)  # whole, on the main process's CPU
                if self.accelerator.is_main_process:
                    save_whole_model(model, state, Path(directory) / "transformer")
            elif self.accelerator.is_main_process:
                model.save_pretrained(Path(directory) / "transformer")
        self.accelerator.wait_for_everyone()

    def _save_lora_hook(self, models, weights, output_dir) -> None:
        for model in models:
            self.policy.save_lora(output_dir, self.accelerator.unwrap_model(model),
                                  write=self.accelerator.is_main_process)
        weights.clear()  # accelerate then writes no full copy of the (frozen) transformer

    def _load_lora_hook(self, models, input_dir) -> None:
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft import set_peft_model_state_dict

        state = self.policy.pipeline_class.lora_state_dict(input_dir)
        state = {k.removeprefix("transformer."): v for k, v in state.items() if k.startswith("transformer.")}
        while models:
            model = self.accelerator.unwrap_model(models.pop())
            result = set_peft_model_state_dict(model, convert_unet_state_dict_to_peft(state), adapter_name="default")
            if result.unexpected_keys:
                raise RuntimeError(f"checkpoint {input_dir} has LoRA keys this model lacks: {result.unexpected_keys[:5]}")
            self.policy.load_block_sparse_gates(input_dir, model)

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-{iteration}`` atomically: to a temporary directory, then renamed; keeps the newest
        ``save_total_limit``. A crash mid-write leaves only a temporary directory, which resume ignores."""
        output = Path(self.config.output_dir)
        final = output / f"{CHECKPOINT_PREFIX}{self.iteration}"
        temporary = output / f"{TEMPORARY_PREFIX}{CHECKPOINT_PREFIX}{self.iteration}"
        if self.accelerator.is_main_process and temporary.exists():
            shutil.rmtree(temporary)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(temporary), **self._deepspeed_checkpoint_kwargs(save=True))
        rank = self.accelerator.process_index
        save_rng_state(temporary, rank)
        if self.sharded or self.accelerator.is_main_process:  # sharded: every process its slices
            for name, (tensors, scalars) in self._trainer_states().items():
                save_tensors(temporary, name, rank if self.sharded else 0, tensors, scalars)
        self.accelerator.wait_for_everyone()  # every process has written its part before the rename
        if self.accelerator.is_main_process:
            state = {"iteration": self.iteration, "skipped_steps": self.skipped_steps,
                     "optimizer_steps": self.optimizer_steps,
                     "consecutive_skipped_steps": self.consecutive_skipped_steps, "history": self.history,
                     "evaluations": self.evaluations, "lr_scheduler": self.lr_scheduler.state_dict(),
                     "guards": self.guards.state()}
            (temporary / TRAINER_STATE).write_text(json.dumps(state))
            write_manifest(temporary)
            if final.exists():
                shutil.rmtree(final)
            os.replace(temporary, final)
            prune_checkpoints(output, self.config.save_total_limit)
        self.accelerator.wait_for_everyone()
        return final

    def _trainer_states(self) -> dict[str, tuple[list, dict]]:
        """What the trainer keeps beside the model (EMA, old policy), as (tensors, scalars), checkpointed without
        pickle (:mod:`tempflow.state_files`): under FSDP each process's slices, else the main process's copy."""
        states = {}
        if self.ema is not None:
            states["ema"] = (self.ema.shadow_params, {"optimization_step": self.ema.optimization_step})
        if self.old_policy is not None:
            states["old_policy"] = (self.old_policy.weights, {})
        return states

    def _deepspeed_checkpoint_kwargs(self, save: bool) -> dict:
        """A DeepSpeed checkpoint of a LoRA run leaves out the frozen base weights (the adapter is all that
        trains), so loading it must not expect them."""
        if self.deepspeed_zero_stage is None or not self.config.use_lora:
            return {}
        return {"exclude_frozen_parameters": True} if save else {"load_module_strict": False}

    def _maybe_resume(self) -> None:
        target = self.config.resume_from_checkpoint
        if not target:
            return
        chosen = [None, None]  # the checkpoint, or why there is none to resume
        if self.accelerator.is_main_process:  # checks every file (read once) and may set damaged ones aside
            try:
                path = checkpoint_to_resume(self.config.output_dir, target)
                chosen[0] = None if path is None else str(path)
            except (ValueError, FileNotFoundError) as err:
                chosen[1] = err
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(chosen)
        if chosen[1] is not None:
            raise chosen[1]
        if chosen[0] is None:
            if self.accelerator.is_main_process:
                print_notice(f"resume_from_checkpoint: latest found no checkpoint in {self.config.output_dir}; "
                             "starting a fresh run")
            return
        path = Path(chosen[0])
        self.accelerator.load_state(str(path), **self._deepspeed_checkpoint_kwargs(save=False))
        rank = self.accelerator.process_index
        load_rng_state(path, rank)
        for name, (tensors, _) in self._trainer_states().items():
            scalars = load_tensors(path, name, rank if self.sharded else 0, tensors)
            if name == "ema":
                self.ema.optimization_step = scalars["optimization_step"]
        state = json.loads((path / TRAINER_STATE).read_text())
        self.iteration = state["iteration"]
        self.skipped_steps = state["skipped_steps"]
        self.consecutive_skipped_steps = state["consecutive_skipped_steps"]
        self.history = state["history"]
        self.evaluations = state["evaluations"]
        self.guards.load(state.get("guards", {}))
        if "lr_scheduler" in state:  # absent from checkpoints written before schedules existed (constant LR)
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        # older checkpoints did not count optimizer steps; their scheduler did (one step per optimizer step)
        self.optimizer_steps = state.get("optimizer_steps", state.get("lr_scheduler", {}).get("last_epoch", 0))
