"""Representation-Shift token pruning: keeping every token is the dense model, kept tokens are the largest
updates, pruned tokens keep their last state, FLUX RoPE rows follow the tokens, gradients flow, keep sets are
per sample (so rollouts and recomputation agree) and are reused as ``refresh_every`` says."""

import copy

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from peft import LoraConfig

from tempflow.attention.pruning import (
    TokenPruner,
    TokenPruning,
    apply_token_pruning,
    gather_rotary,
    remove_token_pruning,
)
from tempflow.testing import (
    TINY_MMDIT_TEXT_LEN,
    build_tiny_flux_transformer,
    build_tiny_wan_transformer,
    rollout_and_recomputed_log_probs,
    seeded_module,
    tiny_mmdit_inputs,
    token_pruning,
)

BATCH, TEXT_LEN, IMAGE_TOKENS = 3, TINY_MMDIT_TEXT_LEN, 16


def _sd3():
    """Four joint blocks (the last one context-pre-only, as in SD3); 4x4 image tokens."""
    return seeded_module(0, lambda: SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=24,
        pos_embed_max_size=16,
    ))


def _inputs(family, batch=BATCH, seed=0):
    if family == "wan":  # 4 latent frames of 4×4: a 4×2×2 grid of video tokens
        generator = torch.Generator().manual_seed(seed)
        return dict(hidden_states=torch.randn(batch, 4, 4, 4, 4, generator=generator),
                    encoder_hidden_states=torch.randn(batch, TEXT_LEN, 32, generator=generator),
                    timestep=torch.rand(batch, generator=generator) * 1000)
    return tiny_mmdit_inputs(family, batch, seed)


MODELS = {"sd3": _sd3, "flux": build_tiny_flux_transformer, "wan": lambda: build_tiny_wan_transformer(num_layers=4)}
FAMILIES = list(MODELS)


def _run(model, inputs):
    return model(**inputs, return_dict=False)[0]


