"""The reward registry, user rewards by import path, the combined reward and the model-free built-ins."""

import math
import sys

import pytest
import torch

from tempflow.rewards import available, get_reward, register_reward, to_pil, to_uint8
from tempflow.rewards.combined import CombinedReward, RewardError


def test_builtins_are_registered():
    names = available()
    for name in ("brightness", "jpeg_compressibility", "jpeg_incompressibility", "shapes", "shapes_strict"):
        assert name in names


def test_a_broken_builtin_module_leaves_the_other_rewards_working(tmp_path, monkeypatch):
    """A built-in reward module whose dependency is missing must not take `brightness` down with it."""
    import tempflow.rewards as registry

    (tmp_path / "broken_builtin_reward.py").write_text("import surely_not_installed_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_BUILTIN_MODULES", ("broken_builtin_reward", *registry._BUILTIN_MODULES))
    monkeypatch.setattr(registry, "_BROKEN_BUILTINS", {})
    assert get_reward("brightness")(torch.ones(1, 3, 4, 4), ["p"]) == [1.0]
    with pytest.raises(ValueError, match="unknown reward 'x'.*broken_builtin_reward failed to import "
                                         "\\(ModuleNotFoundError: No module named 'surely_not_installed_anywhere'"):
        get_reward("x")
    sys.modules.pop("broken_builtin_reward", None)


def test_simple_rewards_behave():
    dark, bright = torch.zeros(1, 3, 32, 32), torch.ones(1, 3, 32, 32)
    noisy = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    images = torch.cat([dark, bright, noisy])
    assert get_reward("brightness")(images, ["p"] * 3) == pytest.approx([0.0, 1.0, noisy.mean().item()], abs=1e-6)
    compress = get_reward("jpeg_compressibility")(images, ["p"] * 3)
    assert compress[2] < compress[0]  # noise compresses worst
    assert get_reward("jpeg_incompressibility")(images, ["p"] * 3) == pytest.approx([-c for c in compress])


def test_user_reward_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_user_rewards.py").write_text(
        "def redness(images, prompts, **metadata):\n"
        "    return (images[:, 0] - images[:, 1:].mean(1)).mean(dim=(1, 2)).tolist()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = get_reward("my_user_rewards:redness")
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1
    assert reward(red, ["x"]) == [1.0]
    sys.modules.pop("my_user_rewards", None)


def test_unknown_rewards_say_what_is_wrong():
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        get_reward("nope")
    with pytest.raises(ValueError, match="cannot import module"):
        get_reward("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="has no attribute"):
        get_reward("math:no_such_function")


def test_registered_classes_are_instantiated_with_arguments():
    @register_reward("_test_scaled")
    class Scaled:
        def __init__(self, factor=1.0):
            self.factor = factor

        def __call__(self, images, prompts, **metadata):
            return [self.factor] * len(prompts)

    assert get_reward("_test_scaled", factor=3.0)(torch.zeros(2, 3, 4, 4), ["a", "b"]) == [3.0, 3.0]
    with pytest.raises(ValueError, match="already registered"):
        register_reward("_test_scaled")(lambda *a, **k: [])


def test_combined_reward_weights_and_components():
    reward = CombinedReward({"one": lambda im, p, **m: [1.0] * len(p), "idx": lambda im, p, **m: list(range(len(p)))},
                            weights=[2.0, 0.5])
    total, parts = reward(torch.zeros(3, 3, 4, 4), ["a", "b", "c"])
    torch.testing.assert_close(total, torch.tensor([2.0, 2.5, 3.0]))
    assert set(parts) == {"one", "idx"}


def test_combined_reward_errors_name_the_reward():
    def raises(images, prompts, **metadata):
        raise RuntimeError("model exploded")

    images = torch.zeros(2, 3, 4, 4)
    with pytest.raises(RewardError, match="'boom' raised RuntimeError: model exploded"):
        CombinedReward({"boom": raises})(images, ["a", "b"])
    with pytest.raises(RewardError, match="'short' returned 1 scores for 2 images"):
        CombinedReward({"short": lambda im, p, **m: [1.0]})(images, ["a", "b"])
    with pytest.warns(UserWarning, match="boom"):
        total, _ = CombinedReward({"boom": raises}, error_policy="skip")(images, ["a", "b"])
    assert torch.isnan(total).all()
    with pytest.warns(UserWarning, match="'inf'"):
        total, _ = CombinedReward({"inf": lambda im, p, **m: [math.inf, 1.0]}, error_policy="skip")(images, ["a", "b"])
    assert math.isnan(total[0]) and total[1] == 1.0


def test_image_conversions():
    images = torch.rand(2, 3, 5, 7)
    arrays = to_uint8(images)
    assert arrays.shape == (2, 5, 7, 3) and arrays.dtype.name == "uint8"
    assert to_pil(images)[0].size == (7, 5)


def test_slow_rewards_time_out_by_policy():
    import time

    def slow(images, prompts, **metadata):
        time.sleep(2)
        return [1.0] * len(prompts)

    images = torch.zeros(2, 3, 4, 4)
    start = time.perf_counter()
    with pytest.raises(RewardError, match="'slow' raised TimeoutError: no scores after 0.2 s"):
        CombinedReward({"slow": slow}, timeout=0.2)(images, ["a", "b"])
    assert time.perf_counter() - start < 1.5
    with pytest.warns(UserWarning, match="slow"):
        total, _ = CombinedReward({"slow": slow}, error_policy="skip", timeout=0.2)(images, ["a", "b"])
    assert torch.isnan(total).all()
    fast, _ = CombinedReward({"fast": lambda im, p, **m: [2.0] * len(p)}, timeout=5)(images, ["a", "b"])
    assert fast.tolist() == [2.0, 2.0]
