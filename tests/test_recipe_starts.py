"""Every shipped recipe starts: one CPU training iteration of each ``recipes/*.yaml`` (found by glob, so a new recipe
is covered without touching this file) through ``tempflow train`` (:func:`tempflow.cli.main`), exit 0, its LoRA
weights written, and its rewards computed by the recipe's own reward functions.

What each recipe keeps and what it gets instead:

- its model: a tiny random pipeline of its own family (the recipe's ``model_family``, else its hub id's entry in
  :data:`tempflow.model_configs.HUB_MODELS`, else the family auto-detection reads), saved and loaded through
  ``from_pretrained`` (tests/conftest.py). A family no tiny pipeline covers fails the test.
- its rewards: the same reward classes with the recipe's names, weights and arguments, only their weight locations
  pointed at tiny random models saved with the real save calls and read by the rewards' own loaders. ``remote``
  is served by tempflow's reward server on loopback (the reward the recipe's header says it stands for), with the
  recipe's token handling (the client reads ``TEMPFLOW_REWARD_TOKEN``). A reward without a stand-in fails the test.
- its prompts: the official sets through the real downloader, from fixture files on loopback (tests/conftest.py
  ``official_prompt_sets``); ShapesWorld's ``shapes:*`` as they are. The image-editing recipes read local JSONL edit
  files that their users build or download (Flow-GRPO's ``dataset/counting_edit`` layout, or a JSONL of one's own
  edits) and point ``train_prompts`` / ``eval_prompts`` at: that documented user step is done here, with a small edit
  file and source images in a temporary folder in the layout the recipe's header describes.
- everything else as the recipe says, except the sizes and counts in :data:`CUTS`, each cut to the least that still
  runs the recipe's path.
"""

import contextlib
import json
import math
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_REWARD_CLIP, TINY_WAN_FRAMES, TINY_WAN_SIZE
from PIL import Image
from safetensors import safe_open

from tempflow.cli import main
from tempflow.config import TempFlowGRPOConfig, parse_config
from tempflow.model_configs import HUB_MODELS
from tempflow.policies import POLICY_CLASSES, FlowPolicy, infer_family
from tempflow.prompt_sets import OFFICIAL_PROMPT_SETS
from tempflow.registry import prompt_set_loader, resolve_pipeline
from tempflow.rewards import _REGISTRY, available, get_reward
from tempflow.rewards.remote import TOKEN_ENV
from tempflow.rewards.server import RewardServer

RECIPES = sorted(Path(__file__).parents[1].joinpath("recipes").glob("*.yaml"))

TINY_PIPELINES = {
    "sd3": "tiny_sd3_dir", "flux": "tiny_flux_dir", "flux_kontext": "tiny_flux_kontext_dir",
    "qwen_image": "tiny_qwen_image_dir", "qwen_image_edit": "tiny_qwen_image_edit_dir",
    "qwen_image_edit_plus": "tiny_qwen_image_edit_plus_dir", "wan": "tiny_wan_dir",
}
"""Model family -> the conftest fixture that saves its tiny random pipeline."""

IMAGE_SIZE = 32
"""Pixels per side of the tiny images: 2x2 tokens for every image family (SD3 and FLUX 2x2 patches of an 8x VAE's
latents; Qwen-Image 2x2-packed; FLUX and Qwen-Image need multiples of 16 px)."""
STEPS = 3
"""Rollout steps: two trainable steps (the last is never trained), so branching still has a choice of steps."""


def _side(family: str) -> int:
    return TINY_WAN_SIZE if POLICY_CLASSES[family].video else IMAGE_SIZE


def _rescaled_frames(config: TempFlowGRPOConfig, family: str) -> list[int] | None:
    if config.reward_frames is None:
        return None
    frames = config.num_frames or POLICY_CLASSES[family].default_num_frames
    return sorted({round(f % frames * (TINY_WAN_FRAMES - 1) / (frames - 1)) for f in config.reward_frames})


def _cut_branch_steps(steps: list[int] | None) -> list[int] | None:
    if steps is None:
        return None
    return [i for i in steps if i < STEPS - 1] or [0]


def _uses_approximate_attention(config: TempFlowGRPOConfig) -> bool:
    return bool(config.token_pruning_layers) or config.block_sparse_density < 1


