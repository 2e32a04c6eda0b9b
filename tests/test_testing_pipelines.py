import pytest
import torch
from diffusers import FluxPipeline, QwenImagePipeline, StableDiffusion3Pipeline, WanPipeline

from tempflow.offline_tokenizers import QWEN_IMAGE_TEMPLATE, build_qwen_tokenizer
from tempflow.testing import (
    build_clip_tokenizer,
    build_t5_tokenizer,
    build_tiny_flux_pipeline,
    build_tiny_qwen_image_pipeline,
    build_tiny_sd3_pipeline,
    build_tiny_wan_pipeline,
    save_tiny_pipeline,
)

BUILDERS = {
    "sd3": lambda seed=0: build_tiny_sd3_pipeline(seed),
    "sd3_t5": lambda seed=0: build_tiny_sd3_pipeline(seed, with_t5=True),
    "flux": lambda seed=0: build_tiny_flux_pipeline(seed),
    "qwen_image": lambda seed=0: build_tiny_qwen_image_pipeline(seed),
    "wan": lambda seed=0: build_tiny_wan_pipeline(seed),
}
PIPELINE_CLASSES = {"flux": FluxPipeline, "qwen_image": QwenImagePipeline, "wan": WanPipeline}
GUIDANCE = {"sd3": dict(guidance_scale=5.0), "sd3_t5": dict(guidance_scale=5.0), "flux": dict(guidance_scale=3.5),
            "qwen_image": dict(true_cfg_scale=4.0, negative_prompt=" "), "wan": dict(guidance_scale=5.0, num_frames=5)}
OUTPUT_TYPE = {"sd3": "pt", "sd3_t5": "pt", "flux": "np", "qwen_image": "pt", "wan": "pt"}


@pytest.fixture(scope="module")
def pipelines():
    built = {name: build() for name, build in BUILDERS.items()}
    for pipe in built.values():
        pipe.set_progress_bar_config(disable=True)
    return built


@pytest.fixture(scope="module")
def images(pipelines):
    return {name: _generate(pipe, name) for name, pipe in pipelines.items()}


def _generate(pipe, name: str) -> torch.Tensor:
    size = 32 if name == "wan" else 64
    output = pipe(
        "a red square",
        num_inference_steps=2,
        height=size,
        width=size,
        output_type=OUTPUT_TYPE[name],
        generator=torch.Generator().manual_seed(0),
        **GUIDANCE[name],
    )
    return torch.as_tensor(output.frames if name == "wan" else output.images)


def _weights(pipe) -> dict[str, dict[str, torch.Tensor]]:
    return {
        name: module.state_dict()
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
    }


@pytest.mark.parametrize(
    ("name", "shape"), [("sd3", (1, 3, 64, 64)), ("sd3_t5", (1, 3, 64, 64)), ("flux", (1, 64, 64, 3)),
                        ("qwen_image", (1, 3, 64, 64)), ("wan", (1, 5, 3, 32, 32))]
)
def test_generates_a_finite_sample(images, name, shape):
    assert images[name].shape == shape
    assert torch.isfinite(images[name]).all()


@pytest.mark.parametrize("name", ["sd3", "flux", "qwen_image", "wan"])
def test_save_and_reload_gives_the_same_images(pipelines, images, name, tmp_path):
    path = save_tiny_pipeline(pipelines[name], tmp_path / name)
    pipeline_class = PIPELINE_CLASSES.get(name, StableDiffusion3Pipeline)
    # As with the real SD3, a pipeline saved without T5 must be told so when loaded.
    no_t5 = {"text_encoder_3": None, "tokenizer_3": None} if name == "sd3" else {}
    reloaded = pipeline_class.from_pretrained(path, **no_t5)
    reloaded.set_progress_bar_config(disable=True)
    # Not bit-exact: memory-mapped safetensors weights are not 64-byte aligned, so BLAS may round differently.
    torch.testing.assert_close(_generate(reloaded, name), images[name], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["sd3_t5", "flux", "qwen_image", "wan"])
def test_weights_depend_only_on_the_seed(pipelines, name):
    reference = _weights(pipelines[name])
    same, other = _weights(BUILDERS[name](0)), _weights(BUILDERS[name](1))
    for component, state in reference.items():
        assert all(torch.equal(state[k], same[component][k]) for k in state), component
        assert not all(torch.equal(state[k], other[component][k]) for k in state), component


def test_builders_leave_the_global_rng_alone():
    state = torch.random.get_rng_state()
    build_tiny_flux_pipeline(seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_clip_tokenizer_is_the_real_clip_bpe():
    tokenizer = build_clip_tokenizer(max_length=8)
    ids = tokenizer("a red square", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, len(tokenizer)) == (49406, 49407, 49408)
    assert ids == [49406, 320, 736, 3999, 49407, 49407, 49407, 49407]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a red square"


def test_t5_tokenizer_keeps_its_words_whole_and_spells_out_others():
    tokenizer = build_t5_tokenizer(["zebra", "red"])
    ids = tokenizer("red zebra").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["▁red", "▁zebra", "</s>"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "red zebra"
    assert tokenizer.convert_ids_to_tokens(tokenizer("Zoo").input_ids) == ["▁", "Z", "o", "o", "</s>"]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)


def test_qwen_tokenizer_drops_exactly_the_template_prefix_the_pipeline_drops():
    """QwenImagePipeline drops the first 34 tokens of its chat template: with this vocabulary they are the template's
    system turn and the user turn's opening, as with Qwen's real one, and the prompt's tokens follow them."""
    tokenizer = build_qwen_tokenizer()
    prefix = QWEN_IMAGE_TEMPLATE.split("{}")[0]
    pipe = build_tiny_qwen_image_pipeline()
    assert pipe.prompt_template_encode == QWEN_IMAGE_TEMPLATE
    ids = tokenizer(QWEN_IMAGE_TEMPLATE.format("two red circles")).input_ids
    assert len(tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34
    kept = tokenizer.convert_ids_to_tokens(ids[34:])
    assert kept[:3] == ["two", "Ġred", "Ġcircle"] and kept[-5:] == ["<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ"]
    assert tokenizer.decode(tokenizer("Zebra, 42!").input_ids) == "Zebra, 42!"  # unseen text falls back to bytes
