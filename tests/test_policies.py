"""Policies reproduce their diffusers pipelines: schedules, velocities (with guidance), decoding, LoRA."""

import pytest
import torch
from conftest import TINY_WAN_FRAMES, TINY_WAN_SIZE
from diffusers import FluxPipeline, QwenImagePipeline, StableDiffusion3Pipeline, WanPipeline

from tempflow.policies import FluxPolicy, QwenImagePolicy, SD3Policy, WanPolicy, infer_family, load_policy
from tempflow.sampling import ode_step

PROMPTS = ["a red square", "two blue circles"]


def _ode_sample(policy, noise, prompts, steps):
    sigmas = policy.sigma_schedule(steps)
    embeds = policy.encode_prompts(prompts)
    latents = noise
    with torch.no_grad():
        for i in range(steps):
            sigma = sigmas[i].expand(len(prompts))
            next_sigma = sigmas[i + 1].expand(len(prompts))
            latents = ode_step(latents, policy.velocity(latents, sigma, embeds), sigma, next_sigma).next_latents
    return latents


def test_family_is_read_from_model_index(tiny_sd3_dir, tiny_flux_dir, tiny_qwen_image_dir, tiny_wan_dir):
    assert infer_family(tiny_sd3_dir) == "sd3"
    assert infer_family(tiny_flux_dir) == "flux"
    assert infer_family(tiny_qwen_image_dir) == "qwen_image"
    assert infer_family(tiny_wan_dir) == "wan"
    assert isinstance(load_policy(tiny_sd3_dir), SD3Policy)
    assert isinstance(load_policy(tiny_flux_dir), FluxPolicy)
    assert isinstance(load_policy(tiny_qwen_image_dir), QwenImagePolicy)
    assert isinstance(load_policy(tiny_wan_dir, resolution=TINY_WAN_SIZE, num_frames=TINY_WAN_FRAMES), WanPolicy)


@pytest.mark.parametrize(("name", "family"), [("Qwen/Qwen-Image", "qwen_image"), ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "wan"),
                                              ("Wan-AI/Wan2.1-T2V-14B-Diffusers", "wan"),
                                              ("black-forest-labs/FLUX.1-dev", "flux")])
def test_family_is_read_from_hub_names(name, family):
    assert infer_family(name) == family


def test_image_families_refuse_video_and_rectangle_settings(tiny_sd3_dir, tiny_wan_dir):
    with pytest.raises(ValueError, match="num_frames is for video families"):
        load_policy(tiny_sd3_dir, resolution=64, num_frames=9)
    with pytest.raises(ValueError, match="square images"):
        load_policy(tiny_sd3_dir, resolution=64, width=128)
    with pytest.raises(ValueError, match="1 \\+ a multiple of 4"):
        load_policy(tiny_wan_dir, resolution=64, num_frames=12)
    with pytest.raises(ValueError, match="multiples of 16"):
        load_policy(tiny_wan_dir, resolution=72)


def test_missing_model_path_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_policy(str(missing))