# field -> its value for the run, from the recipe's config and the model family; None leaves the recipe's value
CUTS: dict[str, Callable[[TempFlowGRPOConfig, str], object]] = {
    # the smallest valid sample of the family (IMAGE_SIZE; Wan: 1 + 4k frames of 32 px, 3x2x2 tokens): sizes change
    # how much is computed, not which code runs. Precision, LoRA (rank, dtype, targets), EMA, gradient checkpointing,
    # the algorithm's settings, the fidelity switches, rollout_batch_size and report_to stay the recipe's
    "resolution": lambda c, family: _side(family),
    "width": lambda c, family: _side(family) if c.width or POLICY_CLASSES[family].video else None,
    "num_frames": lambda c, family: TINY_WAN_FRAMES if POLICY_CLASSES[family].video else None,
    # the frames the recipe's image rewards score, spread over the shorter video as over the recipe's
    "reward_frames": _rescaled_frames,
    # the source image's area as the edit model sees it, cut as the output size is (the path that sets it stays)
    "edit_condition_area": lambda c, family: c.edit_condition_area and IMAGE_SIZE * IMAGE_SIZE,
    # text tokens: the tiny encoders' prompts are a few words
    "max_sequence_length": lambda c, family: 16,
    # STEPS rollout steps and 2 evaluation steps: every step kind (ODE path, SDE children or trajectories, the
    # untrained last step) still occurs
    "num_inference_steps": lambda c, family: STEPS,
    "eval_num_inference_steps": lambda c, family: 2,
    # the recipe's branch steps that exist on the shorter grid (the first when none does)
    "branch_steps": lambda c, family: _cut_branch_steps(c.branch_steps),
    # a random subset of the branch steps stays a subset: 1 of the STEPS - 1
    "num_branch_steps_per_iteration": lambda c, family: c.num_branch_steps_per_iteration and 1,
    # children still finish on a coarser grid than the main path
    "child_num_inference_steps": lambda c, family: c.child_num_inference_steps and STEPS - 1,
    # an SDE window still leaves the last step out
    "sde_window_size": lambda c, family: c.sde_window_size and min(c.sde_window_size, STEPS - 2),
    "sde_window_range": lambda c, family: [0, 0] if c.sde_window_range else None,
    # groups of 2 are the smallest that have a spread to normalise; one prompt; up to 2 ODE paths per prompt keep
    # seed groups apart from prompt groups
    "num_generations": lambda c, family: 2,
    "prompts_per_iteration": lambda c, family: 1,
    "seeds_per_prompt": lambda c, family: min(c.seeds_per_prompt, 2),
    # micro-batches of 2 rows, 2 per optimizer step: accumulation, the optimizer step and (for branched recipes,
    # 8 rows) a second step still happen
    "per_device_train_batch_size": lambda c, family: 2,
    "gradient_accumulation_steps": lambda c, family: 2,
    # one iteration, with the evaluations before and after it on one held-out prompt, and the save at the end
    "max_steps": lambda c, family: 1,
    "num_eval_prompts": lambda c, family: 1,
    # a test shows no progress bars
    "disable_progress_bar": lambda c, family: True,
    # auto is dense on a CPU (nothing there predicts a GPU); a named dense kernel runs the recipe's block-sparse
    # attention or token pruning anyway, as auto does on a GPU where it pays
    "attention_backend": lambda c, family: "sdpa" if _uses_approximate_attention(c) else None,
    # one-token tiles: the smallest tile that divides the tiny token grid, with several tiles for the density to pick
    "block_sparse_tile": lambda c, family: [1] * len(c.block_sparse_tile) if c.block_sparse_density < 1 else None,
    # the tiny transformers have 2 blocks
    "block_sparse_layers": lambda c, family: [0] if c.block_sparse_layers else None,
    "token_pruning_layers": lambda c, family: [0] if c.token_pruning_layers else None,
}


def _open_clip(fixture) -> dict:
    return {"model_name": TINY_REWARD_CLIP, "pretrained": fixture("tiny_open_clip_weights")}


def _geneval(fixture) -> dict:
    # detector_resolution is a size: mmdetection's 800-1333 px input would cost seconds per image on the CPU
    return {"detector": fixture("tiny_geneval_detector_dir"), "clip_model": TINY_REWARD_CLIP,
            "clip_pretrained": fixture("tiny_open_clip_weights"), "detector_resolution": [64, 128]}


TINY_REWARD_WEIGHTS: dict[str, Callable[[Callable[[str], str]], dict]] = {
    "pickscore": lambda fixture: {"processor": fixture("tiny_pickscore_dir"), "model": fixture("tiny_pickscore_dir")},
    "geneval": _geneval,
    "geneval_strict": _geneval,
    "edit_consistency": _open_clip,
    "edit_direction": _open_clip,
    "clip_score": _open_clip,
}
"""Reward name -> where its tiny random weights are (the reward's constructor arguments that name them), from the
conftest fixtures. Rewards registered as plain functions load no weights and run as they are."""


JUDGED: list[int] = []
"""Batch sizes :func:`judge_edit` was called with."""