def _blocks(model):
    return list(model.transformer_blocks) + list(getattr(model, "single_transformer_blocks", []))


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_is_the_dense_model(family):
    model, inputs = MODELS[family](), _inputs(family)
    with torch.no_grad():
        dense = _run(model, inputs)
        with token_pruning(model, family, TokenPruning(layers=(0, 1, 2), keep_ratio=1.0)) as pruner:
            pruned = _run(model, inputs)
        assert all(p.shape == (BATCH, IMAGE_TOKENS) for p in pruner.kept_positions)
    torch.testing.assert_close(pruned, dense, atol=1e-5, rtol=0)
    # removing the pruner restores the plain forward and FLUX's own attention processors
    assert "forward" not in model.__dict__
    assert all(type(p) is FluxAttnProcessor for p in model.attn_processors.values()) or family != "flux"
    with torch.no_grad():
        torch.testing.assert_close(_run(model, inputs), dense, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_kept_tokens_are_the_largest_updates_and_pruned_tokens_keep_their_state(family):
    model, inputs = MODELS[family](), _inputs(family)
    layers = (0, 2)
    captured = {}
    hooks = [
        _blocks(model)[layer].register_forward_hook(
            lambda module, args, output, layer=layer: captured.__setitem__(layer, (args[0], output[1]))
        )
        for layer in (*layers, 1, 3)
    ]
    hooks.append(model.norm_out.register_forward_pre_hook(lambda module, args: captured.__setitem__("final", args[0])))
    with torch.no_grad(), token_pruning(model, family, TokenPruning(layers=layers, keep_ratio=0.5)) as pruner:
        output = _run(model, inputs)
    for hook in hooks:
        hook.remove()

    assert output.shape == inputs["hidden_states"].shape
    assert [p.shape[1] for p in pruner.kept_positions] == [8, 4]
    # blocks after a pruning layer see the kept image tokens only (text passes in full, FLUX's single blocks too)
    assert captured[1][0].shape[1] == 8 and captured[3][0].shape[1] == 4
    final = captured["final"]
    active = torch.arange(IMAGE_TOKENS).expand(BATCH, -1)
    for layer, kept in zip(layers, pruner.kept_positions):
        block_input, block_output = captured[layer]
        scores = (block_output - block_input).norm(dim=-1)
        top = scores.topk(kept.shape[1], dim=1).indices.sort(dim=1).values
        assert torch.equal(active.gather(1, top), kept)
        for b in range(BATCH):
            dropped = ~torch.isin(active[b], kept[b])
            torch.testing.assert_close(final[b, active[b][dropped]], block_output[b, dropped], atol=0, rtol=0)
            assert not torch.allclose(final[b, kept[b]], block_output[b, torch.isin(active[b], kept[b])])
        active = kept


def test_flux_rope_rows_follow_the_kept_tokens():
    model, inputs = build_tiny_flux_transformer(), _inputs("flux")
    txt_ids, img_ids = inputs["txt_ids"], inputs["img_ids"]
    with torch.no_grad(), token_pruning(model, "flux", TokenPruning(layers=(1,), keep_ratio=0.5)) as pruner:
        pruned = _run(model, inputs)
    positions = pruner.kept_positions[0]

    with torch.no_grad():
        # gathering rows of the full table = the table of the gathered ids, per sample
        cos, sin = gather_rotary(model.pos_embed(torch.cat([txt_ids, img_ids])), TEXT_LEN, positions)
        for b in range(BATCH):
            own_cos, own_sin = model.pos_embed(torch.cat([txt_ids, img_ids[positions[b]]]))
            torch.testing.assert_close(cos[b], own_cos, atol=0, rtol=0)
            torch.testing.assert_close(sin[b], own_sin, atol=0, rtol=0)

        # the pruned forward = diffusers' own blocks run sample by sample on the kept tokens and their ids
        image = model.x_embedder(inputs["hidden_states"])
        temb = model.time_text_embed(inputs["timestep"] * 1000, inputs["guidance"] * 1000, inputs["pooled_projections"])
        text = model.context_embedder(inputs["encoder_hidden_states"])
        rotary = model.pos_embed(torch.cat([txt_ids, img_ids]))
        for block in model.transformer_blocks:
            text, image = block(image, text, temb, rotary)
        image = image.clone()
        for b in range(BATCH):
            kept = positions[b]
            text_b, image_b = text[b : b + 1], image[b : b + 1, kept]
            rotary_b = model.pos_embed(torch.cat([txt_ids, img_ids[kept]]))
            for block in model.single_transformer_blocks:
                text_b, image_b = block(image_b, text_b, temb[b : b + 1], rotary_b)
            image[b, kept] = image_b[0]
        manual = model.proj_out(model.norm_out(image, temb))
    torch.testing.assert_close(pruned, manual, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_sample_is_pruned_on_its_own(family):
    """A sample's prediction does not depend on its batch-mates: rollouts and recomputation batch differently."""
    model, inputs = MODELS[family](), _inputs(family)
    with torch.no_grad(), token_pruning(model, family, TokenPruning(layers=(0, 2), keep_ratio=0.5)) as pruner:
        batched = _run(model, inputs)
        kept = [p.clone() for p in pruner.kept_positions]
        for b in range(BATCH):
            alone = {k: v[b : b + 1] if k not in ("img_ids", "txt_ids") else v for k, v in inputs.items()}
            torch.testing.assert_close(_run(model, alone), batched[b : b + 1], atol=1e-5, rtol=1e-5)
            assert all(torch.equal(p[0], q[b]) for p, q in zip(pruner.kept_positions, kept))


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_lora_before_and_after_the_pruning_layer(family):
    model, inputs = MODELS[family](), _inputs(family)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    apply_token_pruning(model, family, TokenPruning(layers=(1,), keep_ratio=0.5))

    def lora_grads():
        model.zero_grad()
        _run(model, inputs).square().mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    grads = lora_grads()
    assert all(torch.isfinite(g).all() for g in grads.values())
    for block in ("0", "2"):  # before and after the pruning layer (FLUX's block 2 is its first single block)
        prefix = "transformer_blocks." + block if family == "sd3" or block == "0" else "single_transformer_blocks.0"
        prefix = "blocks." + block if family == "wan" else prefix
        assert any(g.abs().sum() > 0 for name, g in grads.items() if name.startswith(prefix + ".") and "lora_B" in name)

    model.enable_gradient_checkpointing()
    for name, grad in lora_grads().items():
        torch.testing.assert_close(grad, grads[name], atol=1e-6, rtol=1e-5)


def test_refresh_every_reuses_keep_sets_for_same_shape_calls():
    model = _sd3()
    setting = dict(layers=(0, 2), keep_ratio=0.5)
    fresh_model = _sd3()
    fresh = apply_token_pruning(fresh_model, "sd3", TokenPruning(**setting))

    def kept_positions(pruner, target, seed, batch=BATCH):
        with torch.no_grad():
            _run(target, _inputs("sd3", batch, seed))
        return [p.clone() for p in pruner.kept_positions]

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b))

    pruner = apply_token_pruning(model, "sd3", TokenPruning(**setting, refresh_every=3))
    first = kept_positions(pruner, model, seed=1)
    assert same(first, kept_positions(fresh, fresh_model, seed=1))
    assert not same(first, kept_positions(fresh, fresh_model, seed=2))  # fresh ranking would differ ...
    assert same(kept_positions(pruner, model, seed=2), first)  # ... but calls 2 and 3 reuse call 1's sets
    assert same(kept_positions(pruner, model, seed=3), first)
    assert same(kept_positions(pruner, model, seed=4), kept_positions(fresh, fresh_model, seed=4))  # call 4 ranks

    # a new batch shape ranks afresh at once, as does reset()
    assert same(kept_positions(pruner, model, seed=5, batch=2), kept_positions(fresh, fresh_model, seed=5, batch=2))
    pruner.reset()
    assert same(kept_positions(pruner, model, seed=6, batch=2), kept_positions(fresh, fresh_model, seed=6, batch=2))


