"""`TempFlowGRPOTrainer`: rollout → reward → advantage → loss → step, on top of accelerate.

One training iteration: sample prompts, roll out (branched for TempFlow-GRPO, full SDE trajectories for
Flow-GRPO, ODE samples of the old policy for DiffusionNFT), decode and score the samples, turn rewards into
group-relative advantages, then take optimizer steps on the clipped GRPO loss over the rollout's transitions (on
DiffusionNFT's loss over its re-noised samples). Each stage is a method a subclass can override.
Everything random derives from ``(seed, iteration, rank, ...)``, so a run resumed from a checkpoint continues
exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

from .config import TempFlowGRPOConfig
from .errors import NonFiniteTrainingError
from .guards import GuardEvent, Guards, GuardWarning, group_diversity
from .plots import plot_reward_curve
from .policies import FlowPolicy
from .progress import count, loading_bars, say, stage
from .rollout import RolloutEngine
from .run_directory import append_jsonl_record, check_output_dir
from .scoring import StreamingScorer
from .trainer_checkpoints import CheckpointMixin
from .trainer_evaluate import EvaluateMixin
from .trainer_nft import DiffusionNFTMixin
from .trainer_optimize import OptimizeMixin
from .trainer_rollout import RolloutMixin
from .trainer_setup import SetupMixin, enable_fsdp_on_cpu, record_deepspeed_ranks_on_cpu

__all__ = ["NonFiniteTrainingError", "TempFlowGRPOTrainer"]  # the error, also importable from here


@contextlib.contextmanager
def _loading(what: str, config: TempFlowGRPOConfig, announce: bool):
    """Say that ``what`` loads and how long it took (when it is loaded here, not handed in), with the
    libraries' loading bars off under ``disable_progress_bar``."""
    saying = stage(f"loading {what}") if announce else contextlib.nullcontext()
    with loading_bars(not config.disable_progress_bar), saying:
        yield


