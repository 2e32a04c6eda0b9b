"""SoftPAG: u = 0 is the model bit for bit, u = 1 is the identity (value) path, only the chosen heads and the
image tokens change, processors and dispatcher settings come back after the perturbed call, token pruning
still works, the policies' guided velocity is ``v_guided + s·(v_cond − v_perturbed)``, scale 0 is the plain
sampler, training rollouts refuse it, and the CLI flags reach the policy."""

import copy
import json

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.attention_processor import JointAttnProcessor2_0, PAGIdentitySelfAttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from tempflow.attention import softpag as softpag_module
from tempflow.attention.pruning import PerSampleRotaryFluxAttnProcessor, TokenPruning
from tempflow.attention.softpag import (
    SoftPAG,
    SoftPAGFluxAttnProcessor,
    SoftPAGJointAttnProcessor,
    check_softpag,
    softpag_attention,
)
from tempflow.cli import EXIT_BAD_INPUT, main
from tempflow.policies import FlowPolicy, load_policy
from tempflow.rollout import RolloutEngine
from tempflow.testing import (
    TINY_MMDIT_TEXT_LEN,
    build_tiny_flux_transformer,
    seeded_module,
    tiny_mmdit_inputs,
    token_pruning,
)

BATCH, TEXT_LEN, IMAGE_TOKENS = 2, TINY_MMDIT_TEXT_LEN, 16


def _sd3():
    """Three joint blocks (the last context-pre-only); block 0 has SD3.5's second, image-only attention and
    every attention has RMS q/k norms; 4 heads."""
    return seeded_module(0, lambda: SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=24,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
    ))


MODELS = {"sd3": _sd3, "flux": build_tiny_flux_transformer}


def _inputs(family):
    return tiny_mmdit_inputs(family, BATCH)


@torch.no_grad()
def _run(model, inputs):
    return model(**inputs, return_dict=False)[0]


def _processors(model):
    return {name: module.processor for name, module in model.named_modules() if hasattr(module, "processor")}


# --- one attention module, called directly ---------------------------------------------------------------------
# (family, attention module, its block's index, where its image tokens sit in the joint sequence)
ATTENTIONS = {
    "sd3-joint": ("sd3", "transformer_blocks.1.attn", 1, "first"),
    "sd3-joint-context-pre-only": ("sd3", "transformer_blocks.2.attn", 2, "first"),
    "sd3-image-only": ("sd3", "transformer_blocks.0.attn2", 0, "all"),
    "flux-double": ("flux", "transformer_blocks.1.attn", 1, "last"),
    "flux-single": ("flux", "single_transformer_blocks.0.attn", 2, "last"),
}


def _captured_call(kind):
    """The attention module of ``kind`` and the keyword arguments it gets in a real forward pass."""
    family, name, _, _ = ATTENTIONS[kind]
    model = MODELS[family]()
    attn = model.get_submodule(name)
    captured = {}
    hook = attn.register_forward_pre_hook(lambda module, args, kwargs: captured.update(kwargs), with_kwargs=True)
    _run(model, _inputs(family))
    hook.remove()
    return attn, captured


def _call(kind, attn, processor, kwargs):
    """``processor`` on ``attn``: the output ``[B, S, C]`` in joint-sequence order, and the image rows."""
    family, _, _, image_at = ATTENTIONS[kind]
    if isinstance(processor, SoftPAGFluxAttnProcessor):
        processor.text_len = TEXT_LEN  # single blocks: what softpag_attention's hook sets
    with torch.no_grad():
        output = processor(attn, **kwargs)
    if image_at == "first":
        return torch.cat(output, dim=1), slice(0, output[0].shape[1])
    if isinstance(output, tuple):
        return torch.cat(output[::-1], dim=1), slice(TEXT_LEN, None)
    return output, slice(TEXT_LEN, None) if image_at == "last" else slice(None)


def _default_processor(kind):
    return JointAttnProcessor2_0() if ATTENTIONS[kind][0] == "sd3" else FluxAttnProcessor()


def _softpag_processor(kind, head_softness):
    cls = SoftPAGJointAttnProcessor if ATTENTIONS[kind][0] == "sd3" else SoftPAGFluxAttnProcessor
    return cls(head_softness)


def _image_values(kind, attn, kwargs):
    """``V`` of the image tokens ``[B, N, C]``, computed by hand from the attention's input."""
    values = attn.to_v(kwargs["hidden_states"])
    return values[:, TEXT_LEN:] if kind == "flux-single" else values


