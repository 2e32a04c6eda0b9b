"""Shared fixtures: tiny random SD3, FLUX, Qwen-Image and Wan pipelines saved once per session and loaded through the
real ``from_pretrained`` path, wrapped in their policies; tiny random reward models (PickScore's CLIP, an open-clip
CLIP, GenEval's Mask2Former) saved for the rewards' own loaders; and the official prompt sets served from fixture
files on loopback (``official_prompt_sets``)."""

import dataclasses
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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


GENEVAL_FIXTURE_ROWS = [
    {"tag": "single_object", "include": [{"class": "kite", "count": 1}], "prompt": "a photo of a kite"},
    {"tag": "two_object", "include": [{"class": "clock", "count": 1}, {"class": "vase", "count": 1}],
     "prompt": "a photo of a clock and a vase"},
    {"tag": "counting", "include": [{"class": "apple", "count": 3}], "exclude": [{"class": "apple", "count": 4}],
     "prompt": "a photo of three apples"},
    {"tag": "colors", "include": [{"class": "umbrella", "count": 1, "color": "green"}],
     "prompt": "a photo of a green umbrella"},
    {"tag": "position", "include": [{"class": "chair", "count": 1}, {"class": "cat", "count": 1,
                                                                       "position": ["left of", 0]}],
     "prompt": "a photo of a cat left of a chair"},
    {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"},
                                      {"class": "bird", "count": 1, "color": "blue"}],
     "prompt": "a photo of a red car and a blue bird"},
]
"""GenEval rows in the official files' structure (tag, include, exclude, prompt), one per task; invented prompts."""


class LoopbackFiles:
    """Files served over HTTP on 127.0.0.1 from a thread: ``files`` maps a URL path (no leading slash) to bytes.
    ``requests`` lists the paths asked for; ``delay`` seconds pass before each answer."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.requests, self.delay = files, [], 0.0
        served = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                served.requests.append(self.path)
                time.sleep(served.delay)
                body = served.files.get(self.path.lstrip("/"))
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self.server.shutdown()
            self.server.server_close()
            self._thread.join()


def _fixture_prompt_file(prompt_set) -> bytes:
    if prompt_set.format == "jsonl":
        return "".join(json.dumps(row) + "\n" for row in GENEVAL_FIXTURE_ROWS).encode()
    return "".join(f"{prompt_set.name} prompt {i}: a lighthouse in the rain, oil painting\n" for i in range(5)).encode()


@pytest.fixture
def official_prompt_sets(tmp_path, monkeypatch):
    """Every official prompt set (:mod:`tempflow.prompt_sets`) pointed at a small file of its format, served on
    loopback at its real repository/commit/path through ``TEMPFLOW_PROMPT_SETS_MIRROR``, with the file's own
    digests pinned the way the real set's are (sha256, git blob only, or none); ``TEMPFLOW_CACHE`` is a temporary
    folder and downloads are on. GenEval sets hold :data:`GENEVAL_FIXTURE_ROWS`. Yields the
    :class:`LoopbackFiles` server, with ``contents``: set name -> the bytes it serves for it."""
    from tempflow import prompt_sets

    contents, files = {}, {}
    for name, real in list(prompt_sets.OFFICIAL_PROMPT_SETS.items()):
        content = contents[name] = _fixture_prompt_file(real)
        files[f"{real.repository}/{real.commit}/{real.path}"] = content
        fixture = dataclasses.replace(
            real, size=len(content), count=content.count(b"\n"),
            sha256=hashlib.sha256(content).hexdigest() if real.sha256 else None,
            git_blob=prompt_sets.git_blob_id(content) if real.git_blob else None)
        monkeypatch.setitem(prompt_sets.OFFICIAL_PROMPT_SETS, name, fixture)
    server = LoopbackFiles(files)
    server.contents = contents
    monkeypatch.setenv("TEMPFLOW_CACHE", str(tmp_path / "tempflow-cache"))
    monkeypatch.setenv("TEMPFLOW_PROMPT_SETS_MIRROR", server.url)
    for variable in prompt_sets.OFFLINE_ENVS:
        monkeypatch.delenv(variable, raising=False)
    yield server
    server.stop()


# ----------------------------------------------------------------------------- tiny random reward models
# Random weights for the model-based rewards, saved where the rewards' own loaders read them (the recipe-start test
# points each recipe's rewards at these).

TINY_REWARD_CLIP = "tempflow-recipe-clip"
"""The open-clip architecture name that :func:`tiny_open_clip_weights` registers (16-d embeddings, 32 px)."""


@pytest.fixture(scope="session")
def tiny_pickscore_dir(tmp_path_factory):
    """A tiny random transformers ``CLIPModel`` and ``CLIPProcessor`` (open-clip's real BPE vocabulary) saved together
    with ``save_pretrained``: PickScore's processor and model locations."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from tempflow.testing import build_clip_tokenizer, seeded_module

    tokenizer = build_clip_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    model = seeded_module(0, lambda: CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)))
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer)
    directory = tmp_path_factory.mktemp("tiny-pickscore")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def tiny_open_clip_weights(tmp_path_factory):
    """A tiny random open-clip model registered as :data:`TINY_REWARD_CLIP`, its weights saved as safetensors (the
    file the open-clip rewards' ``pretrained`` and GenEval's ``clip_pretrained`` take). Returns the file's path."""
    import open_clip
    from safetensors.torch import save_file

    from tempflow.testing import seeded_module

    directory = tmp_path_factory.mktemp("tiny-open-clip-reward")
    config = {"embed_dim": 16,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (directory / f"{TINY_REWARD_CLIP}.json").write_text(json.dumps(config))
    open_clip.add_model_config(directory / f"{TINY_REWARD_CLIP}.json")
    model = seeded_module(0, lambda: open_clip.create_model(TINY_REWARD_CLIP, pretrained=None))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "clip.safetensors"))
    return str(directory / "clip.safetensors")


