"""Image editing: prompt files of (source image, instruction) checked on load; FLUX.1 Kontext's policy equals
``FluxKontextPipeline`` and its LoRA loads there; training on edits starts on-policy and hands every reward the source
images; the reward server passes them through."""

import json

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline, QwenImageEditPipeline, QwenImageEditPlusPipeline
from PIL import Image

from tempflow.config import TempFlowGRPOConfig
from tempflow.editing import load_source_image
from tempflow.policies import (
    FluxKontextPolicy,
    QwenImageEditPlusPolicy,
    QwenImageEditPolicy,
    infer_family,
    load_policy,
)
from tempflow.prompts import load_prompts
from tempflow.sampling import ode_step
from tempflow.trainer import TempFlowGRPOTrainer

INSTRUCTIONS = ["make the square red", "add a blue circle"]


def _images(directory, count=2, size=64):
    paths = []
    for i in range(count):
        path = directory / f"source{i}.png"
        Image.fromarray((np.random.default_rng(i).random((size, size, 3)) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def _ode_sample(policy, noise, embeds, steps):
    sigmas, latents = policy.sigma_schedule(steps), noise
    with torch.no_grad():
        for i in range(steps):
            sigma, next_sigma = sigmas[i].expand(len(noise)), sigmas[i + 1].expand(len(noise))
            latents = ode_step(latents, policy.velocity(latents, sigma, embeds), sigma, next_sigma).next_latents
    return latents


def _first_inner_step_stats(trainer) -> dict:
    """The loss statistics of the first inner step on a fresh rollout: its ratio must be 1."""
    rollout = trainer.rollout(trainer._sample_prompts())
    trainer.compute_advantages(rollout, torch.randn(len(rollout.final_latents)))
    with torch.no_grad():
        _, stats = trainer.compute_loss(rollout.transitions, rollout.embeds)
    assert stats["ratio_min"].item() == pytest.approx(1.0, abs=1e-5)
    assert stats["ratio_max"].item() == pytest.approx(1.0, abs=1e-5)
    return stats


def _edit_file(directory, rows) -> str:
    path = directory / "edits.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_edit_records_resolve_their_images_and_a_bad_row_is_named(tmp_path):
    (tmp_path / "images").mkdir()
    _images(tmp_path / "images")
    source = _edit_file(tmp_path, [{"image": f"images/source{i}.png", "instruction": text, "task": "recolour"}
                                   for i, text in enumerate(INSTRUCTIONS)])
    records = load_prompts(source)
    assert [r["prompt"] for r in records] == INSTRUCTIONS
    assert records[0]["image"] == str((tmp_path / "images" / "source0.png").resolve()) and records[0]["task"] == "recolour"
    (tmp_path / "broken.png").write_text("not an image")
    for row, message in [({"image": "images/missing.png", "instruction": "x"}, "line 2: image 'images/missing.png' is "
                                                                              "missing or unreadable"),
                         ({"image": "broken.png", "instruction": "x"}, "line 2: image 'broken.png' is missing or "
                                                                        "unreadable"),
                         ({"image": "images/source0.png", "instruction": " "}, "line 2: `instruction` must be a "
                                                                               "non-empty string")]:
        bad = _edit_file(tmp_path, [{"image": "images/source1.png", "instruction": "ok"}, row])
        with pytest.raises(ValueError, match=message):
            load_prompts(bad)


def test_model_family_auto_recognises_the_editors(tiny_flux_kontext_dir, tiny_qwen_image_edit_dir):
    assert infer_family(tiny_flux_kontext_dir) == "flux_kontext"
    assert infer_family("black-forest-labs/FLUX.1-Kontext-dev") == "flux_kontext"
    assert infer_family(tiny_qwen_image_edit_dir) == "qwen_image_edit"
    assert infer_family("Qwen/Qwen-Image-Edit") == "qwen_image_edit"
    assert infer_family("Qwen/Qwen-Image-Edit-2509") == "qwen_image_edit_plus"


@pytest.mark.parametrize("guidance_scale", [1.0, 2.5])
def test_flux_kontext_ode_sampling_matches_pipeline(tiny_flux_kontext_dir, tmp_path, guidance_scale):
    policy = load_policy(tiny_flux_kontext_dir, resolution=64, guidance_scale=guidance_scale, max_sequence_length=16)
    assert isinstance(policy, FluxKontextPolicy)
    paths = [str(p) for p in _images(tmp_path)]
    noise = torch.cat([policy.initial_noise(torch.Generator().manual_seed(s)) for s in range(2)])
    embeds = policy.encode_prompts(INSTRUCTIONS, paths)
    latents = _ode_sample(policy, noise, embeds, 4)
    pipe = FluxKontextPipeline.from_pretrained(tiny_flux_kontext_dir)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(image=[Image.open(p).convert("RGB") for p in paths], prompt=INSTRUCTIONS, latents=noise,
                     num_inference_steps=4, guidance_scale=guidance_scale, height=64, width=64, output_type="latent",
                     max_sequence_length=16, _auto_resize=False, max_area=64 * 64).images
    torch.testing.assert_close(latents, reference, atol=1e-4, rtol=1e-4)
    # the source conditions the edit: another source image, another result
    other = policy.encode_prompts(INSTRUCTIONS, paths[::-1])
    sigma = policy.sigma_schedule(4)[0].expand(2)
    assert (policy.velocity(noise, sigma, other) - policy.velocity(noise, sigma, embeds)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="flux_kontext edits images: every prompt needs its source image"):
        policy.encode_prompts(INSTRUCTIONS)


def test_flux_kontext_lora_loads_into_the_stock_pipeline(tiny_flux_kontext_dir, tmp_path):
    policy = load_policy(tiny_flux_kontext_dir, resolution=64, guidance_scale=2.5, max_sequence_length=16)
    with torch.no_grad():
        for weight in policy.add_lora(r=4, alpha=8):
            weight.add_(0.05 * torch.randn_like(weight))
    policy.save_lora(tmp_path)
    source = Image.open(_images(tmp_path, count=1)[0]).convert("RGB")
    kwargs = dict(image=source, prompt=INSTRUCTIONS[0], num_inference_steps=2, height=64, width=64,
                  output_type="latent", max_sequence_length=16, _auto_resize=False, max_area=64 * 64)
    trained = policy.pipeline(generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe = FluxKontextPipeline.from_pretrained(tiny_flux_kontext_dir)
    pipe.set_progress_bar_config(disable=True)
    base = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(tmp_path)
    assert (trained - base).abs().max() > 1e-3
    torch.testing.assert_close(pipe(generator=torch.Generator().manual_seed(0), **kwargs).images, trained,
                               atol=1e-5, rtol=1e-5)


def test_kontext_never_prunes_or_sparsifies_the_source_tokens(tiny_flux_kontext_dir, tmp_path):
    for setting, message in [(dict(token_pruning_layers=[0], token_pruning_keep_ratio=0.5), "token pruning"),
                             (dict(block_sparse_density=0.5), "block-sparse attention")]:
        config = _config(tiny_flux_kontext_dir, tmp_path, attention_backend="sdpa", **setting)
        with pytest.raises(ValueError, match=f"{message} is not supported for flux_kontext"):
            TempFlowGRPOTrainer(config, train_prompts=[{"prompt": "x", "image": "unused"}])


def _config(model_dir, output_dir, **overrides):
    values = dict(output_dir=str(output_dir), model_name_or_path=model_dir, resolution=64, guidance_scale=2.5,
                  num_inference_steps=3, eval_num_inference_steps=3, num_generations=2, prompts_per_iteration=2,
                  per_device_train_batch_size=4, lora_r=4, lora_alpha=8, learning_rate=1e-2, epsilon=0.2,
                  max_steps=1, save_steps=1, train_prompts="unused", eval_prompts=None, disable_progress_bar=True,
                  max_sequence_length=16, reward_funcs=["brightness"], beta=0.1, noise_level=0.9)
    return TempFlowGRPOConfig(**{**values, **overrides})


def test_edit_training_starts_on_policy_and_rewards_see_the_source_images(tiny_flux_kontext_dir, tmp_path):
    paths = [str(p) for p in _images(tmp_path)]
    records = [{"prompt": text, "image": path} for text, path in zip(INSTRUCTIONS, paths)]
    seen = []

    def closer_to_source(images, prompts, source_images, **metadata):
        seen.append((list(prompts), source_images))
        return (-(images - source_images).abs().mean(dim=(1, 2, 3))).tolist()

    trainer = TempFlowGRPOTrainer(_config(tiny_flux_kontext_dir, tmp_path), train_prompts=records,
                                  reward_funcs={"closer_to_source": closer_to_source})
    assert _first_inner_step_stats(trainer)["kl"].item() == pytest.approx(0.0, abs=1e-8)

    metrics = trainer.training_step()
    assert np.isfinite(metrics["reward/mean"]) and metrics["train/optimizer_steps"] >= 1
    by_prompt = dict(zip(INSTRUCTIONS, paths))
    for prompts, sources in seen:
        assert sources.shape == (len(prompts), 3, 64, 64)
        for prompt, source in zip(prompts, sources):
            torch.testing.assert_close(source, load_source_image(by_prompt[prompt], 64, 64))


def test_plan_counts_the_source_tokens(tiny_flux_kontext_dir, tiny_flux_dir, tmp_path):
    from tempflow.memory_plan import model_memory

    kontext, flux = (model_memory(_config(directory, tmp_path, guidance_scale=2.5))
                     for directory in (tiny_flux_kontext_dir, tiny_flux_dir))
    assert kontext.activations_other > flux.activations_other  # twice the image tokens through every block
    assert kontext.rollout_call > flux.rollout_call


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_qwen_image_edit_ode_sampling_matches_pipeline(tiny_qwen_image_edit_dir, tmp_path, cfg_scale):
    """The prompt and (with CFG) the negative prompt encoded by the VL model with the source image, the source's
    latents appended to the noisy tokens at the pipeline's 1024² condition size, the norm-rescaled true CFG."""
    policy = load_policy(tiny_qwen_image_edit_dir, resolution=64, guidance_scale=cfg_scale)
    assert isinstance(policy, QwenImageEditPolicy) and policy.condition_size == (1024, 1024)
    paths = [str(p) for p in _images(tmp_path)]
    noise = torch.cat([policy.initial_noise(torch.Generator().manual_seed(s)) for s in range(2)])
    latents = _ode_sample(policy, noise, policy.encode_prompts(INSTRUCTIONS, paths), 2)
    pipe = QwenImageEditPipeline.from_pretrained(tiny_qwen_image_edit_dir)
    pipe.set_progress_bar_config(disable=True)
    guidance = dict(negative_prompt=" ", true_cfg_scale=cfg_scale) if cfg_scale > 1 else {}
    reference = torch.cat([pipe(image=Image.open(path).convert("RGB"), prompt=text, latents=noise[i : i + 1],
                                num_inference_steps=2, height=64, width=64, output_type="latent", **guidance).images
                           for i, (text, path) in enumerate(zip(INSTRUCTIONS, paths))])
    torch.testing.assert_close(latents, reference, atol=1e-4, rtol=1e-4)


def test_qwen_image_edit_training_starts_on_policy(tiny_qwen_image_edit_dir, tiny_flux_kontext_dir, tmp_path):
    """With CFG (the negative prompt encoded with each row's source image) and a small condition area."""
    paths = [str(p) for p in _images(tmp_path)]
    records = [{"prompt": text, "image": path} for text, path in zip(INSTRUCTIONS, paths)]
    config = _config(tiny_qwen_image_edit_dir, tmp_path, guidance_scale=4.0, edit_condition_area=64 * 64,
                     noise_level=0.7)
    trainer = TempFlowGRPOTrainer(config, train_prompts=records)
    assert trainer.policy.condition_size == (64, 64)
    _first_inner_step_stats(trainer)
    with pytest.raises(ValueError, match="the flux_kontext family takes no source image area"):
        TempFlowGRPOTrainer(_config(tiny_flux_kontext_dir, tmp_path / "kontext", edit_condition_area=4096),
                            train_prompts=records)


def test_qwen_image_edit_plus_takes_several_sources_as_its_pipeline(tiny_qwen_image_edit_plus_dir, tmp_path):
    """Two source images for one instruction: each seen by the VL encoder at 384² and appended as latents at 1024²,
    in order, with CFG."""
    policy = load_policy(tiny_qwen_image_edit_plus_dir, resolution=64, guidance_scale=4.0)
    assert isinstance(policy, QwenImageEditPlusPolicy)
    (tmp_path / "pictures").mkdir()
    first, second = (str(p) for p in _images(tmp_path / "pictures"))
    source = _edit_file(tmp_path, [{"image": ["pictures/source0.png", "pictures/source1.png"],
                                    "instruction": INSTRUCTIONS[0]}])
    record = load_prompts(source)[0]
    assert record["image"] == [first, second]
    noise = policy.initial_noise(torch.Generator().manual_seed(0))
    latents = _ode_sample(policy, noise, policy.encode_records([record]), 2)
    pipe = QwenImageEditPlusPipeline.from_pretrained(tiny_qwen_image_edit_plus_dir)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(image=[Image.open(p).convert("RGB") for p in (first, second)], prompt=INSTRUCTIONS[0],
                     negative_prompt=" ", true_cfg_scale=4.0, latents=noise, num_inference_steps=2, height=64,
                     width=64, output_type="latent").images
    torch.testing.assert_close(latents, reference, atol=1e-4, rtol=1e-4)
