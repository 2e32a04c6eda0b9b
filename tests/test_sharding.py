"""FSDP2 glue without processes: the block classes each family shards (read from diffusers) and the error that names
them; the checkpoint's pickle-free state files (the launched FSDP2 runs are in test_distributed.py)."""

import pytest
import torch

from tempflow.sharding import block_classes
from tempflow.state_files import load_rng_state, load_tensors, save_rng_state, save_tensors


def test_each_family_shards_its_diffusers_blocks(sd3_policy, flux_policy, wan_policy, qwen_image_policy):
    expected = {
        "sd3": ["JointTransformerBlock"],
        "flux": ["FluxTransformerBlock", "FluxSingleTransformerBlock"],
        "wan": ["WanTransformerBlock"],
        "qwen_image": ["QwenImageTransformerBlock"],
    }
    for policy in (sd3_policy, flux_policy, wan_policy, qwen_image_policy):
        assert block_classes(policy.transformer, policy.family, None) == expected[policy.family]
    # a launch config may name them itself
    assert block_classes(flux_policy.transformer, "flux", ["FluxSingleTransformerBlock"]) == [
        "FluxSingleTransformerBlock"]


def test_an_unknown_block_class_is_named_with_the_ones_the_family_has(sd3_policy):
    with pytest.raises(ValueError, match="FSDP: model family sd3 has no block class FluxTransformerBlock; its "
                                         "transformer's block classes are: JointTransformerBlock"):
        block_classes(sd3_policy.transformer, "sd3", ["FluxTransformerBlock"])
    blocks = torch.nn.Sequential(torch.nn.Linear(2, 2))  # declares no blocks (no _no_split_modules)
    with pytest.raises(ValueError, match="model family custom declares no block classes to shard"):
        block_classes(blocks, "custom", None)


def test_a_state_round_trips_its_tensors_and_scalars(tmp_path):
    saved = [torch.randn(3, 2), torch.arange(5.0)]
    save_tensors(tmp_path, "ema", 1, saved, {"optimization_step": 7})
    assert (tmp_path / "tensor_state" / "ema" / "part-1.safetensors").is_file()
    loaded = [torch.zeros(3, 2), torch.zeros(5)]
    assert load_tensors(tmp_path, "ema", 1, loaded) == {"optimization_step": 7}
    for a, b in zip(saved, loaded):
        torch.testing.assert_close(a, b)
    with pytest.raises(FileNotFoundError, match="resumes on the process count that wrote it"):
        load_tensors(tmp_path, "ema", 0, loaded)
    with pytest.raises(ValueError, match="holds 2 tensors; this run's ema has 1"):
        load_tensors(tmp_path, "ema", 1, loaded[:1])


def test_rng_states_round_trip_without_pickle(tmp_path):
    import random

    import numpy as np

    (tmp_path / "random_states_0.pkl").write_bytes(b"accelerate's pickle")
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_rng_state(tmp_path, 0)
    assert not (tmp_path / "random_states_0.pkl").exists()  # replaced, not kept beside
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    load_rng_state(tmp_path, 0)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