TINY_DETECTOR_CLASSES = {"apple": 12.0, "kite": 11.0, "cat": 10.0}
"""Classes the tiny detector's class head favours (logit biases), so that it finds a varying number of objects that
GenEval prompts ask for instead of nothing."""


@pytest.fixture(scope="session")
def tiny_geneval_detector_dir(tmp_path_factory):
    """A tiny random Mask2Former (Swin backbone, 8 queries) labelled with COCO's 80 classes as mmdetection spells
    them, saved with its image processor: GenEval's ``detector`` location. Its class head is scaled and biased
    towards :data:`TINY_DETECTOR_CLASSES` and its mask head scaled, so that detections pass GenEval's thresholds."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    from tempflow.rewards.geneval import DETECTOR_LABEL_ALIASES
    from tempflow.rewards.geneval_rules import OBJECT_NAMES
    from tempflow.testing import seeded_module

    coco_names = {geneval: coco for coco, geneval in DETECTOR_LABEL_ALIASES.items()}
    id2label = {i: coco_names.get(name, name) for i, name in enumerate(OBJECT_NAMES)}
    backbone = SwinConfig(image_size=64, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(  # widths of 32: the pixel decoder's group norms have 32 groups
        backbone_config=backbone, num_queries=8, hidden_dim=32, mask_feature_size=32, feature_size=32,
        encoder_layers=1, decoder_layers=2, num_attention_heads=2, dim_feedforward=32, encoder_feedforward_dim=32,
        id2label=id2label, label2id={label: i for i, label in id2label.items()}, use_pretrained_backbone=False,
    )
    model = seeded_module(0, lambda: Mask2FormerForUniversalSegmentation(config))
    with torch.no_grad():
        model.class_predictor.weight.mul_(20)
        model.class_predictor.bias.zero_()
        for name, bias in TINY_DETECTOR_CLASSES.items():
            model.class_predictor.bias[config.label2id[name]] = bias
        mask_head = model.model.transformer_module.decoder.mask_predictor.mask_embedder.get_submodule("2.0")
        mask_head.weight.mul_(1000)  # mask logits far from 0: a mask's mean sigmoid near 1
        mask_head.bias.mul_(1000)
    directory = tmp_path_factory.mktemp("tiny-geneval-detector")
    model.save_pretrained(directory)
    Mask2FormerImageProcessor(size={"shortest_edge": 32, "longest_edge": 64}).save_pretrained(directory)
    return str(directory)