class TempFlowGRPOTrainer(SetupMixin, RolloutMixin, OptimizeMixin, DiffusionNFTMixin, EvaluateMixin, CheckpointMixin):
    """Fine-tune a flow-matching text-to-image model with TempFlow-GRPO, Flow-GRPO or DiffusionNFT.

    The stages live in one module each: building (:mod:`~tempflow.trainer_setup`), rollout and advantages
    (:mod:`~tempflow.trainer_rollout`), loss and optimizer steps (:mod:`~tempflow.trainer_optimize`), DiffusionNFT
    (:mod:`~tempflow.trainer_nft`), evaluation (:mod:`~tempflow.trainer_evaluate`), weights and checkpoints (:mod:`~tempflow.trainer_checkpoints`); this
    module holds the loop.

    Args:
        config: the run's settings.
        policy: a loaded :class:`~tempflow.policies.FlowPolicy`; default: loaded from ``config.model_name_or_path``.
        reward_funcs: reward callables by name; default: resolved from ``config.reward_funcs``.
        train_prompts / eval_prompts: prompt records (``{"prompt": ..., **metadata}``); default: loaded from
            ``config.train_prompts`` / ``config.eval_prompts``.
    """

    def __init__(
        self,
        config: TempFlowGRPOConfig,
        policy: FlowPolicy | None = None,
        reward_funcs: dict | None = None,
        train_prompts: list[dict] | None = None,
        eval_prompts: list[dict] | None = None,
        accelerator: Accelerator | None = None,
    ):
        self.config = config
        check_output_dir(config.output_dir, config.overwrite_output_dir, resuming=bool(config.resume_from_checkpoint))
        self._load_inputs(train_prompts, eval_prompts, reward_funcs)
        if accelerator is None:
            record_deepspeed_ranks_on_cpu()
            enable_fsdp_on_cpu()
        self.accelerator = accelerator or Accelerator(
            mixed_precision=config.mixed_precision,
            log_with=None if config.report_to == "none" else config.report_to,
            project_dir=config.output_dir,
        )
        set_seed(config.seed)
        self._warn_on_process_count()
        self._load_policy(policy)
        self.trainable = self._setup_trainable()
        say(self._trained_weights_line())
        self.deepspeed_zero_stage = None
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            self._configure_deepspeed()
        self.sharded = self.accelerator.distributed_type == DistributedType.FSDP
        if self.sharded:
            self._configure_fsdp()
        if config.compile_transformer:
            self._compile_transformer()
        self._prepare_optimization()
        self.engine = RolloutEngine(self.policy, config.noise_level, config.sde_type, config.rollout_batch_size)
        self.step = self.engine.step  # the loss rescores rows with the very step the rollout drew them with
        self.sigmas = self.policy.sigma_schedule(config.num_inference_steps)
        self.step_weights = self._step_weights()
        self.history: list[dict] = []
        self.evaluations: list[dict] = []
        self.iteration = 0
        self.skipped_steps = 0
        self.consecutive_skipped_steps = 0
        self.optimizer_steps = 0
        self._stop_signal: int | None = None
        self.guards = Guards(config.guard_gold_drop if config.gold_reward_funcs else None,
                             config.guard_diversity_fraction, config.guard_action)
        self._guard_stop: GuardEvent | None = None
        self._kl_probe = None  # a few rows of the last rollout, for the KL-to-reference monitor at evaluation
        self._start_run_directory()

    def _load_inputs(self, train_prompts: list[dict] | None, eval_prompts: list[dict] | None,
                     reward_funcs: dict | None) -> None:
        """The prompts and the rewards, saying how many prompts there are and which rewards load."""
        config = self.config
        self._load_prompts(train_prompts, eval_prompts)
        say(f"prompts: {len(self.train_prompts)} to train on, {len(self.eval_prompts)} held out")
        rewards = dict.fromkeys(config.reward_funcs + config.eval_reward_funcs + config.gold_reward_funcs)
        with _loading(f"rewards {', '.join(rewards)}", config, announce=reward_funcs is None):
            self._build_rewards(reward_funcs)

    def _load_policy(self, policy: FlowPolicy | None) -> None:
        with _loading(f"the model {self.config.model_name_or_path}", self.config, announce=policy is None):
            self._build_policy(policy)

    def _trained_weights_line(self) -> str:
        trained = sum(p.numel() for p in self.trainable)
        total = sum(p.numel() for p in self.policy.transformer.parameters())
        how = f"LoRA r{self.config.lora_r}" if self.config.use_lora else "full fine-tuning"
        return (f"{self.policy.family} transformer of {count(total)} weights on {self.accelerator.device}; "
                f"{count(trained)} trained ({how})")

    def training_step(self) -> dict:
        """One iteration: rollout, decode and score, advantages, optimizer steps. Returns its metrics."""
        start = time.perf_counter()
        prompts = self.iteration_prompts = self._sample_prompts()
        self.policy.transformer.eval()
        scorer = StreamingScorer(self.policy, self.reward, prompts, self.policy.decode_batch_size)
        with self.accelerator.autocast():  # the same precision as the log-prob recomputation, or ratio ≠ 1
            rollout = self.rollout(prompts, on_finished=scorer.add)
        rewards, components = scorer.results(len(rollout.final_latents))
        diversity = math.nan if scorer.thumbnails is None else group_diversity(scorer.thumbnails, rollout.sample_group)
        self.compute_advantages(rollout, rewards)
        self._keep_kl_probe(rollout)
        rollout_time = time.perf_counter() - start
        self.policy.transformer.train()
        metrics = self.optimize(rollout)
        gathered = self.accelerator.gather(rewards.to(self.accelerator.device)).cpu()
        valid = gathered[torch.isfinite(gathered)]
        metrics.update({
            "iteration": self.iteration,
            "reward/mean": float(valid.mean()) if len(valid) else math.nan,
            "reward/std": float(valid.std(unbiased=False)) if len(valid) else math.nan,
            "reward/count": int(len(gathered)),
            "reward/skipped": int(len(gathered) - len(valid)),
            "advantage/abs_mean": float(rollout.transitions.advantages.abs().mean()),
            "rollout/model_evals": rollout.num_model_evals,
            "rollout/distinct_prompts": self._distinct_prompts(),
            "rollout/seconds": rollout_time,
            "iteration/seconds": time.perf_counter() - start,
            "images_per_second": len(rollout.final_latents) / rollout_time,
            "monitor/diversity": self._global_mean(torch.tensor([diversity])),
        })
        for name, values in components.items():
            metrics[f"reward/{name}"] = self._global_mean(values)
        metrics.update(self._group_diagnostics(rollout, rewards))
        return metrics

    # --- the loop -----------------------------------------------------------------------------------------
    def train(self) -> dict:
        """Run until ``max_steps`` iterations, evaluating, logging and checkpointing on the way. Returns the
        final metrics (also written to ``metrics.json``). SIGTERM or SIGINT ends the run after the current
        iteration with a checkpoint (the summary then has ``interrupted_by`` set)."""
        config = self.config
        self._maybe_resume()
        if self.iteration:
            say(f"resumed at iteration {self.iteration} of {config.max_steps}")
        if self.iteration == 0 and self.eval_prompts:
            say(f"evaluating the untrained model: encoding {len(self.eval_prompts)} held-out prompts, then "
                f"sampling them with {config.eval_num_inference_steps} ODE steps")
            self._record_evaluation(self.evaluate("before"))
        remaining = config.max_steps - self.iteration
        say(f"training {config.algorithm} for {remaining} iteration{'s' * (remaining != 1)} of "
            f"{config.prompts_per_iteration} prompts per process")
        bar = tqdm(range(self.iteration, config.max_steps), initial=self.iteration, total=config.max_steps,
                   desc="training", disable=not self.show_progress)
        with self._checkpoint_on_signals():
            for _ in bar:
                metrics = self.training_step()
                self.history.append(metrics)
                self.iteration += 1
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics.get('train/approx_kl', math.nan):.2e}")
                self._guard(self.guards.check_iteration(self.iteration, metrics["monitor/diversity"]), metrics)
                if self.iteration % config.logging_steps == 0:
                    self._log(metrics)
                    if not self.show_progress:  # the bar's line, for logs
                        say(f"iteration {self.iteration}/{config.max_steps}: reward "
                            f"{metrics['reward/mean']:.3f}, {metrics['iteration/seconds']:.1f} s")
                if self._stop_requested():
                    self.save_checkpoint()
                    return self._write_summary({}, interrupted_by=self._stop_signal)
                if config.eval_steps and self.iteration % config.eval_steps == 0 and self.iteration < config.max_steps:
                    self._record_evaluation(self.evaluate(f"iteration-{self.iteration}"))
                if self._guard_stop is not None:
                    self.save_checkpoint()
                    return self._write_summary({})
                if self.iteration % config.save_steps == 0 or self.iteration == config.max_steps:
                    self.save_checkpoint()
        final = self.evaluate("after") if self.eval_prompts else {}
        if final:
            self._record_evaluation(final)
        self.save_model(config.output_dir)
        return self._write_summary(final)

    def _guard(self, event: GuardEvent | None, metrics: dict) -> None:
        """Record a guard that fired (``guard/{name}`` in the metrics, a warning) and, with ``guard_action: stop``,
        end the run after this iteration. Every process sees the same global means, so all decide alike."""
        if event is None:
            return
        metrics[f"guard/{event.guard}"] = 1.0
        if self.accelerator.is_main_process:
            warnings.warn(f"guard {event.guard} (iteration {event.iteration}): {event.message}", GuardWarning,
                          stacklevel=2)
        if event.action == "stop" and self._guard_stop is None:
            self._guard_stop = event

    @contextlib.contextmanager
    def _checkpoint_on_signals(self):
        """Turn the first SIGTERM/SIGINT into a request to checkpoint and stop; a second one acts as usual."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

        def request_stop(signum, frame):
            self._stop_signal = signum
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        for sig in previous:
            signal.signal(sig, request_stop)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _stop_requested(self) -> bool:
        """Whether any process got a stop signal (all processes must stop at the same iteration)."""
        flag = torch.tensor([0 if self._stop_signal is None else self._stop_signal], device=self.accelerator.device)
        flag = self.accelerator.reduce(flag, reduction="sum") if self.accelerator.num_processes > 1 else flag
        if flag.item() and self._stop_signal is None:
            self._stop_signal = int(signal.SIGTERM)
        return bool(flag.item())

    @property
    def show_progress(self) -> bool:
        return not self.config.disable_progress_bar and self.accelerator.is_local_main_process

    def _log(self, metrics: dict) -> None:
        if self.config.report_to != "none":
            self.accelerator.log({k: v for k, v in metrics.items() if k != "iteration"}, step=metrics["iteration"])
        if self.accelerator.is_main_process:
            append_jsonl_record(Path(self.config.output_dir) / "metrics.jsonl", metrics)

    def _write_summary(self, final: dict, interrupted_by: int | None = None) -> dict:
        summary = {
            "iterations": self.iteration,
            "interrupted_by": None if interrupted_by is None else signal.Signals(interrupted_by).name,
            "skipped_steps": self.skipped_steps,
            "attention_auto": None if self.attention_decision is None else asdict(self.attention_decision),
            "evaluations": self.evaluations,
            "final": final,
            "guards": self.guards.events,
            "stopped_by_guard": None if self._guard_stop is None else asdict(self._guard_stop),
            "history": self.history,
        }
        if self.accelerator.is_main_process:
            output = Path(self.config.output_dir)
            (output / "metrics.json").write_text(json.dumps(summary, indent=2))
            if self.history:
                plot_reward_curve(self.history, output / "reward_curve.png", self.evaluations,
                                  task_reward=self._headline_eval_reward())
        self.accelerator.wait_for_everyone()  # no process leaves while the main one writes
        self.accelerator.end_training()
        return summary