def judge_edit(images, prompts, source_images, **metadata):
    """Stands in for recipes/flux_kontext_vlm_judge.yaml's VLM judge (its header's ``my_judge:score``): a graded
    score of each edit from its output and source image, 1 for an output equal to its source."""
    JUDGED.append(len(images))
    return (1 - (images - source_images).abs().mean(dim=(1, 2, 3))).tolist()


SERVED_BY_REMOTE = {"flux_kontext_vlm_judge": (f"{__name__}:judge_edit", {})}
"""Recipe -> what its ``remote`` reward stands for, as ``tempflow serve-reward NAME --reward-kwargs`` takes it."""


def recipe_family(config: TempFlowGRPOConfig) -> str:
    if config.model_family != "auto":
        return config.model_family
    if config.model_name_or_path in HUB_MODELS:
        return HUB_MODELS[config.model_name_or_path].family
    return infer_family(resolve_pipeline(config.model_name_or_path))


def _arguments(field: str, value) -> list[str]:
    if isinstance(value, bool):
        return [f"--{field}", str(value).lower()]
    if isinstance(value, list):
        return [f"--{field}", *map(str, value)]
    if isinstance(value, dict):
        return [f"--{field}", json.dumps(value)]
    return [f"--{field}", str(value)]


EDIT_ROWS = [
    {"tag": "counting", "include": [{"class": "apple", "count": 3}], "exclude": [{"class": "apple", "count": 4}],
     "prompt": "add two apples next to the apple"},
    {"tag": "counting", "include": [{"class": "kite", "count": 2}], "exclude": [{"class": "kite", "count": 3}],
     "prompt": "add a second kite to the sky"},
]
"""Counting edits in Flow-GRPO's counting_edit layout (the instruction as ``prompt``, GenEval metadata); invented."""


