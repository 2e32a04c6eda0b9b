"""Evaluation during training: ODE samples of the held-out prompts (sharded over processes, with the EMA weights
when there is one), their scores overall and per task, sample grids (videos: strips of frames, and the first few
videos as animated WebP), the before/after grid that survives a resume, and the cross-process means that every
logged score uses."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .evaluation import sample_prompt_set, score_images, scores_by_task, worst_per_task
from .plots import save_before_after_grid, save_image_grid
from .prompts import task_labels
from .sampling import step_kl
from .video import frame_strips, is_video, save_video

VIDEOS_PER_EVALUATION = 4
KL_PROBE_ROWS = 16
BEFORE_IMAGES = "before.safetensors"  # in samples/: the first evaluation's images, for the before/after grid


class EvaluateMixin:
    """``evaluate(tag)`` and its helpers, for :class:`~tempflow.trainer.TempFlowGRPOTrainer`."""

    @contextlib.contextmanager
    def _ema_weights(self):
        if self.ema is None:
            yield
            return
        self.ema.store(self.trainable)
        self.ema.copy_to(self.trainable)
        try:
            yield
        finally:
            self.ema.restore(self.trainable)

    @torch.no_grad()
    def evaluate(self, tag: str) -> dict:
        """ODE samples (``eval_num_inference_steps``) of the held-out prompts, scored with the training and
        evaluation rewards; writes a captioned grid ``samples/{tag}.png``. Prompts are sharded over processes."""
        config = self.config
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        shard = self.eval_prompts[rank::world]
        self.policy.transformer.eval()
        progress = self.show_progress
        positions = list(range(rank, len(self.eval_prompts), world))  # of the shard's prompts in eval_prompts
        with self._ema_weights(), self.accelerator.autocast():
            images = sample_prompt_set(self.policy, self.engine, shard, positions, config.seed,
                                       config.eval_num_inference_steps, progress=progress)
        rewards, components = score_images(self.reward, images, shard, progress)
        if self.eval_reward is not None:
            components.update(score_images(self.eval_reward, images, shard)[1])
        results = {"iteration": self.iteration, "eval/reward": self._global_mean(rewards)}
        if self.gold_reward is not None:  # held out from training: what the guard against reward hacking watches
            gold, gold_components = score_images(self.gold_reward, images, shard)
            results["eval/gold"], results["eval/gold_se"] = self._global_mean_and_se(gold)
            results.update({f"eval/gold/{name}": self._global_mean(v) for name, v in gold_components.items()})
        results.update(self._kl_to_reference())
        results.update({f"eval/{name}": self._global_mean(values) for name, values in components.items()})
        results.update(self._scores_by_task(components, rank, world))
        if self.accelerator.is_main_process:
            samples_dir = Path(config.output_dir) / "samples"
            samples_dir.mkdir(parents=True, exist_ok=True)
            self._save_videos(images[:VIDEOS_PER_EVALUATION], samples_dir / tag)
            images = frame_strips(images)
            save_image_grid(images[:16], [r["prompt"] for r in shard[:16]], samples_dir / f"{tag}.png")
            self._log_images(images[:16])
            if tag == "before":
                picked = self._before_after_panel(shard, components)
                self._save_before_images(images[picked], [positions[i] for i in picked], samples_dir)
            elif tag == "after":
                self._save_before_after_grid(images, positions, samples_dir)
        return results

    def _keep_kl_probe(self, rollout) -> None:
        """Keep a few of the rollout's training rows (GRPO's transitions) for :meth:`_kl_to_reference`."""
        rows = rollout.transitions
        if self.config.algorithm == "diffusion_nft" or not (self.config.use_lora or self.policy._frozen_reference):
            return
        self._kl_probe = (rows.select(torch.arange(min(KL_PROBE_ROWS, len(rows)))), rollout.embeds)

    def _kl_to_reference(self) -> dict:
        """``monitor/kl_to_reference``: the mean per-step KL between the current policy's and the reference's step
        distributions on a few rows of the last rollout (the exact Gaussian KL of the loss's term, in its
        kl_normalization), measured whether or not the loss has a KL term; empty before the first rollout."""
        if self._kl_probe is None:
            return {}
        rows, embeds = self._kl_probe
        device = self.accelerator.device
        with self._ema_weights(), self.accelerator.autocast():
            current = self.rescore(rows, embeds, self.model)
            with self.policy.reference() as reference:
                reference_mean = self.rescore(rows, embeds, reference).mean
        kl_std = self.step.kl_std(current, rows.sigmas.to(device), rows.sigmas_next.to(device),
                                  self.config.kl_normalization)
        return {"monitor/kl_to_reference": self._global_mean(step_kl(current.mean, reference_mean, kl_std))}

    def _headline_eval_reward(self) -> str | None:
        """The evaluation reward that picks the before/after prompts and the reward curve's per-task panel: the last
        of ``eval_reward_funcs`` (e.g. ``shapes_strict``); ``None`` when only the training rewards are scored."""
        return self.config.eval_reward_funcs[-1] if self.config.eval_reward_funcs else None

    def _save_videos(self, videos: torch.Tensor, directory: Path) -> None:
        """The first evaluation videos as ``{directory}/{k}.webp`` (nothing for images)."""
        if not is_video(videos):
            return
        directory.mkdir(exist_ok=True)
        for k, video in enumerate(videos):
            save_video(video, directory / f"{k:02d}.webp", getattr(self.policy, "frame_rate", 16))

    def _before_after_panel(self, records: list[dict], components: dict[str, torch.Tensor]) -> list[int]:
        """The prompts the before/after grid shows: the untrained model's worst (by the last evaluation reward,
        e.g. ``shapes_strict``, else the first training reward) from each task in turn, so that every task appears
        and a gain can show (the first prompts of a file are often ones the base already gets right)."""
        name = self._headline_eval_reward() or next(iter(components))
        return worst_per_task(components[name], task_labels(records) or ["all"] * len(records), count=8)

    def _save_before_images(self, images: torch.Tensor, positions: list[int], samples_dir: Path) -> None:
        """Keep the first evaluation's images on disk, with the positions of their prompts, so that a resumed run
        (on any number of processes) still pairs them with the last evaluation's."""
        save_file({"images": (images * 255).round().to(torch.uint8).contiguous(), "positions": torch.tensor(positions)},
                  samples_dir / BEFORE_IMAGES)

    def _save_before_after_grid(self, images: torch.Tensor, positions: list[int], samples_dir: Path) -> None:
        if not (samples_dir / BEFORE_IMAGES).is_file():
            return
        before = load_file(samples_dir / BEFORE_IMAGES)
        index = {position: i for i, position in enumerate(positions)}
        pairs = [(j, index[p]) for j, p in enumerate(before["positions"].tolist()) if p in index]
        if pairs:
            before_rows, after_rows = zip(*pairs)
            captions = [self.eval_prompts[positions[i]]["prompt"] for i in after_rows]
            save_before_after_grid(before["images"][list(before_rows)].float() / 255, images[list(after_rows)],
                                   captions, samples_dir / "before_after.png")

    def _scores_by_task(self, components: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, float]:
        """``eval_task/{reward}/{task}``: each component's mean over all processes within each task of the
        held-out prompts (see :func:`~tempflow.evaluation.record_task`); empty when no prompt names a task."""
        labels = task_labels(self.eval_prompts)
        if labels is None:
            return {}
        scores = scores_by_task(components, labels[rank::world], list(dict.fromkeys(labels)), self._global_mean)
        return {f"eval_task/{name}/{task}": value for name, by_task in scores.items() for task, value in by_task.items()}

    def _log_images(self, images: torch.Tensor) -> None:
        """Send evaluation samples to the trackers that take images (TensorBoard as NHWC uint8, others as PIL)."""
        from .rewards import to_pil, to_uint8

        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"eval/samples": to_uint8(images)}, step=self.iteration, dataformats="NHWC")
            elif hasattr(tracker, "log_images"):
                tracker.log_images({"eval/samples": to_pil(images)}, step=self.iteration)

    def _global_mean(self, values: torch.Tensor) -> float:
        """Mean of the finite values over all processes; NaN when there is none (every process must call)."""
        values = values.to(self.accelerator.device)
        finite = torch.isfinite(values)
        totals = torch.stack([torch.where(finite, values, torch.zeros_like(values)).sum(), finite.sum().float()])
        totals = self.accelerator.reduce(totals, reduction="sum")
        return float(totals[0] / totals[1]) if totals[1] > 0 else math.nan

    def _global_mean_and_se(self, values: torch.Tensor) -> tuple[float, float]:
        """Mean of the finite values over all processes and its standard error (every process must call)."""
        values = values.to(self.accelerator.device).float()
        finite = torch.isfinite(values)
        kept = torch.where(finite, values, torch.zeros_like(values))
        totals = self.accelerator.reduce(torch.stack([kept.sum(), (kept**2).sum(), finite.sum().float()]),
                                         reduction="sum")
        total, squares, count = (float(t) for t in totals)
        if count == 0:
            return math.nan, math.nan
        mean = total / count
        variance = max(squares / count - mean**2, 0.0) * count / max(count - 1, 1)
        return mean, math.sqrt(variance / count)

    def _record_evaluation(self, results: dict) -> None:
        self._guard(self.guards.check_evaluation(results["iteration"], results.get("eval/gold"),
                                                 results.get("eval/reward"), results.get("eval/gold_se")), results)
        self.evaluations.append(results)
        self._log(results)