def test_rollout_log_probs_are_recomputed_exactly_with_pruning(sd3_policy):
    """Pruning in velocity() covers rollouts and recomputation alike: the first inner step stays on-policy."""
    apply_token_pruning(sd3_policy.transformer, "sd3", TokenPruning(layers=(0,), keep_ratio=0.5))
    recomputed, stored = rollout_and_recomputed_log_probs(sd3_policy)
    torch.testing.assert_close(recomputed, stored, atol=1e-5, rtol=0)


def test_policy_velocity_with_pruning(any_policy):
    latents = torch.randn(2, *any_policy.initial_noise(torch.Generator()).shape[1:],
                          generator=torch.Generator().manual_seed(0))
    sigmas, embeds = torch.tensor([0.9, 0.4]), any_policy.encode_prompts(["a red square", "two blue circles"])
    transformer = any_policy.transformer
    with torch.no_grad():
        dense = any_policy.velocity(latents, sigmas, embeds)
        with token_pruning(transformer, any_policy.family, TokenPruning(layers=(0,), keep_ratio=1.0)):
            torch.testing.assert_close(any_policy.velocity(latents, sigmas, embeds), dense, atol=1e-5, rtol=0)
        with token_pruning(transformer, any_policy.family, TokenPruning(layers=(0,), keep_ratio=0.5)):
            pruned = any_policy.velocity(latents, sigmas, embeds)
    assert pruned.shape == dense.shape and torch.isfinite(pruned).all()
    assert not torch.allclose(pruned, dense, atol=1e-4)


def test_a_deep_copy_prunes_with_its_own_weights():
    """A frozen KL reference made by deepcopy keeps the setting but runs its own blocks."""
    model, inputs = _sd3(), _inputs("sd3")
    apply_token_pruning(model, "sd3", TokenPruning(layers=(0,), keep_ratio=0.5))
    with torch.no_grad():
        before = _run(model, inputs)
        reference = copy.deepcopy(model)
        assert isinstance(reference.forward, TokenPruner) and reference.forward.transformer is reference
        torch.testing.assert_close(_run(reference, inputs), before, atol=0, rtol=0)
        reference.proj_out.bias.add_(1.0)
        assert not torch.allclose(_run(reference, inputs), before)
        torch.testing.assert_close(_run(model, inputs), before, atol=0, rtol=0)


def test_settings_are_validated():
    with pytest.raises(ValueError, match=r"keep_ratio must lie in \(0, 1\]"):
        TokenPruning(layers=(0,), keep_ratio=0.0)
    with pytest.raises(ValueError, match=r"keep_ratio must lie in \(0, 1\]"):
        TokenPruning(layers=(0,), keep_ratio=1.5)
    with pytest.raises(ValueError, match="refresh_every must be at least 1"):
        TokenPruning(layers=(0,), refresh_every=0)
    with pytest.raises(ValueError, match="distinct non-negative"):
        TokenPruning(layers=(1, 1))
    with pytest.raises(ValueError, match="distinct non-negative"):
        TokenPruning(layers=(-1,))
    assert TokenPruning(layers=[2, 0]).layers == (0, 2)

    model = _sd3()
    with pytest.raises(ValueError, match=r"this transformer has 4 blocks, so layers must lie in \[0, 2\]"):
        apply_token_pruning(model, "sd3", TokenPruning(layers=(3,), keep_ratio=0.5))
    with pytest.raises(ValueError, match="needs a FluxTransformer2DModel"):
        apply_token_pruning(model, "flux", TokenPruning(layers=(0,), keep_ratio=0.5))
    with pytest.raises(ValueError, match="supports the families"):
        apply_token_pruning(model, "sdxl", TokenPruning(layers=(0,), keep_ratio=0.5))
    assert apply_token_pruning(model, "sd3", TokenPruning()) is None and "forward" not in model.__dict__
    remove_token_pruning(model)  # a no-op without pruning