def write_edit_prompts(path: Path, geneval_rows: bool) -> None:
    """A JSONL of edits at ``path`` with their source images beside it in ``images/`` (paths relative to the file):
    Flow-GRPO's counting_edit rows (``prompt`` and GenEval metadata) for recipes scored by GenEval, else the
    ``{"image", "instruction"}`` rows of one's own edits."""
    (path.parent / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, row in enumerate(EDIT_ROWS):
        image = f"images/{path.stem}_{i}.png"
        pixels = torch.rand(40, 48, 3, generator=torch.Generator().manual_seed(i)).mul(255).byte().numpy()
        Image.fromarray(pixels).save(path.parent / image)
        record = {"image": image, **row} if geneval_rows else {"image": image, "instruction": row["prompt"]}
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")


@contextlib.contextmanager
def serving(name: str, kwargs: dict, token: str):
    """``tempflow serve-reward NAME --token TOKEN --port 0`` in a thread; yields the server."""
    server = RewardServer(get_reward(name, **kwargs), name, port=0, token=token)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _reward_kwargs(recipe: Path, config: TempFlowGRPOConfig, fixture, stack, monkeypatch) -> dict:
    """The recipe's reward arguments with each model reward's weights pointed at its tiny stand-in and ``remote``'s
    url at a local server; fails naming a reward that has neither."""
    kwargs = {name: dict(values) for name, values in config.reward_kwargs.items()}
    for name in dict.fromkeys([*config.reward_funcs, *config.eval_reward_funcs, *config.gold_reward_funcs]):
        if name == "remote":
            if recipe.stem not in SERVED_BY_REMOTE:
                pytest.fail(f"{recipe.name}: its `remote` reward stands for no reward in SERVED_BY_REMOTE")
            token = "recipe-test-secret"
            monkeypatch.setenv(TOKEN_ENV, token)  # the client's default, as the recipe leaves its token out
            server = stack.enter_context(serving(*SERVED_BY_REMOTE[recipe.stem], token))
            kwargs["remote"] = {**kwargs.get("remote", {}), "url": server.url}
        elif name in TINY_REWARD_WEIGHTS:
            kwargs[name] = {**kwargs.get(name, {}), **TINY_REWARD_WEIGHTS[name](fixture)}
        elif name not in available() or isinstance(_REGISTRY[name], type):
            pytest.fail(f"{recipe.name}: reward {name!r} has no tiny stand-in (TINY_REWARD_WEIGHTS)")
    return kwargs


def _prompt_arguments(config: TempFlowGRPOConfig, family: str, tmp_path: Path, fixture) -> list[str]:
    """Official prompt sets are served from fixtures (their names stay); local edit files are built in tmp_path at
    the recipe's relative paths and the recipe pointed at them."""
    arguments = []
    for field in ("train_prompts", "eval_prompts"):
        source = getattr(config, field)
        if source in OFFICIAL_PROMPT_SETS:
            fixture("official_prompt_sets")
        if source is None or prompt_set_loader(source) is not None:
            continue
        if not POLICY_CLASSES[family].edits or Path(source).is_absolute() or Path(source).suffix != ".jsonl":
            pytest.fail(f"prompt file {source!r} ({field}) is neither a registered prompt set nor an edit JSONL")
        path = tmp_path / "data" / source
        rewards = {*config.reward_funcs, *config.eval_reward_funcs, *config.gold_reward_funcs}
        write_edit_prompts(path, geneval_rows=bool({"geneval", "geneval_strict"} & rewards))
        arguments += [f"--{field}", str(path)]
    return arguments


def _record_calls(monkeypatch, owner: type, name: str, calls: list) -> None:
    original = getattr(owner, name)

    def recorded(self, *args):
        calls.append(args)
        return original(self, *args)

    monkeypatch.setattr(owner, name, recorded)


def train_one_iteration(recipe: Path, tmp_path: Path, request, monkeypatch) -> TempFlowGRPOConfig:
    """Run ``tempflow train RECIPE`` with the stand-ins and :data:`CUTS` into ``tmp_path / "run"``; returns the
    recipe's own config. Fails naming the recipe's model or reward when the test has no stand-in for it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the recipe's own size warnings, before the cuts
        config = parse_config(str(recipe))
    try:
        family = recipe_family(config)
    except (ValueError, FileNotFoundError) as err:
        pytest.fail(f"{recipe.name}: {err}")
    if family not in TINY_PIPELINES:
        pytest.fail(f"{recipe.name}: model family {family!r} ({config.model_name_or_path}) has no tiny pipeline")
    fixture = request.getfixturevalue
    overrides = ["--output_dir", str(tmp_path / "run")]
    for field, cut in CUTS.items():
        value = cut(config, family)
        if value is not None:
            overrides += _arguments(field, value)
    overrides += _prompt_arguments(config, family, tmp_path, fixture)
    with contextlib.ExitStack() as stack:
        overrides += _arguments("reward_kwargs", _reward_kwargs(recipe, config, fixture, stack, monkeypatch))
        overrides += ["--model_name_or_path", fixture(TINY_PIPELINES[family])]
        assert main(["train", str(recipe), *overrides]) == 0
    return config


@pytest.mark.filterwarnings("ignore:this recipe's per-process sizes were derived for")
@pytest.mark.filterwarnings("ignore::tempflow.prompt_sets.UnpinnedDigestWarning")  # hpsv2:*, as for a user
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.stem)
def test_recipe_starts(recipe, tmp_path, request, monkeypatch):
    approximations = []
    for method in ("set_block_sparse", "set_token_pruning"):
        _record_calls(monkeypatch, FlowPolicy, method, approximations)
    JUDGED.clear()
    config = train_one_iteration(recipe, tmp_path, request, monkeypatch)

    run = tmp_path / "run"
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["iterations"] == 1 and (run / "checkpoint-1").is_dir()
    metrics = summary["history"][0]
    weights = config.reward_weights or [1.0] * len(config.reward_funcs)
    components = [metrics[f"reward/{name}"] for name in config.reward_funcs]
    assert all(math.isfinite(value) for value in components)
    assert metrics["reward/mean"] == pytest.approx(sum(w * v for w, v in zip(weights, components)), rel=1e-4, abs=1e-6)
    assert all(f"eval/{name}" in summary["final"] for name in [*config.reward_funcs, *config.eval_reward_funcs])
    if "remote" in config.reward_funcs:
        assert JUDGED, "the reward server scored nothing"
    if _uses_approximate_attention(config):
        assert [value for (value,) in approximations if value is not None], "the recipe's attention was not installed"

    with safe_open(str(run / "pytorch_lora_weights.safetensors"), "pt") as lora:
        tensors = {key: lora.get_tensor(key) for key in lora.keys()}
    assert tensors and {t.dtype for t in tensors.values()} == {getattr(torch, config.lora_dtype)}
    assert {t.shape[0] for key, t in tensors.items() if "lora_A" in key} == {config.lora_r}


@pytest.mark.parametrize("fields, named", [
    ({"model_name_or_path": "acme/painter-xl"}, "acme/painter-xl"),
    ({"reward_funcs": ["brightness", "hpsv2"], "reward_kwargs": {"hpsv2": {"checkpoint": "hps.pt"}}}, "'hpsv2'"),
    ({"reward_funcs": ["remote"], "reward_kwargs": {"remote": {"url": "http://127.0.0.1:8000"}}}, "`remote`"),
], ids=["model", "reward", "remote"])
def test_a_recipe_without_a_stand_in_fails_naming_it(fields, named, tmp_path, request, monkeypatch):
    recipe = tmp_path / "new_recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model_name_or_path": "shapes", **fields}))
    with pytest.raises(pytest.fail.Exception, match=f"new_recipe.yaml: .*{named}"):
        train_one_iteration(recipe, tmp_path, request, monkeypatch)
    assert not (tmp_path / "run").exists()
