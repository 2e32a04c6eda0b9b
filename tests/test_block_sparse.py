"""VSA-style block-sparse attention: tiling, top-k tile selection, gate, delta correction, and the SD3 / FLUX
processors (dense when every tile is kept, per-sample, on-policy, removable)."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel

from tempflow.attention.block_sparse import (
    BlockSparse,
    apply_block_sparse,
    joint_sparse_attention,
    remove_block_sparse,
    sparse_image_attention,
    tile_order,
    uses_block_sparse,
)
from tempflow.attention.pruning import TokenPruning, apply_token_pruning
from tempflow.testing import build_tiny_wan_transformer, rollout_and_recomputed_log_probs

GRID, TILE = (4, 8), (2, 2)  # 8 tiles of 4 tokens


def _qkv(batch=2, heads=3, tokens=32, text=5, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    image = [torch.randn(batch, heads, tokens, dim, generator=generator) for _ in range(3)]
    words = [torch.randn(batch, heads, text, dim, generator=generator) for _ in range(3)]
    return image, words


def test_tile_order_lists_tokens_tile_by_tile():
    order = tile_order((4, 4), (2, 2))
    assert order[:4].tolist() == [0, 1, 4, 5] and order[4:8].tolist() == [2, 3, 6, 7]
    assert sorted(order.tolist()) == list(range(16))
    video = tile_order((2, 4, 4), (2, 2, 2))
    assert video[:8].tolist() == [0, 1, 4, 5, 16, 17, 20, 21]
    with pytest.raises(ValueError, match="not divisible"):
        tile_order((4, 6), (4, 4))
    (q, k, v), _ = _qkv(tokens=32)
    with pytest.raises(ValueError, match="do not fill the token grid"):
        sparse_image_attention(q, k, v, None, None, (8, 8), BlockSparse(0.5, TILE, kernel="torch"))


def test_every_tile_kept_is_dense_attention():
    (q, k, v), (tq, tk, tv) = _qkv()
    sparse = BlockSparse(density=1.0, tile=TILE, kernel="torch")
    image_out, text_out = joint_sparse_attention((q, k, v), (tq, tk, tv), GRID, sparse)
    keys, values = torch.cat([tk, k], dim=2), torch.cat([tv, v], dim=2)
    torch.testing.assert_close(image_out, F.scaled_dot_product_attention(q, keys, values), atol=1e-5, rtol=0)
    torch.testing.assert_close(text_out, F.scaled_dot_product_attention(tq, keys, values), atol=1e-5, rtol=0)


def test_unselected_tiles_do_not_reach_a_query_tile_but_text_always_does():
    (q, k, v), (_, tk, tv) = _qkv(batch=1, heads=1)
    sparse = BlockSparse(density=0.25, tile=TILE, kernel="torch")  # 2 of 8 tiles
    out = sparse_image_attention(q, k, v, tk, tv, GRID, sparse)
    order = tile_order(GRID, TILE)
    first_tile = order[:4]
    # the tiles the first query tile picked, recomputed from the tile means
    means = [x[:, :, order].unflatten(2, (8, 4)).mean(3) for x in (q, k)]
    picked = (means[0] @ means[1].transpose(-1, -2))[0, 0, 0].topk(2).indices.tolist()
    unpicked = [t for t in range(8) if t not in picked]
    v_changed = v.clone()
    v_changed[:, :, order.view(8, 4)[unpicked].flatten()] += 10.0
    out_changed = sparse_image_attention(q, k, v_changed, tk, tv, GRID, sparse)
    torch.testing.assert_close(out_changed[:, :, first_tile], out[:, :, first_tile], atol=1e-6, rtol=0)
    tv_changed = tv + 1.0
    out_text = sparse_image_attention(q, k, v, tk, tv_changed, GRID, sparse)
    assert (out_text[:, :, first_tile] - out[:, :, first_tile]).abs().min() > 1e-3
    assert not torch.allclose(sparse_image_attention(q, k, v, tk, tv, GRID, BlockSparse(1.0, TILE, kernel="torch")), out)


def test_delta_correction_makes_each_anchor_exact():
    (q, k, v), (_, tk, tv) = _qkv(seed=1)
    sparse = BlockSparse(density=0.25, tile=TILE, delta_correction=True, kernel="torch")
    out = sparse_image_attention(q, k, v, tk, tv, GRID, sparse)
    dense = F.scaled_dot_product_attention(q, torch.cat([tk, k], 2), torch.cat([tv, v], 2))
    anchors = tile_order(GRID, TILE).view(8, 4)[:, 2]  # the middle token (index T // 2) of each tile
    torch.testing.assert_close(out[:, :, anchors], dense[:, :, anchors], atol=1e-5, rtol=0)
    plain = sparse_image_attention(q, k, v, tk, tv, GRID, BlockSparse(0.25, TILE, kernel="torch"))
    assert (plain - dense).abs().mean() > (out - dense).abs().mean()


def test_zero_gate_is_plain_top_k_and_the_gate_gets_a_gradient():
    (q, k, v), (_, tk, tv) = _qkv(seed=2)
    sparse = BlockSparse(density=0.25, tile=TILE, gate=True, kernel="torch")
    gate = torch.zeros(3, requires_grad=True)
    gated = sparse_image_attention(q, k, v, tk, tv, GRID, sparse, gate)
    plain = sparse_image_attention(q, k, v, tk, tv, GRID, BlockSparse(0.25, TILE, kernel="torch"))
    torch.testing.assert_close(gated, plain, atol=0, rtol=0)
    gated.square().sum().backward()
    assert gate.grad is not None and (gate.grad.abs() > 0).all()


def _sd3():
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=24,
        pos_embed_max_size=16, dual_attention_layers=(0,),
    ).eval()


def _flux():
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 4, 8),
    ).eval()


def _inputs(family, batch=3):
    generator = torch.Generator().manual_seed(1)
    sigmas = torch.rand(batch, generator=generator)
    context, text_len = torch.randn(batch, 5, 32, generator=generator), 5
    if family == "sd3":
        return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=generator), encoder_hidden_states=context,
                    pooled_projections=torch.randn(batch, 24, generator=generator), timestep=sigmas * 1000)
    if family == "wan":  # 4 latent frames of 8×8: a 4×4×4 token grid
        return dict(hidden_states=torch.randn(batch, 4, 4, 8, 8, generator=generator), encoder_hidden_states=context,
                    timestep=sigmas * 1000)
    return dict(hidden_states=torch.randn(batch, 16, 16, generator=generator), encoder_hidden_states=context,
                pooled_projections=torch.randn(batch, 16, generator=generator), timestep=sigmas,
                guidance=torch.full((batch,), 3.5), txt_ids=torch.zeros(text_len, 3),
                img_ids=FluxPipeline._prepare_latent_image_ids(batch, 4, 4, "cpu", torch.float32))


@pytest.mark.parametrize("family,build,grid,tile", [
    ("sd3", _sd3, (4, 4), (2, 2)), ("flux", _flux, (4, 4), (2, 2)),
    ("wan", build_tiny_wan_transformer, (4, 4, 4), (2, 2, 2)),  # video: 3-D tiles over frames × height × width
])
def test_processors_are_dense_at_full_density_sparse_below_and_removable(family, build, grid, tile):
    model, inputs = build(), _inputs(family)
    with torch.no_grad():
        dense = model(**inputs, return_dict=False)[0]
        apply_block_sparse(model, family, BlockSparse(1.0, tile, kernel="torch"), grid)
        assert uses_block_sparse(model)
        torch.testing.assert_close(model(**inputs, return_dict=False)[0], dense, atol=1e-5, rtol=0)

        apply_block_sparse(model, family, BlockSparse(0.25, tile, kernel="torch"), grid)
        sparse = model(**inputs, return_dict=False)[0]
        assert sparse.isfinite().all() and (sparse - dense).abs().max() > 1e-3
        one = model(**{k: v[:1] if k not in ("txt_ids", "img_ids") else v for k, v in inputs.items()},
                    return_dict=False)[0]
        torch.testing.assert_close(one, sparse[:1], atol=1e-5, rtol=0)  # a sample's output ignores its batch

        remove_block_sparse(model)
        assert not uses_block_sparse(model)
        torch.testing.assert_close(model(**inputs, return_dict=False)[0], dense, atol=0, rtol=0)


def test_only_chosen_layers_become_sparse_and_gates_are_parameters():
    model = _sd3()
    apply_block_sparse(model, "sd3", BlockSparse(0.5, (2, 2), layers=(1,), gate=True, kernel="torch"), (4, 4))
    gates = [name for name, _ in model.named_parameters() if name.endswith("processor.gate")]
    assert gates == ["transformer_blocks.1.attn.processor.gate"]
    with pytest.raises(ValueError, match="out of range"):
        apply_block_sparse(model, "sd3", BlockSparse(0.5, (2, 2), layers=(3,)), (4, 4))
    with pytest.raises(ValueError, match="not divisible"):
        apply_block_sparse(model, "sd3", BlockSparse(0.5, (3, 3)), (4, 4))


def test_token_pruning_and_block_sparse_refuse_each_other():
    model = _sd3()
    apply_block_sparse(model, "sd3", BlockSparse(0.5, (2, 2)), (4, 4))
    with pytest.raises(ValueError, match="block-sparse"):
        apply_token_pruning(model, "sd3", TokenPruning((0,), 0.5))
    remove_block_sparse(model)
    apply_token_pruning(model, "sd3", TokenPruning((0,), 0.5))
    with pytest.raises(ValueError, match="token pruning"):
        apply_block_sparse(model, "sd3", BlockSparse(0.5, (2, 2)), (4, 4))


def test_settings_are_validated():
    for bad in (dict(density=0.0), dict(density=1.5), dict(tile=(8,)), dict(layers=(1, 1)), dict(kernel="cuda")):
        with pytest.raises(ValueError, match="block-sparse"):
            BlockSparse(**bad)


def test_rollout_and_recomputation_agree_under_block_sparse(sd3_policy):
    """The same processors serve both passes, so the first inner step's ratio is exactly 1."""
    sd3_policy.set_block_sparse(BlockSparse(0.5, (2, 2), delta_correction=True, kernel="torch"))
    assert uses_block_sparse(sd3_policy.transformer)
    rollout, recomputed = rollout_and_recomputed_log_probs(sd3_policy)
    torch.testing.assert_close(recomputed, rollout, atol=1e-4, rtol=0)