def test_sd3_schedule_is_the_schedulers(sd3_policy):
    scheduler = sd3_policy.pipeline.scheduler
    scheduler.set_timesteps(6)
    torch.testing.assert_close(sd3_policy.sigma_schedule(6), scheduler.sigmas.float())
    assert sd3_policy.sigma_schedule(6)[-1] == 0


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
def test_sd3_ode_sampling_matches_pipeline(tiny_sd3_dir, guidance_scale):
    policy = load_policy(tiny_sd3_dir, resolution=64, guidance_scale=guidance_scale, max_sequence_length=16)
    noise = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    ours = _ode_sample(policy, noise, PROMPTS, 4)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    reference = pipe(PROMPTS, latents=noise, num_inference_steps=4, guidance_scale=guidance_scale, height=64,
                     width=64, output_type="latent", max_sequence_length=16).images
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)
    images = policy.decode(ours)
    expected = pipe.image_processor.postprocess(
        pipe.vae.decode(reference / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample,
        output_type="pt",
    )
    assert images.shape == (2, 3, 64, 64)
    torch.testing.assert_close(images, expected, atol=1e-4, rtol=1e-4)


def test_flux_ode_sampling_matches_pipeline(tiny_flux_dir, flux_policy):
    noise = torch.cat([flux_policy.initial_noise(torch.Generator().manual_seed(s)) for s in range(2)])
    ours = _ode_sample(flux_policy, noise, PROMPTS, 4)
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    reference = pipe(PROMPTS, latents=noise, num_inference_steps=4, guidance_scale=3.5, height=64, width=64,
                     output_type="latent", max_sequence_length=16).images
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)
    assert flux_policy.decode(ours).shape == (2, 3, 64, 64)


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_qwen_image_ode_sampling_matches_pipeline(tiny_qwen_image_dir, cfg_scale):
    """Prompts of different lengths (padding masked), the negative prompt " ", true CFG with its norm rescale and
    the dynamic, terminal-stretched σ schedule; a 64×96 image (rectangular packing and RoPE)."""
    policy = load_policy(tiny_qwen_image_dir, resolution=64, width=96, guidance_scale=cfg_scale)
    prompts = ["a red square", "two blue circles above a green triangle on the left"]
    noise = torch.cat([policy.initial_noise(torch.Generator().manual_seed(s)) for s in range(2)])
    ours = _ode_sample(policy, noise, prompts, 4)
    pipe = QwenImagePipeline.from_pretrained(tiny_qwen_image_dir)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(negative_prompt=" " if cfg_scale > 1 else None, true_cfg_scale=cfg_scale, latents=noise,
                  num_inference_steps=4, height=64, width=96)
    reference = pipe(prompts, output_type="latent", **kwargs).images
    assert (reference - noise).abs().max() > 0.1  # the model moved the latents
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)
    images = policy.decode(ours)
    assert images.shape == (2, 3, 64, 96)
    torch.testing.assert_close(images, pipe(prompts, output_type="pt", **kwargs).images, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_wan_ode_sampling_matches_pipeline(tiny_wan_dir, guidance_scale):
    policy = load_policy(tiny_wan_dir, resolution=32, width=48, guidance_scale=guidance_scale, max_sequence_length=16,
                         num_frames=TINY_WAN_FRAMES)
    noise = torch.cat([policy.initial_noise(torch.Generator().manual_seed(s)) for s in range(2)])
    assert noise.shape == (2, 4, 3, 4, 6)
    ours = _ode_sample(policy, noise, PROMPTS, 4)
    pipe = WanPipeline.from_pretrained(tiny_wan_dir)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(latents=noise, num_inference_steps=4, guidance_scale=guidance_scale, height=32, width=48,
                  num_frames=TINY_WAN_FRAMES, max_sequence_length=16)
    reference = pipe(PROMPTS, output_type="latent", **kwargs).frames
    assert (reference - noise).abs().max() > 0.1
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)
    videos = policy.decode(ours)
    assert videos.shape == (2, TINY_WAN_FRAMES, 3, 32, 48)
    torch.testing.assert_close(videos, pipe(PROMPTS, output_type="pt", **kwargs).frames, atol=1e-4, rtol=1e-4)


def test_wan_takes_the_unipc_flow_sigmas_of_the_published_checkpoints(wan_policy):
    """Wan-AI's checkpoints ship UniPC with flow sigmas (flow_shift 3 at 480p): the policy's grid is UniPC's own."""
    from diffusers import UniPCMultistepScheduler

    unipc = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                    final_sigmas_type="zero")
    wan_policy.pipeline.scheduler = unipc
    unipc.set_timesteps(10)
    torch.testing.assert_close(wan_policy.sigma_schedule(10), unipc.sigmas.float())
    assert wan_policy.sigma_schedule(10)[-1] == 0


def test_prompt_embeddings_are_cached(sd3_policy, monkeypatch):
    calls = []
    original = sd3_policy._encode
    monkeypatch.setattr(sd3_policy, "_encode", lambda prompts: calls.append(list(prompts)) or original(prompts))
    first = sd3_policy.encode_prompts(PROMPTS)
    second = sd3_policy.encode_prompts(PROMPTS[::-1] + ["a green triangle"])
    assert calls == [sorted(PROMPTS), ["a green triangle"]]
    torch.testing.assert_close(second[1].tensors["prompt_embeds"], first[0].tensors["prompt_embeds"])


LORA_PIPELINES = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline, "qwen_image": QwenImagePipeline,
                  "wan": WanPipeline}
LORA_CALL = {"sd3": dict(max_sequence_length=16), "flux": dict(max_sequence_length=16), "qwen_image": {},
             "wan": dict(max_sequence_length=16, num_frames=TINY_WAN_FRAMES)}


