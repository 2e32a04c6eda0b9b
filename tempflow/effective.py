"""What a config trains, in terms that compare across codebases: counts over all processes per iteration (one
official epoch), optimizer steps per iteration, the KL coefficient with the convention it is meant in, the
noise-aware weights' scale, the EMA schedule, the rewards with the arguments that set what their numbers mean, the
prompt sets, and the LoRA target modules resolved on the model's real module names (built from its config on the
meta device: no weights). ``tempflow check-recipe`` compares these with an official configuration
(:mod:`tempflow.recipe_check`). Nothing here loads a reward or a prompt set: rewards and sets are compared by name
and arguments.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .config import TempFlowGRPOConfig
from .model_configs import ModelConfigs
from .rewards.pickscore import PICKSCORE_NORMALIZER

EFFECTIVE_KEYS: dict[str, str] = {
    "algorithm": "tempflow_grpo (branched rollouts), flow_grpo (full SDE trajectories) or diffusion_nft",
    "rollout_sampler": "diffusion_nft: the solver of its deterministic rollouts",
    "rollout_policy": "diffusion_nft: the weights that draw the rollouts (old: the soft-updated copy)",
    "model": "the pipeline trained",
    "resolution": "image height in pixels",
    "num_inference_steps": "steps of a training rollout",
    "eval_num_inference_steps": "ODE steps of evaluation",
    "guidance_scale": "CFG scale (FLUX: guidance embedding)",
    "negative_prompt": "CFG's negative prompt (None: no CFG)",
    "max_sequence_length": "T5 / text-encoder tokens per prompt",
    "noise_level": "SDE noise level a",
    "sde_type": "stochastic step (sde or cps)",
    "group_size": "images per prompt group (flow_grpo) / SDE children per branch point (tempflow_grpo)",
    "seeds_per_prompt": "tempflow_grpo: ODE paths per prompt, over all processes",
    "trained_steps": "step indices that become training rows",
    "child_num_inference_steps": "ODE steps a child finishes with (None: the main path's grid)",
    "prompts_per_iteration": "prompts per iteration, over all processes",
    "trajectories_per_iteration": "ODE paths (tempflow_grpo) or SDE trajectories (flow_grpo) per iteration, all processes",
    "rows_per_iteration": "training rows (stochastic steps) per iteration, all processes",
    "optimizer_steps_per_iteration": "optimizer steps per iteration",
    "num_iterations": "passes over each rollout",
    "advantage_group": "which samples an advantage is normalised among (seed or prompt)",
    "reward_std": "the std advantages are divided by: group, batch (over all processes) or none",
    "adv_clip_max": "advantage clamp",
    "epsilon": "ratio clip range",
    "loss_mean_over": "which rows the loss mean counts",
    "cfg_uncond_gradient": "gradient through CFG's unconditional branch (None: no CFG)",
    "noise_aware_weighting": "step losses weighted by the step's noise std",
    "noise_aware_weight_scale": "c in w_i = c * std_i (tempflow: 1 / mean of the trained steps' std)",
    "beta": "KL coefficient, in the kl_normalization it is meant in",
    "kl_normalization": "what the KL term divides by (None: no KL term)",
    "learning_rate": "AdamW learning rate",
    "lr_scheduler_type": "learning-rate schedule",
    "warmup_steps": "warmup optimizer steps",
    "adam_beta1": "AdamW beta1",
    "adam_beta2": "AdamW beta2",
    "weight_decay": "AdamW weight decay",
    "adam_epsilon": "AdamW epsilon",
    "max_grad_norm": "gradient clipping norm",
    "use_lora": "LoRA (else full fine-tuning)",
    "lora_dtype": "dtype of the trained LoRA weights (and so of their gradients and AdamW state)",
    "lora_r": "LoRA rank",
    "lora_alpha": "LoRA alpha",
    "lora_init": "LoRA initialisation",
    "lora_modules": "the transformer's modules LoRA adapts (resolved on the model's module names)",
    "use_ema": "an EMA of the trained weights for evaluation and export",
    "ema_decay": "EMA decay per update",
    "ema_update_interval": "optimizer steps between EMA updates",
    "ema_updates_per_interval": "times each EMA update is applied (official loops: once per training batch)",
    "mixed_precision": "autocast / frozen-weight precision",
    "rewards": "training rewards, each with its weight and the arguments that set what its number means: PickScore's "
               "`scale` (1: raw, 1/26: normalize); GenEval's credit (`geneval` partial, `geneval_strict` 0/1), "
               "`jpeg_quality` (the JPEG re-encoding before scoring; None: scored as decoded) and `detector_bgr` "
               "(red and blue swapped for the detector, as the official server's mmdetection call reads them)",
    "train_prompts": "the training prompt set (a registered name such as pickscore:train, or a file)",
    "eval_prompts": "the evaluation prompt set (`N of SET` when num_eval_prompts takes a subset; None: no evaluation)",
    "nft_beta": "diffusion_nft: beta of the implicit positive / negative policies",
    "old_policy_decay": "diffusion_nft: [flat_steps, rate, max] of the old policy's soft update per iteration",
}
"""Every hyperparameter ``tempflow check-recipe`` compares, with what it means: the names a recipe's ``deviations``
may use."""

FAMILIES_WITH_CFG = ("sd3", "qwen_image", "wan")

REWARD_CONVENTION_DEFAULTS: dict[str, dict[str, Any]] = {
    "pickscore": {"normalize": False},
    "geneval": {"jpeg_quality": None, "detector_bgr": False},
    "geneval_strict": {"jpeg_quality": None, "detector_bgr": False},
}
"""The constructor arguments that change what a reward's number means, with the rewards' defaults (a test holds them
to the reward classes' signatures): the only reward arguments ``tempflow check-recipe`` compares."""


def effective_hyperparameters(config: TempFlowGRPOConfig, num_processes: int, model: ModelConfigs) -> dict[str, Any]:
    """:data:`EFFECTIVE_KEYS` of ``config`` run on ``num_processes`` processes with ``model``'s configs. Values that
    do not apply (the KL convention without a KL term, EMA settings without EMA, ...) are None."""
    from .policies import POLICY_CLASSES

    policy_class = POLICY_CLASSES[model.family]
    branched = config.branched
    nft = config.algorithm == "diffusion_nft"
    trained = _trained_steps(config)
    cfg = model.family in FAMILIES_WITH_CFG and config.guidance_scale > 1
    n = num_processes
    trajectories = n * config.prompts_per_iteration * (config.seeds_per_prompt if branched else config.num_generations)
    values = {
        "algorithm": "diffusion_nft" if nft else "tempflow_grpo" if branched else "flow_grpo",
        "rollout_sampler": "euler" if nft else None,
        "rollout_policy": "old" if nft else None,
        "model": config.model_name_or_path,
        "resolution": config.resolution,
        "num_inference_steps": config.num_inference_steps,
        "eval_num_inference_steps": config.eval_num_inference_steps,
        "guidance_scale": config.guidance_scale,
        "negative_prompt": (config.negative_prompt if config.negative_prompt is not None
                            else policy_class.default_negative_prompt) if cfg else None,
        "max_sequence_length": config.max_sequence_length or policy_class.default_max_sequence_length,
        "noise_level": None if nft else config.noise_level,
        "sde_type": None if nft else config.sde_type,
        "group_size": config.num_generations,
        "seeds_per_prompt": config.seeds_per_prompt if branched else None,
        "trained_steps": trained,
        "child_num_inference_steps": config.child_num_inference_steps if branched else None,
        "prompts_per_iteration": n * config.prompts_per_iteration,
        "trajectories_per_iteration": trajectories,
        "rows_per_iteration": n * config.rows_per_iteration,
        "optimizer_steps_per_iteration": config.optimizer_steps_per_iteration,
        "num_iterations": config.num_iterations,
        "advantage_group": config.advantage_group if branched else "prompt",
        "reward_std": config.scale_rewards,
        "adv_clip_max": config.adv_clip_max,
        "epsilon": None if nft else config.epsilon,
        "loss_mean_over": config.loss_mean_over,
        "cfg_uncond_gradient": config.cfg_uncond_gradient if cfg else None,
        "noise_aware_weighting": config.weighted,
        "noise_aware_weight_scale": None,
        "beta": config.beta,
        "kl_normalization": config.kl_normalization if config.beta > 0 and not nft else None,
        "learning_rate": config.learning_rate,
        "lr_scheduler_type": config.lr_scheduler_type,
        "warmup_steps": config.num_warmup_steps,
        "adam_beta1": config.adam_beta1,
        "adam_beta2": config.adam_beta2,
        "weight_decay": config.weight_decay,
        "adam_epsilon": config.adam_epsilon,
        "max_grad_norm": config.max_grad_norm,
        "use_lora": config.use_lora,
        "lora_r": config.lora_r if config.use_lora else None,
        "lora_alpha": config.lora_alpha if config.use_lora else None,
        "lora_init": config.lora_init if config.use_lora else None,
        "lora_dtype": config.lora_dtype if config.use_lora else None,
        "lora_modules": None,
        "use_ema": config.use_ema,
        "ema_decay": config.ema_decay if config.use_ema else None,
        "ema_update_interval": config.ema_update_interval if config.use_ema else None,
        "ema_updates_per_interval": 1 if config.use_ema else None,  # tempflow applies each EMA update once
        "mixed_precision": config.mixed_precision,
        "rewards": reward_specs(config),
        "train_prompts": _prompt_set(config.train_prompts, config.prompt_tasks),
        "eval_prompts": _eval_prompt_set(config),
        "nft_beta": config.nft_beta if nft else None,
        "old_policy_decay": list(config.old_policy_decay) if nft else None,
    }
    if config.weighted and isinstance(trained, list):
        stds = trained_step_stds(config, model)
        values["noise_aware_weight_scale"] = None if stds is None else float(1 / stds.mean())
    if config.use_lora:
        values["lora_modules"] = list(config.lora_target_modules or policy_class.default_lora_target_modules)
    return values


def reward_specs(config: TempFlowGRPOConfig) -> list[dict[str, Any]]:
    """The training rewards as ``{"name", <convention>, "weight"}``, sorted by name: PickScore's ``scale`` ("1" raw,
    "1/26" normalized) and GenEval's ``jpeg_quality`` and ``detector_bgr``, read from ``reward_kwargs`` with the
    rewards' defaults."""
    weights = config.reward_weights or [1.0] * len(config.reward_funcs)
    specs = []
    for name, weight in zip(config.reward_funcs, weights):
        arguments = {**REWARD_CONVENTION_DEFAULTS.get(name, {}), **config.reward_kwargs.get(name, {})}
        spec: dict[str, Any] = {"name": name}
        if name == "pickscore":
            spec["scale"] = f"1/{PICKSCORE_NORMALIZER:g}" if arguments["normalize"] else "1"
        elif name in REWARD_CONVENTION_DEFAULTS:
            spec.update({key: arguments[key] for key in REWARD_CONVENTION_DEFAULTS[name]})
        specs.append({**spec, "weight": float(weight)})
    return sorted(specs, key=lambda spec: spec["name"])


def _prompt_set(source: str | None, tasks: list[str] | None) -> str | None:
    if source in (None, "", "none"):
        return None
    return source if not tasks else f"{source} (tasks {', '.join(tasks)})"


def _eval_prompt_set(config: TempFlowGRPOConfig) -> str | None:
    prompt_set = _prompt_set(config.eval_prompts, config.prompt_tasks)
    if prompt_set is None or config.num_eval_prompts is None:
        return prompt_set
    return f"{config.num_eval_prompts} of {prompt_set}"


def _trained_steps(config: TempFlowGRPOConfig) -> list[int] | str:
    if config.algorithm == "diffusion_nft":
        return f"{config.trained_timesteps} of the {config.num_inference_steps} sampling timesteps, drawn per sample"
    if config.branched:
        pool = sorted(config.branch_steps or range(config.num_inference_steps - 1))
        k = config.num_branch_steps_per_iteration
        return pool if k is None or k == len(pool) else f"{k} drawn per iteration from {pool}"
    if config.sde_window_size:
        first, last = config.sde_window_range or (0, config.num_inference_steps - 1 - config.sde_window_size)
        return f"a window of {config.sde_window_size} starting in [{first}, {last}]"
    return list(range(config.num_inference_steps - 1))


def sigma_schedule(config: TempFlowGRPOConfig, model: ModelConfigs) -> torch.Tensor | None:
    """The σ grid of a training rollout, as the family's policy computes it, from ``model``'s scheduler config (None
    for video families, whose token count this does not model)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .policies import POLICY_CLASSES
    from .policies.base import flow_sigma_schedule

    if model.family == "wan":
        return None
    width = config.width or config.resolution
    image_tokens = (config.resolution // 16) * (width // 16)  # an 8x VAE and 2x2 patches (SD3) or packing (FLUX, Qwen)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler)
    steps = config.num_inference_steps
    return flow_sigma_schedule(scheduler, steps, POLICY_CLASSES[model.family].base_sigmas(steps), image_tokens)


def _trained_sigmas(config: TempFlowGRPOConfig, model: ModelConfigs) -> tuple[torch.Tensor, torch.Tensor] | None:
    """σ_i and σ_{i+1} of each trained step (None unless the trained steps are fixed and the σ grid is known)."""
    sigmas = sigma_schedule(config, model)
    trained = _trained_steps(config)
    if sigmas is None or not isinstance(trained, list):
        return None
    index = torch.tensor(trained)
    return sigmas[index], sigmas[index + 1]


def trained_step_stds(config: TempFlowGRPOConfig, model: ModelConfigs) -> torch.Tensor | None:
    """The SDE noise std ``s_i·sqrt(−Δ_i)`` of each trained step."""
    from .sampling import sde_step_std

    pairs = _trained_sigmas(config, model)
    return None if pairs is None else sde_step_std(*pairs, config.noise_level)


def trained_step_dts(config: TempFlowGRPOConfig, model: ModelConfigs) -> torch.Tensor | None:
    """``−Δ_i = σ_i − σ_{i+1}`` of each trained step: what converts a KL coefficient between conventions."""
    pairs = _trained_sigmas(config, model)
    return None if pairs is None else pairs[0] - pairs[1]


def resolve_lora_modules(model: ModelConfigs, targets: list[str]) -> list[str]:
    """The names of the modules peft adapts for ``targets`` (its own matching: exact name or ``.``-suffix) in
    ``model``'s transformer, built from its config on the meta device."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    lora = LoraConfig(target_modules=list(targets))
    return [name for name in _linear_module_names(model) if check_target_module_exists(lora, name)]


@functools.lru_cache(maxsize=8)
def _linear_names_cached(transformer_class: str, config_items: tuple) -> tuple[str, ...]:
    import diffusers
    from accelerate import init_empty_weights

    with init_empty_weights():
        transformer = getattr(diffusers, transformer_class).from_config(dict(config_items))
    return tuple(name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear))


def _linear_module_names(model: ModelConfigs) -> tuple[str, ...]:
    freeze = lambda value: tuple(value) if isinstance(value, list) else value  # noqa: E731
    return _linear_names_cached(model.transformer_class,
                                tuple(sorted((k, freeze(v)) for k, v in model.transformer.items())))