def test_gates_train_with_the_lora_are_saved_beside_it_and_resume(tiny_sd3_dir, tmp_path):
    from safetensors.torch import load_file

    from tempflow.config import TempFlowGRPOConfig
    from tempflow.trainer import TempFlowGRPOTrainer

    prompts = [{"prompt": p} for p in ("a red square", "two blue circles")]

    def train(output_dir, steps, **extra):
        config = TempFlowGRPOConfig(
            output_dir=str(output_dir), model_name_or_path=tiny_sd3_dir, resolution=64, guidance_scale=1.0,
            num_inference_steps=4, num_generations=3, prompts_per_iteration=2, per_device_train_batch_size=6,
            lora_r=4, lora_alpha=8, learning_rate=1e-2, max_steps=steps, save_steps=1, reward_funcs=["brightness"],
            train_prompts="unused", eval_prompts=None, disable_progress_bar=True, max_sequence_length=16,
            block_sparse_density=0.5, block_sparse_tile=[2, 2], block_sparse_layers=[0, 1], block_sparse_gate=True,
            block_sparse_kernel="torch", attention_backend="sdpa", **extra,
        )
        trainer = TempFlowGRPOTrainer(config, train_prompts=prompts)
        trainer.train()
        return trainer

    trainer = train(tmp_path / "straight", 3)
    gates = trainer.policy.block_sparse_gates()
    assert len(gates) == 2 and all(g.abs().max() > 0 for g in gates.values())  # moved off their zero init
    saved = load_file(str(tmp_path / "straight" / "block_sparse_gates.safetensors"))
    assert saved.keys() == gates.keys()
    assert (tmp_path / "straight" / "checkpoint-2" / "block_sparse_gates.safetensors").is_file()

    train(tmp_path / "resumed", 2)
    resumed = train(tmp_path / "resumed", 3, resume_from_checkpoint="latest")
    for name, gate in resumed.policy.block_sparse_gates().items():
        torch.testing.assert_close(gate.detach(), saved[name], atol=1e-6, rtol=0)
