"""`tempflow check-recipe`: every shipped recipe matches the official run it claims up to the deviations it states;
a difference it does not state fails and is named (rewards and their conventions, prompt sets, LoRA dtype included);
the official records are well-formed; the per-process sizes in each recipe's header are the ones that keep its global
batch."""

import inspect
import re
from pathlib import Path

import pytest

from tempflow.config import parse_config
from tempflow.effective import EFFECTIVE_KEYS, REWARD_CONVENTION_DEFAULTS, resolve_lora_modules, reward_specs
from tempflow.model_configs import HUB_MODELS
from tempflow.recipe_check import OTHER_PROCESS_COUNTS, load_references, main, sizes_for

RECIPES = sorted(Path(__file__).parents[1].joinpath("recipes").glob("*.yaml"))
RECIPES_DIR = Path(__file__).parents[1] / "recipes"
SD35_GENEVAL = str(RECIPES_DIR / "sd35_geneval.yaml")
SD35_PICKSCORE = str(RECIPES_DIR / "sd35_pickscore.yaml")
ISSUE_37_KEYS = {"rewards", "train_prompts", "eval_prompts", "lora_dtype", "ema_updates_per_interval"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_passes_its_check(recipe, capsys):
    assert main([str(recipe)]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    config = parse_config(str(recipe), [])
    assert config.reference is not None  # every recipe says whether it reproduces an official run
    if config.reference != "none":
        assert out.splitlines()[-1].startswith("PASS")


def test_beta_back_at_ten_times_the_official_value_fails_naming_beta(capsys):
    assert main([SD35_GENEVAL, "--beta", "0.04"]) == 1
    out = capsys.readouterr().out
    assert "beta: recipe 0.04, reference 0.004" in out
    assert "config/dgx.py geneval_sd3_pr() @ 63e4def: `config.train.beta = 0.004`" in out
    assert out.splitlines()[-1].startswith("FAIL: 1 unstated difference")


def test_a_beta_in_the_other_kl_convention_is_converted_not_taken_at_face_value(capsys):
    """0.004 under noise_scale is 0.004·(−Δ) under step_variance: 3.7–25× weaker at SD3.5's 10 steps."""
    assert main([SD35_GENEVAL, "--kl_normalization", "noise_scale"]) == 1
    out = capsys.readouterr().out
    assert "kl_normalization: recipe 'noise_scale', reference 'step_variance'" in out
    match = re.search(r"the recipe's 0.004 \(noise_scale\) is ([\d.e-]+)\.\.([\d.e-]+) in step_variance", out)
    low, high = float(match[1]), float(match[2])
    assert low == pytest.approx(0.004 / 25, rel=0.05) and high == pytest.approx(0.004 / 3.7, rel=0.05)


def test_the_old_suffix_lora_targets_are_caught_on_sd35m_dual_attention(capsys):
    old_targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    assert main([SD35_GENEVAL, "--lora_target_modules", *old_targets]) == 1
    out = capsys.readouterr().out
    assert "lora_modules:" in out and "only the recipe's:" in out and ".attn2." in out


def test_the_sd3_default_lora_targets_are_the_official_modules_on_the_real_sd35m_names():
    from tempflow.policies import SD3Policy

    model = HUB_MODELS["stabilityai/stable-diffusion-3.5-medium"]
    official = load_references()["tempflow_grpo/geneval_sd3_pr"].values["lora_modules"]["value"]
    ours = resolve_lora_modules(model, list(SD3Policy.default_lora_target_modules))
    assert ours == resolve_lora_modules(model, official)
    assert ours and not any(".attn2." in name for name in ours)
    dual = model.transformer["dual_attention_layers"]
    assert len(resolve_lora_modules(model, ["to_q"])) == len(resolve_lora_modules(model, ["attn.to_q"])) + len(dual)


def test_the_flux_default_lora_targets_include_the_feed_forward_layers_of_both_streams():
    from tempflow.policies import FluxPolicy

    model = HUB_MODELS["black-forest-labs/FLUX.1-dev"]
    modules = resolve_lora_modules(model, list(FluxPolicy.default_lora_target_modules))
    for layer in ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"):
        assert sum(name.endswith(layer) for name in modules) == model.transformer["num_layers"]  # every double block
    official = load_references()["tempflow_grpo/flux_pr"].values["lora_modules"]["value"]
    assert modules == resolve_lora_modules(model, official)


def test_an_unneeded_deviation_fails_as_stale(capsys):
    assert main([SD35_GENEVAL, "--deviations", '{"beta": "we like it", "mixed_precision": "x", '
                 '"ema_updates_per_interval": "x"}']) == 1
    assert "stated deviation `beta` is not one" in capsys.readouterr().out


@pytest.mark.parametrize("arguments, message", [
    (["--reference", "flow_grpo/nonexistent"], "unknown reference 'flow_grpo/nonexistent'"),
    (["--deviations", '{"betta": "typo"}'], "`deviations` names unknown hyperparameters ['betta']"),
    (["--num-processes", "0"], "--num-processes must be at least 1"),
])
def test_bad_arguments_get_one_line_and_exit_2(arguments, message, capsys):
    assert main([SD35_GENEVAL, *arguments]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_recipe_that_does_not_parse_gets_one_line_and_exit_2(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("beta: [0.04\n")
    assert main([str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not valid YAML" in err and len(err.splitlines()) == 1
    unclaimed = tmp_path / "unclaimed.yaml"
    unclaimed.write_text("beta: 0.04\n")
    assert main([str(unclaimed)]) == 2
    assert "names no `reference`" in capsys.readouterr().err


def test_the_official_records_are_well_formed():
    references = load_references()
    assert {"tempflow_grpo/geneval_sd3_pr", "tempflow_grpo/pickscore_sd3_pr", "tempflow_grpo/flux_pr",
            "tempflow_grpo/pickscore_qwenimage_pr", "flow_grpo/geneval_sd3"} <= set(references)
    for reference in references.values():
        assert set(reference.values) <= set(EFFECTIVE_KEYS), reference.name
        assert ISSUE_37_KEYS <= set(reference.values), reference.name
        assert reference.model_name_or_path in HUB_MODELS
        for entry in [*reference.values.values(), reference.num_processes]:
            assert set(entry) <= {"value", "source", "line", "note"} and entry["line"], reference.name
            assert re.fullmatch(r"[0-9a-f]{40}", reference.sources[entry["source"]]["commit"]), reference.name


@pytest.mark.parametrize("recipe", [r for r in RECIPES if parse_config(str(r), []).recipe_num_processes],
                         ids=lambda p: p.name)
def test_recipe_headers_state_the_sizes_that_keep_the_global_batch(recipe):
    """The header's lines for 8 and for 1 process are what `tempflow check-recipe` computes; applied, they give the
    recipe's global rows and optimizer steps per iteration."""
    config = parse_config(str(recipe), [])
    derived_for = config.recipe_num_processes
    text = recipe.read_text()
    for count in OTHER_PROCESS_COUNTS:
        sizes = sizes_for(config, derived_for, count)
        assert f"#   {count} process{'es' if count > 1 else ''}: {sizes}\n" in text
        scaled = parse_config(str(recipe), sizes.split())
        assert scaled.rows_per_iteration * count == config.rows_per_iteration * derived_for
        assert scaled.optimizer_steps_per_iteration == config.optimizer_steps_per_iteration


def test_a_local_pipeline_is_checked_on_its_own_configs(tiny_sd3_dir, capsys):
    """A recipe pointed at a pipeline directory: the model's shape comes from its saved configs, not a hub id's."""
    tiny = str(Path(__file__).parents[1] / "recipes" / "tiny.yaml")
    assert main([tiny, "--reference", "tempflow_grpo/geneval_sd3_pr", "--num-processes", "1",
                 "--model_name_or_path", tiny_sd3_dir]) == 1
    out = capsys.readouterr().out
    assert f"model shape from: the configs in {tiny_sd3_dir}" in out
    assert "rows_per_iteration: recipe 18, reference 10368" in out
    assert "lora_modules" in out.split("same as the reference")[1].splitlines()[0]  # the same targets resolve alike


def _unstated(out: str) -> list[str]:
    """The keys listed under "differences the recipe does not state"."""
    section = out.split("differences the recipe does not state")[1].split("the same global batch")[0]
    return re.findall(r"^  (\w+): recipe", section, flags=re.M)


@pytest.mark.parametrize("recipe", ["sd35_pickscore.yaml", "sd35_nft_pickscore.yaml"])
def test_raw_pickscore_fails_where_the_official_run_divides_by_26(recipe, capsys):
    """Under a 1e-4 std floor, /26 changes the advantages (0.76x ours at a raw group std of 0.008): not a detail."""
    assert main([str(RECIPES_DIR / recipe), "--reward_kwargs", "{}"]) == 1
    out = capsys.readouterr().out
    assert _unstated(out) == ["rewards"]
    assert "recipe vs reference: PickScore raw vs /26" in out
    assert "flow_grpo/pickscore_scorer.py" in out and "`scores = scores" in out


def test_geneval_strict_fails_where_the_official_run_trains_on_partial_credit(capsys):
    assert main([SD35_GENEVAL, "--reward_funcs", "geneval_strict",
                 "--reward_kwargs", '{"geneval_strict": {"jpeg_quality": 75, "detector_bgr": true}}']) == 1
    out = capsys.readouterr().out
    assert _unstated(out) == ["rewards"]
    assert "GenEval strict 0/1 vs GenEval partial credit" in out


def test_geneval_without_the_official_clients_jpeg_and_channel_order_fails(capsys):
    assert main([SD35_GENEVAL, "--reward_kwargs", "{}"]) == 1
    out = capsys.readouterr().out
    assert _unstated(out) == ["rewards"]
    assert "scored as decoded vs JPEG-encoded at quality 75 before scoring" in out
    assert "in RGB for the detector vs with red and blue swapped for the detector" in out


def test_a_changed_reward_weight_fails_naming_rewards(capsys):
    assert main([SD35_PICKSCORE, "--reward_weights", "0.5"]) == 1
    out = capsys.readouterr().out
    assert _unstated(out) == ["rewards"] and "PickScore weight 0.5 vs weight 1.0" in out


@pytest.mark.parametrize("override, key, detail", [
    (["--train_prompts", "pickscore:test"], "train_prompts", "another prompt set"),
    (["--train_prompts", "prompts/pickscore_train.txt"], "train_prompts", "the recipe reads a file"),
    (["--eval_prompts", "geneval:benchmark"], "eval_prompts", "another prompt set"),
    (["--num_eval_prompts", "64"], "eval_prompts", "recipe '64 of pickscore:test', reference 'pickscore:test'"),
])
def test_a_changed_prompt_set_fails_naming_it(override, key, detail, capsys):
    assert main([SD35_PICKSCORE, *override]) == 1
    out = capsys.readouterr().out
    assert _unstated(out) == [key] and detail in out


def test_flux_lora_in_float32_fails_naming_lora_dtype(capsys):
    """The official FLUX script casts its LoRA to bf16; the recipe follows it, so float32 is a difference to state."""
    assert main([str(RECIPES_DIR / "flux_pickscore.yaml"), "--lora_dtype", "float32"]) == 1
    out = capsys.readouterr().out
    assert _unstated(out) == ["lora_dtype"]
    assert "lora_dtype: recipe 'float32', reference 'bfloat16'" in out and "FLUX train trick" in out


def test_the_check_never_builds_a_reward(monkeypatch, capsys):
    """Rewards are compared by name and arguments: an unregistered or unloadable reward still gets its check."""
    import tempflow.rewards

    def refuse(*args, **kwargs):
        raise AssertionError("check-recipe built a reward")

    monkeypatch.setattr(tempflow.rewards, "get_reward", refuse)
    assert main([SD35_GENEVAL]) == 0
    assert main([SD35_GENEVAL, "--reward_funcs", "not_registered_anywhere", "--reward_kwargs", "{}"]) == 1
    assert "not_registered_anywhere vs GenEval partial credit" in capsys.readouterr().out


def test_reward_specs_carry_the_conventions_and_weights(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("reward_funcs: [pickscore, geneval, brightness]\nreward_weights: [1.0, 0.5, 2.0]\n"
                      "reward_kwargs: {pickscore: {normalize: true}, geneval: {jpeg_quality: 75, detector_bgr: true}}\n")
    assert reward_specs(parse_config(str(recipe), [])) == [
        {"name": "brightness", "weight": 2.0},
        {"name": "geneval", "jpeg_quality": 75, "detector_bgr": True, "weight": 0.5},
        {"name": "pickscore", "scale": "1/26", "weight": 1.0},
    ]
    defaults = reward_specs(parse_config(str(recipe), ["--reward_kwargs", "{}"]))
    assert defaults[1] == {"name": "geneval", "jpeg_quality": None, "detector_bgr": False, "weight": 0.5}
    assert defaults[2]["scale"] == "1"


def test_the_compared_defaults_are_the_reward_classes_defaults():
    """REWARD_CONVENTION_DEFAULTS reads an argument a recipe leaves out as the reward would: hold it to the signatures of
    the rewards registered here (the GenEval ones once they are)."""
    import tempflow.rewards
    from tempflow.rewards import available

    checked = []
    for name, defaults in REWARD_CONVENTION_DEFAULTS.items():
        if name not in available():
            continue
        parameters = inspect.signature(tempflow.rewards._REGISTRY[name]).parameters
        assert {key: parameters[key].default for key in defaults} == defaults, name
        checked.append(name)
    assert "pickscore" in checked
