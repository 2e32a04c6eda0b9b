"""The shipped ShapesWorld pipeline and the code that builds and pretrains it."""

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from tempflow.shapes import pipeline_path
from tempflow.shapes.detector import detect, strict_score
from tempflow.shapes.pretrain import (
    CLIP_MAX_LENGTH,
    MAX_SEQUENCE_LENGTH,
    SceneStream,
    build_shapes_pipeline,
    pretrain_shapes,
    render_images,
    to_uint8_arrays,
)
from tempflow.shapes.world import MAX_OBJECTS, VOCABULARY, load_prompt_set


def _generate(pipeline: StableDiffusion3Pipeline, prompt: str, num_steps: int = 4) -> torch.Tensor:
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(
        prompt,
        num_inference_steps=num_steps,
        guidance_scale=4.5,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images


@pytest.fixture(scope="module")
def shipped():
    return StableDiffusion3Pipeline.from_pretrained(pipeline_path())


def test_shipped_pipeline_loads_with_plain_from_pretrained_and_generates_64px(shipped):
    assert shipped.text_encoder_3 is not None and shipped.tokenizer_3 is not None
    image = _generate(shipped, "a photo of a red circle")
    assert image.shape == (1, 3, 64, 64)
    assert torch.isfinite(image).all()


def test_policies_default_to_the_shipped_pipelines_t5_length_and_keep_the_family_default_elsewhere(
    shipped, tiny_sd3_dir
):
    from tempflow.policies import SD3Policy, load_policy

    assert shipped.tokenizer_3.model_max_length == MAX_SEQUENCE_LENGTH
    assert SD3Policy(shipped, resolution=64).max_sequence_length == MAX_SEQUENCE_LENGTH
    assert SD3Policy(shipped, resolution=64, max_sequence_length=5).max_sequence_length == 5
    assert load_policy(tiny_sd3_dir, resolution=64).max_sequence_length == SD3Policy.default_max_sequence_length


def test_shipped_vae_reconstructions_keep_the_scene(shipped):
    entries = load_prompt_set("eval")[::10]
    images = render_images([e["spec"] for e in entries], np.random.default_rng(0))
    with torch.no_grad():
        latents = shipped.vae.encode(images).latent_dist.mode()
        reconstructions = to_uint8_arrays(shipped.vae.decode(latents).sample)
    accuracy = np.mean([strict_score(image, e["spec"]) for image, e in zip(reconstructions, entries)])
    assert accuracy >= 0.9


def test_build_shapes_pipeline_is_quick_and_reproducible():
    started = time.perf_counter()
    first = build_shapes_pipeline(seed=3)
    assert time.perf_counter() - started < 5
    second, other = build_shapes_pipeline(seed=3), build_shapes_pipeline(seed=4)
    weight = "transformer_blocks.0.attn.to_q.weight"
    assert torch.equal(first.transformer.state_dict()[weight], second.transformer.state_dict()[weight])
    assert not torch.equal(first.transformer.state_dict()[weight], other.transformer.state_dict()[weight])


def test_clip_tokenizer_has_one_token_per_word_and_fits_every_prompt():
    tokenizer = build_shapes_pipeline().tokenizer
    for word in VOCABULARY:
        assert len(tokenizer(word).input_ids) == 3, word  # bos, the word, eos
    longest = max(len(tokenizer(e["prompt"]).input_ids) for e in load_prompt_set("train") + load_prompt_set("eval"))
    assert longest <= CLIP_MAX_LENGTH


def test_short_pretraining_runs_end_to_end_and_reloads(tmp_path):
    metrics = pretrain_shapes(
        tmp_path / "pipe", seed=0, vae_steps=2, transformer_steps=3, batch_size=2, vae_batch_size=2, progress=False,
        vae_eval_scenes=4, snapshot_every=2,
    )
    assert np.isfinite(metrics["flow_loss"])
    assert all(np.isfinite(v) for v in metrics.values() if isinstance(v, float))
    snapshot = StableDiffusion3Pipeline.from_pretrained(tmp_path / "pipe-step2")
    reloaded = StableDiffusion3Pipeline.from_pretrained(tmp_path / "pipe")
    weight = "transformer_blocks.0.attn.to_q.weight"
    assert not torch.equal(snapshot.transformer.state_dict()[weight], reloaded.transformer.state_dict()[weight])
    assert reloaded.vae.config.scaling_factor == pytest.approx(1 / metrics["latent_std"])
    assert _generate(reloaded, "a photo of two blue squares", num_steps=2).shape == (1, 3, 64, 64)


def test_continued_pretraining_keeps_the_vae_and_trains_only_the_transformer(tmp_path):
    pretrain_shapes(tmp_path / "base", vae_steps=2, transformer_steps=2, batch_size=2, vae_batch_size=2,
                    progress=False, vae_eval_scenes=4)
    metrics = pretrain_shapes(tmp_path / "more", transformer_steps=2, batch_size=2, progress=False,
                              init_from=tmp_path / "base", unmentioned_object_rate=0.5, transformer_lr=1e-3)
    assert np.isfinite(metrics["flow_loss"]) and "vae_loss" not in metrics
    base = StableDiffusion3Pipeline.from_pretrained(tmp_path / "base")
    more = StableDiffusion3Pipeline.from_pretrained(tmp_path / "more")
    for name, weight in base.vae.state_dict().items():
        assert torch.equal(weight, more.vae.state_dict()[name]), name
    assert base.vae.config.scaling_factor == more.vae.config.scaling_factor
    weight = "transformer_blocks.0.attn.to_q.weight"
    assert not torch.equal(base.transformer.state_dict()[weight], more.transformer.state_dict()[weight])
    with pytest.raises(FileNotFoundError, match="not a saved pipeline"):
        pretrain_shapes(tmp_path / "x", transformer_steps=1, progress=False, init_from=tmp_path / "missing")

    # A new patch size trains a new transformer (64 image tokens) on the same VAE and text encoders.
    pretrain_shapes(tmp_path / "patch2", transformer_steps=1, batch_size=2, progress=False, init_from=tmp_path / "base",
                    patch_size=2)
    patch2 = StableDiffusion3Pipeline.from_pretrained(tmp_path / "patch2")
    assert patch2.transformer.config.patch_size == 2 and base.transformer.config.patch_size == 4
    for name, weight in base.text_encoder_3.state_dict().items():
        assert torch.equal(weight, patch2.text_encoder_3.state_dict()[name]), name
    assert torch.equal(base.vae.state_dict()["decoder.conv_out.weight"], patch2.vae.state_dict()["decoder.conv_out.weight"])
    assert _generate(patch2, "a photo of two blue squares", num_steps=2).shape == (1, 3, 64, 64)


def test_unmentioned_objects_are_drawn_at_their_rate_and_never_past_four():
    clean, noisy = SceneStream(0), SceneStream(0, unmentioned_object_rate=1.0)
    spec = {"task": "colors", "objects": [{"shape": "circle", "color": "red", "count": 1}], "relation": None}
    assert clean.scene_spec(spec) is spec
    assert clean.rng.bit_generator.state == SceneStream(0).rng.bit_generator.state  # rate 0 draws nothing
    drawn = noisy.scene_spec(spec)
    assert drawn["objects"][0] == spec["objects"][0] and len(drawn["objects"]) == 2
    image = render_images([drawn], noisy.rng)
    (pixels,) = to_uint8_arrays(image)
    assert len(detect(pixels)) == 2 and strict_score(pixels, spec) == 0.0
    assert strict_score(pixels, spec, allow_extra=True) == 1.0
    full = {"task": "counting", "objects": [{"shape": "square", "color": "blue", "count": MAX_OBJECTS}],
            "relation": None}
    assert noisy.scene_spec(full) is full
    half = SceneStream(1, unmentioned_object_rate=0.5)
    share = np.mean([len(half.scene_spec(spec)["objects"]) == 2 for _ in range(2000)])
    assert 0.45 < share < 0.55
    with pytest.raises(ValueError, match="unmentioned_object_rate"):
        SceneStream(0, unmentioned_object_rate=1.5)


def test_truncation_to_the_pipelines_own_t5_length_is_quiet_but_a_shorter_user_length_still_warns(caplog):
    from tempflow.policies import SD3Policy

    pipeline = StableDiffusion3Pipeline.from_pretrained(pipeline_path())  # fresh tokenizers: they warn once each
    longest = max((record["prompt"] for record in load_prompt_set("eval")), key=len)
    libraries = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    for library in libraries:  # neither library's loggers propagate to the root, where caplog listens
        library.addHandler(caplog.handler)
    try:
        SD3Policy(pipeline, resolution=64).encode_prompts([longest])
        assert "truncated" not in caplog.text  # diffusers' per-batch warning
        assert "longer than the specified maximum" not in caplog.text  # the T5 tokenizer's
        SD3Policy(pipeline, resolution=64, max_sequence_length=3).encode_prompts([longest])
        assert "truncated" in caplog.text
    finally:
        for library in libraries:
            library.removeHandler(caplog.handler)


def test_gpu_pretraining_script_brings_back_a_patch2_transformer(tmp_path):
    """benchmarks/gpu_pretrain_shapes.sh, run here on the CPU for two steps: what the GPU machine will send back."""
    root = Path(__file__).parents[1]
    env = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), "DEVICE": "cpu", "STEPS": "2",
           "BATCH": "2", "SNAPSHOT": "1", "EXTRA": "--skip-eval", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run(["sh", str(root / "benchmarks" / "gpu_pretrain_shapes.sh")], cwd=root, env=env, check=True,
                   capture_output=True)
    back = tmp_path / "out" / "transformer"
    assert sorted(p.name for p in back.iterdir()) == ["STEP", "config.json", "diffusion_pytorch_model.safetensors"]
    assert (back / "STEP").read_text().strip() == "2"
    assert json.loads((back / "config.json").read_text())["patch_size"] == 2


def test_the_model_cards_quick_check_reproduces(tmp_path):
    from tempflow.cli import main

    card = (pipeline_path() / "README.md").read_text()
    quoted = re.search(r"`tempflow eval (--limit \d+ --samples-per-prompt \d+)` gives strict ([\d.]+), pass@2 ([\d.]+), "
                       r"partial ([\d.]+)", card)
    assert quoted, "the model card lost its quick-check line"
    assert main(["eval", *quoted[1].split(), "--rewards", "shapes_strict", "shapes", "--output", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    prompts = result["num_prompts"]  # a flipped detection (another CPU's float rounding) moves one image or prompt
    assert abs(result["rewards"]["shapes_strict"] - float(quoted[2])) <= 1 / (prompts * 2) + 1e-6
    assert abs(result["best_of_k"]["shapes_strict"] - float(quoted[3])) <= 1 / prompts + 1e-6
    assert abs(result["rewards"]["shapes"] - float(quoted[4])) <= 0.01
