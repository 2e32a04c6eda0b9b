"""Shared fixtures: tiny random SD3, FLUX, Qwen-Image and Wan pipelines saved once per session and loaded through the
real ``from_pretrained`` path, wrapped in their policies."""

import pytest
import torch

from tempflow.policies import load_policy
from tempflow.testing import (
    build_tiny_flux_kontext_pipeline,
    build_tiny_flux_pipeline,
    build_tiny_qwen_image_edit_pipeline,
    build_tiny_qwen_image_pipeline,
    build_tiny_sd3_pipeline,
    build_tiny_wan_pipeline,
    save_tiny_pipeline,
)

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    return save_tiny_pipeline(build_tiny_sd3_pipeline(seed=0, with_t5=True), tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    return save_tiny_pipeline(build_tiny_flux_pipeline(seed=0), tmp_path_factory.mktemp("tiny-flux"))


@pytest.fixture(scope="session")
def tiny_flux_kontext_dir(tmp_path_factory):
    return save_tiny_pipeline(build_tiny_flux_kontext_pipeline(seed=0), tmp_path_factory.mktemp("tiny-flux-kontext"))


@pytest.fixture(scope="session")
def tiny_qwen_image_dir(tmp_path_factory):
    return save_tiny_pipeline(build_tiny_qwen_image_pipeline(seed=0), tmp_path_factory.mktemp("tiny-qwen-image"))


@pytest.fixture(scope="session")
def tiny_qwen_image_edit_dir(tmp_path_factory):
    return save_tiny_pipeline(build_tiny_qwen_image_edit_pipeline(seed=0), tmp_path_factory.mktemp("tiny-qwen-edit"))


@pytest.fixture(scope="session")
def tiny_qwen_image_edit_plus_dir(tmp_path_factory):
    return save_tiny_pipeline(build_tiny_qwen_image_edit_pipeline(seed=0, plus=True),
                              tmp_path_factory.mktemp("tiny-qwen-edit-plus"))


@pytest.fixture(scope="session")
def tiny_wan_dir(tmp_path_factory):
    return save_tiny_pipeline(build_tiny_wan_pipeline(seed=0), tmp_path_factory.mktemp("tiny-wan"))


TINY_WAN_FRAMES, TINY_WAN_SIZE = 9, 32
"""Frames and pixels per side of the tiny Wan samples: 3×4×4 latents, a 3×2×2 token grid (decoding videos is the
slow part of a Wan test on a CPU)."""


@pytest.fixture
def qwen_image_policy(tiny_qwen_image_dir):
    return load_policy(tiny_qwen_image_dir, resolution=64, guidance_scale=4.0)


@pytest.fixture
def wan_policy(tiny_wan_dir):
    return load_policy(tiny_wan_dir, resolution=TINY_WAN_SIZE, guidance_scale=5.0, max_sequence_length=16,
                       num_frames=TINY_WAN_FRAMES)


@pytest.fixture
def sd3_policy(tiny_sd3_dir):
    return load_policy(tiny_sd3_dir, resolution=64, guidance_scale=4.5, max_sequence_length=16)


@pytest.fixture
def flux_policy(tiny_flux_dir):
    return load_policy(tiny_flux_dir, resolution=64, guidance_scale=3.5, max_sequence_length=16)


@pytest.fixture(params=["sd3-cfg", "sd3-nocfg", "flux"])
def any_policy(request, tiny_sd3_dir, tiny_flux_dir):
    if request.param == "flux":
        return load_policy(tiny_flux_dir, resolution=64, guidance_scale=3.5, max_sequence_length=16)
    scale = 4.5 if request.param == "sd3-cfg" else 1.0
    return load_policy(tiny_sd3_dir, resolution=64, guidance_scale=scale, max_sequence_length=16)


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """accelerate keeps one global state per process; each test builds its own trainer and precision."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