@pytest.mark.parametrize("kind", list(ATTENTIONS))
def test_full_softness_at_all_heads_is_the_value_path(kind):
    """u = 1 at every head: each image token outputs its own value (through the output projection); text tokens
    keep their attention output."""
    attn, kwargs = _captured_call(kind)
    plain, image = _call(kind, attn, _default_processor(kind), kwargs)
    perturbed, _ = _call(kind, attn, _softpag_processor(kind, [1.0] * attn.heads), kwargs)
    with torch.no_grad():
        values = _image_values(kind, attn, kwargs)
        expected = values if kind == "flux-single" else attn.to_out[1](attn.to_out[0](values))
    torch.testing.assert_close(perturbed[:, image], expected, atol=1e-6, rtol=0)
    text = torch.ones(perturbed.shape[1], dtype=torch.bool)
    text[image] = False
    torch.testing.assert_close(perturbed[:, text], plain[:, text], atol=0, rtol=0)
    assert not torch.allclose(plain[:, image], expected, atol=1e-3)


def test_image_only_attention_matches_diffusers_pag_identity():
    """On SD3.5's image-only attention, u = 1 is diffusers' PAG identity self-attention (its perturbed half)."""
    attn, kwargs = _captured_call("sd3-image-only")
    ours, _ = _call("sd3-image-only", attn, SoftPAGJointAttnProcessor([1.0] * attn.heads), kwargs)
    x = kwargs["hidden_states"]
    with torch.no_grad():
        diffusers_pag = PAGIdentitySelfAttnProcessor2_0()(attn, torch.cat([x, x]))[BATCH:]
    torch.testing.assert_close(ours, diffusers_pag, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", list(ATTENTIONS))
def test_only_chosen_heads_and_image_tokens_change(kind):
    """Per head (output projections removed): chosen heads give (1 − u)·attention + u·V on the image tokens,
    every other head and every text token is the attention output bit for bit."""
    attn, kwargs = _captured_call(kind)
    attn = copy.deepcopy(attn)
    if hasattr(attn, "to_out"):  # FLUX's single blocks project after the attention, outside it
        attn.to_out[0] = torch.nn.Identity()
    if getattr(attn, "to_add_out", None) is not None:
        attn.to_add_out = torch.nn.Identity()
    softpag = SoftPAG(layers=(ATTENTIONS[kind][2],), heads=(1,), softness=0.6)
    plain, image = _call(kind, attn, _default_processor(kind), kwargs)
    perturbed, _ = _call(kind, attn, _softpag_processor(kind, softpag.head_softness(attn.heads)), kwargs)

    def per_head(x):
        return x.unflatten(-1, (attn.heads, -1))

    plain, perturbed = per_head(plain), per_head(perturbed)
    with torch.no_grad():
        values = per_head(_image_values(kind, attn, kwargs))
    others = [h for h in range(attn.heads) if h != 1]
    torch.testing.assert_close(perturbed[:, :, others], plain[:, :, others], atol=0, rtol=0)
    text = torch.ones(perturbed.shape[1], dtype=torch.bool)
    text[image] = False
    torch.testing.assert_close(perturbed[:, text], plain[:, text], atol=0, rtol=0)
    expected = 0.4 * plain[:, image, 1] + 0.6 * values[:, :, 1]
    torch.testing.assert_close(perturbed[:, image, 1], expected, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(perturbed[:, image, 1], plain[:, image, 1], atol=1e-3)


# --- the context on a whole model ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_zero_softness_is_the_model_and_processors_come_back(family):
    model, inputs = MODELS[family](), _inputs(family)
    before, processors = _run(model, inputs), _processors(model)
    every_block = SoftPAG(layers=tuple(range(len(model.transformer_blocks) + len(getattr(
        model, "single_transformer_blocks", [])))), softness=0.0)
    with softpag_attention(model, family, every_block):
        assert all(isinstance(p, (SoftPAGJointAttnProcessor, SoftPAGFluxAttnProcessor))
                   for p in _processors(model).values())
        torch.testing.assert_close(_run(model, inputs), before, atol=0, rtol=0)
    with softpag_attention(model, family, SoftPAG(layers=(1,), softness=1.0)):
        perturbed = _run(model, inputs)
    assert not torch.allclose(perturbed, before, atol=1e-4)
    after = _processors(model)
    assert after.keys() == processors.keys() and all(after[n] is processors[n] for n in after)
    assert family == "sd3" or not any(block._forward_pre_hooks for block in model.single_transformer_blocks)
    torch.testing.assert_close(_run(model, inputs), before, atol=0, rtol=0)


def test_processors_come_back_when_the_call_fails():
    model = build_tiny_flux_transformer()
    processors = _processors(model)
    with pytest.raises(RuntimeError, match="boom"), softpag_attention(model, "flux", SoftPAG(layers=(0, 3))):
        raise RuntimeError("boom")
    assert all(_processors(model)[n] is p for n, p in processors.items())
    assert not model.single_transformer_blocks[1]._forward_pre_hooks


def test_flux_dispatcher_backend_carries_over():
    model, inputs = build_tiny_flux_transformer(), _inputs("flux")
    model.set_attention_backend("_native_math")
    before = _run(model, inputs)
    with softpag_attention(model, "flux", SoftPAG(layers=(1, 2), softness=0.0)):
        installed = [p for p in _processors(model).values() if isinstance(p, SoftPAGFluxAttnProcessor)]
        assert len(installed) == 2
        backend = model.transformer_blocks[0].attn.processor._attention_backend
        assert backend is not None and all(p._attention_backend == backend for p in installed)
        torch.testing.assert_close(_run(model, inputs), before, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_works_under_token_pruning(family):
    """Pruned blocks see fewer image tokens (FLUX: per-sample RoPE tables); u = 0 is still the pruned model, and
    FLUX's per-sample RoPE processors are back afterwards."""
    model, inputs = MODELS[family](), _inputs(family)
    with token_pruning(model, family, TokenPruning(layers=(0,), keep_ratio=0.5)):
        pruned, processors = _run(model, inputs), _processors(model)
        with softpag_attention(model, family, SoftPAG(layers=(1, 2), softness=0.0)):
            torch.testing.assert_close(_run(model, inputs), pruned, atol=0, rtol=0)
        with softpag_attention(model, family, SoftPAG(layers=(1, 2), softness=1.0)):
            perturbed = _run(model, inputs)
        assert all(_processors(model)[n] is p for n, p in processors.items())
        if family == "flux":
            assert all(type(p) is PerSampleRotaryFluxAttnProcessor for p in processors.values())
    assert not torch.allclose(perturbed, pruned, atol=1e-4) and torch.isfinite(perturbed).all()


def test_settings_are_validated():
    assert SoftPAG(2.0, layers=[3, 1], heads=[1, 0], softness=0.5) == SoftPAG(2.0, (1, 3), (0, 1), 0.5)
    assert SoftPAG(1.0, (0,), heads=(2,), softness=0.3).head_softness(4) == [0.0, 0.0, 0.3, 0.0]
    assert not SoftPAG().active and SoftPAG(0.5, (0,)).active
    for kwargs, message in [
        (dict(scale=-1.0, layers=(0,)), "non-negative"),
        (dict(scale=float("nan"), layers=(0,)), "non-negative"),
        (dict(scale=1.0), "needs at least one layer"),
        (dict(layers=(1, 1)), "distinct non-negative"),
        (dict(layers=(-1,)), "distinct non-negative"),
        (dict(layers=(0,), heads=()), "at least one head"),
        (dict(layers=(0,), softness=1.5), r"must lie in \[0, 1\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            SoftPAG(**kwargs)

    model = _sd3()
    with pytest.raises(ValueError, match=r"this transformer has 3 blocks, so layers must lie in \[0, 2\]"):
        check_softpag(model, "sd3", SoftPAG(layers=(3,)))
    with pytest.raises(ValueError, match="block 1 has 4 heads"):
        check_softpag(model, "sd3", SoftPAG(layers=(1,), heads=(4,)))
    with pytest.raises(ValueError, match="needs a FluxTransformer2DModel"):
        check_softpag(model, "flux", SoftPAG(layers=(0,)))
    model.transformer_blocks[1].attn.set_processor(PAGIdentitySelfAttnProcessor2_0())
    with pytest.raises(ValueError, match="block 1, which runs PAGIdentitySelfAttnProcessor2_0"):
        with softpag_attention(model, "sd3", SoftPAG(layers=(1,))):
            pass


# --- policies, sampler, CLI ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def policies(tiny_sd3_dir, tiny_flux_dir):
    """One policy per family for the module (loading dominates these tests); tests restore what they change."""
    return {
        "sd3": load_policy(tiny_sd3_dir, resolution=64, guidance_scale=4.5, max_sequence_length=16),
        "flux": load_policy(tiny_flux_dir, resolution=64, guidance_scale=3.5, max_sequence_length=16),
    }


@pytest.mark.parametrize("family, guidance_scale", [("sd3", 4.5), ("sd3", 1.0), ("flux", 3.5)],
                         ids=["sd3-cfg", "sd3-nocfg", "flux"])
def test_guided_velocity_is_the_formula(policies, family, guidance_scale, monkeypatch):
    """v = v_guided + s·(v_cond − v_perturbed): v_guided the policy's own velocity, v_cond its conditional
    prediction (SD3 without CFG; FLUX's is already conditional), v_perturbed that under SoftPAG's attention."""
    policy = policies[family]
    monkeypatch.setattr(policy, "guidance_scale", guidance_scale)
    monkeypatch.setattr(policy, "softpag", None)
    latents = torch.randn(2, *policy.initial_noise(torch.Generator()).shape[1:],
                          generator=torch.Generator().manual_seed(0))
    sigmas, embeds = torch.tensor([0.9, 0.4]), policy.encode_prompts(["a red square", "two blue circles"])
    softpag = SoftPAG(scale=1.5, layers=(1,), heads=(0,), softness=0.7)
    with torch.no_grad():
        guided = policy.velocity(latents, sigmas, embeds)
        cfg = policy.guidance_scale
        if policy.family == "sd3":
            policy.guidance_scale = 1.0
        cond = policy.velocity(latents, sigmas, embeds)
        with softpag_attention(policy.transformer, policy.family, softpag):
            perturbed = policy.velocity(latents, sigmas, embeds)
        policy.guidance_scale = cfg
        policy.set_softpag(softpag)
        pag = policy.velocity(latents, sigmas, embeds)
        policy.set_softpag(None)
        torch.testing.assert_close(policy.velocity(latents, sigmas, embeds), guided, atol=0, rtol=0)
    torch.testing.assert_close(pag, guided + 1.5 * (cond - perturbed), atol=1e-5, rtol=0)
    assert not torch.allclose(pag, guided, atol=1e-3)


def test_sampler_scale_zero_is_unguided_and_training_rollouts_refuse_softpag(policies, monkeypatch):
    sd3_policy = policies["sd3"]
    monkeypatch.setattr(sd3_policy, "softpag", None)
    embeds = sd3_policy.encode_prompts(["a red square", "two blue circles"])
    engine = RolloutEngine(sd3_policy, noise_level=0.0, batch_size=2)
    with torch.no_grad():
        plain = engine.sample(embeds, [0, 1], [3, 4], num_steps=3)
        sd3_policy.set_softpag(SoftPAG(scale=0.0, layers=(0,)))
        assert sd3_policy.softpag is None
        torch.testing.assert_close(engine.sample(embeds, [0, 1], [3, 4], num_steps=3), plain, atol=0, rtol=0)
        sd3_policy.set_softpag(SoftPAG(scale=2.0, layers=(0,)))
        guided = engine.sample(embeds, [0, 1], [3, 4], num_steps=3)
    assert not torch.allclose(guided, plain, atol=1e-3)

    training = RolloutEngine(sd3_policy, noise_level=0.7, batch_size=2)
    with pytest.raises(ValueError, match="sampling and evaluation only"):
        training.branched(embeds, [0], [1], num_steps=3, branch_steps=[0], num_children=2)
    with pytest.raises(ValueError, match="sampling and evaluation only"):
        training.trajectories(embeds, [0, 1], [1, 2], [0, 0], num_steps=3)


def test_cli_flags_reach_the_policy(tiny_sd3_dir, tmp_path, monkeypatch, capsys):
    chosen, perturbed_calls = [], []
    set_softpag = FlowPolicy.set_softpag
    monkeypatch.setattr(FlowPolicy, "set_softpag", lambda self, s: (chosen.append(s), set_softpag(self, s))[1])
    attention = softpag_module.softpag_attention
    monkeypatch.setattr(softpag_module, "softpag_attention",
                        lambda *args: (perturbed_calls.append(args[2]), attention(*args))[1])
    out = tmp_path / "eval"
    assert main(["eval", "--model", tiny_sd3_dir, "--rewards", "brightness", "--limit", "1", "--num-steps", "2",
                 "--max-sequence-length", "16", "--output", str(out), "--pag-scale", "2.5", "--pag-layers", "1", "0",
                 "--pag-heads", "3", "--pag-softness", "0.25"]) == 0
    expected = SoftPAG(scale=2.5, layers=(0, 1), heads=(3,), softness=0.25)
    assert chosen == [expected] and perturbed_calls == [expected, expected]  # one perturbed call per step
    assert json.loads((out / "eval.json").read_text())["softpag"] == {
        "scale": 2.5, "layers": [0, 1], "heads": [3], "softness": 0.25}

    assert main(["sample", "--model", tiny_sd3_dir, "--prompt", "x", "--output", str(tmp_path / "s"),
                 "--pag-scale", "1"]) == EXIT_BAD_INPUT
    assert "needs at least one layer" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_policy_checks_layers_and_heads_against_its_model(policies):
    policy = policies["flux"]
    with pytest.raises(ValueError, match=r"SoftPAG layers \[2\] out of range: this transformer has 2 blocks"):
        policy.set_softpag(SoftPAG(scale=1.0, layers=(2,)))
    with pytest.raises(ValueError, match="block 1 has 2 heads"):
        policy.set_softpag(SoftPAG(scale=1.0, layers=(1,), heads=(2,)))
    assert policy.softpag is None
