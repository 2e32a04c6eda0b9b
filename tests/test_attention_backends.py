"""Attention backend selection: every SDPA kernel available on the CPU gives the same velocity, the setting
covers rollouts and recomputation alike, and unsupported combinations fail clearly."""

import importlib.util

import pytest
import torch

from tempflow.attention.backends import resolve_attention_backend
from tempflow.config import TempFlowGRPOConfig
from tempflow.testing import rollout_and_recomputed_log_probs


def _velocity(policy):
    latents = torch.randn(3, *policy.initial_noise(torch.Generator()).shape[1:],
                          generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return policy.velocity(latents, torch.tensor([0.9, 0.5, 0.2]), policy.encode_prompts(["a red square"] * 3))


@pytest.mark.parametrize("backend", ["sdpa_math", "sdpa_flash"])
def test_cpu_kernels_match_default_sdpa(any_policy, backend):
    reference = _velocity(any_policy)
    any_policy.set_attention_backend(backend)
    assert any_policy.attention_backend == backend
    torch.testing.assert_close(_velocity(any_policy), reference, atol=1e-5, rtol=1e-5)


def test_backend_applies_to_rollout_and_recomputation(sd3_policy):
    sd3_policy.set_attention_backend("sdpa_math")
    recomputed, stored = rollout_and_recomputed_log_probs(sd3_policy)
    torch.testing.assert_close(recomputed, stored, atol=1e-6, rtol=0)


def test_auto_and_validation(sd3_policy):
    assert resolve_attention_backend("auto", torch.device("cpu")) == "sdpa"
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_attention_backend("fastest", torch.device("cpu"))
    with pytest.raises(ValueError, match="`attention_backend`"):
        TempFlowGRPOConfig(attention_backend="fastest")


def test_sd3_takes_the_dispatchers_backends_and_gives_the_same_velocity(sd3_policy):
    """SD3 routed through diffusers' dispatcher: FlexAttention (eager on the CPU) computes what SDPA does; back on
    an SDPA kernel the stock processor returns; a backend whose package is missing is named."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    from tempflow.attention.backends import DispatchedJointAttnProcessor

    latents = torch.randn(2, *sd3_policy.latent_shape, generator=torch.Generator().manual_seed(0))
    embeds = sd3_policy.encode_prompts(["a red square", "two blue circles"])
    sigmas = torch.tensor([0.9, 0.4])
    with torch.no_grad():
        dense = sd3_policy.velocity(latents, sigmas, embeds)
        sd3_policy.set_attention_backend("flex")
        processors = {type(m.processor) for m in sd3_policy.transformer.modules() if hasattr(m, "processor")}
        assert processors == {DispatchedJointAttnProcessor}
        flex = sd3_policy.velocity(latents, sigmas, embeds)
        sd3_policy.set_attention_backend("sdpa")
        assert {type(m.processor) for m in sd3_policy.transformer.modules() if hasattr(m, "processor")} == {
            JointAttnProcessor2_0}
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    assert _AttentionBackendRegistry.get_active_backend()[0].value == "native"  # no flex left for other models
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(RuntimeError, match="flash-attn"):
            sd3_policy.set_attention_backend("flash_attn")