@pytest.mark.parametrize("family", list(LORA_PIPELINES))
def test_saved_lora_loads_at_its_trained_strength(family, request, tmp_path):
    """r != alpha: a loader that ignored the adapter's alpha would load it at r/alpha of its trained strength."""
    directory = request.getfixturevalue(f"tiny_{family}_dir")
    size = TINY_WAN_SIZE if family == "wan" else 64
    extra = {"num_frames": TINY_WAN_FRAMES} if family == "wan" else {}
    policy = load_policy(directory, resolution=size, max_sequence_length=16, **extra)
    trainable = policy.add_lora(r=4, alpha=8)
    assert trainable and all(p.requires_grad and p.dtype == torch.float32 for p in trainable)
    with torch.no_grad():
        for param in trainable:  # gaussian init leaves lora_B at zero; make the adapter do something
            param.add_(0.05 * torch.randn_like(param))
    policy.save_lora(tmp_path)
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()

    kwargs = dict(num_inference_steps=2, height=size, width=size, output_type="latent", **LORA_CALL[family])

    def generate(pipe):
        output = pipe("a red square", generator=torch.Generator().manual_seed(0), **kwargs)
        return output.frames if family == "wan" else output.images

    trained = generate(policy.pipeline)
    pipe = LORA_PIPELINES[family].from_pretrained(directory)
    pipe.set_progress_bar_config(disable=True)
    base = generate(pipe)
    pipe.load_lora_weights(tmp_path)  # plain diffusers
    assert (trained - base).abs().max() > 1e-3
    torch.testing.assert_close(generate(pipe), trained, atol=1e-5, rtol=1e-5)

    reloaded = load_policy(directory, resolution=size, max_sequence_length=16, **extra)
    reloaded.load_lora(tmp_path)  # what `tempflow eval --lora` and `tempflow sample --lora` do
    torch.testing.assert_close(generate(reloaded.pipeline), trained, atol=1e-5, rtol=1e-5)


def test_lora_without_adapter_config_warns(sd3_policy, tiny_sd3_dir, tmp_path):
    """Exports of older tempflow versions lack lora_alpha; diffusers then assumes alpha = r."""
    from safetensors.torch import load_file, save_file

    sd3_policy.add_lora(r=4, alpha=8)
    sd3_policy.save_lora(tmp_path)
    weights = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(load_file(weights), weights)  # the same tensors, no metadata
    with pytest.warns(UserWarning, match="no adapter config"):
        load_policy(tiny_sd3_dir, resolution=64, max_sequence_length=16).load_lora(tmp_path)


def test_reference_disables_lora(sd3_policy):
    sd3_policy.add_lora(r=4, alpha=8)
    with torch.no_grad():
        for name, param in sd3_policy.transformer.named_parameters():
            if "lora_B" in name:
                param.fill_(0.1)
    latents = torch.randn(1, *sd3_policy.latent_shape)
    embeds = sd3_policy.encode_prompts(["a red square"])
    sigma = torch.tensor([0.5])
    with torch.no_grad():
        adapted = sd3_policy.velocity(latents, sigma, embeds)
        with sd3_policy.reference() as reference:
            base = sd3_policy.velocity(latents, sigma, embeds, model=reference)
        again = sd3_policy.velocity(latents, sigma, embeds)
    assert (adapted - base).abs().max() > 1e-4
    torch.testing.assert_close(adapted, again)


OFFICIAL_SD3_LORA_TARGETS = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                             "attn.to_out.0", "attn.to_q", "attn.to_v"]  # TempFlow-GRPO's and Flow-GRPO's train_sd3


def test_sd3_lora_adapts_the_official_modules_of_a_dual_attention_transformer(tiny_sd3_dir):
    """SD3.5-M's blocks 0-12 add a second self-attention (attn2): the official target list, matched the way peft
    matches it, adapts the joint attention only; a suffix list would adapt attn2 as well."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from tempflow.testing import seeded_module

    policy = load_policy(tiny_sd3_dir, resolution=64, max_sequence_length=16)
    config = dict(policy.transformer.config)
    config.update(dual_attention_layers=(0,), qk_norm="rms_norm")  # SD3.5-M's shape: dual attention, RMS q/k norm
    policy.pipeline.transformer = seeded_module(0, lambda: SD3Transformer2DModel.from_config(config))
    names = [name for name, module in policy.transformer.named_modules() if isinstance(module, torch.nn.Linear)]
    official = LoraConfig(target_modules=OFFICIAL_SD3_LORA_TARGETS)
    expected = {name for name in names if check_target_module_exists(official, name)}
    assert any(".attn2." in name for name in names)

    policy.add_lora(r=4, alpha=8)
    adapted = {name.split(".lora_A")[0] for name, _ in policy.transformer.named_parameters() if ".lora_A." in name}
    assert adapted == expected
    assert not any(".attn2." in name for name in adapted)
