"""Model-based rewards (PickScore, CLIP score, HPSv2, LAION aesthetic, OCR) on tiny random models of the real
architectures, saved offline and loaded back through each reward's own loading code; scores must match the
published formula computed directly on the in-memory model."""

import json
import pickle
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tempflow.rewards import available, get_reward, to_pil
from tempflow.rewards.aesthetic import AestheticHead
from tempflow.rewards.ocr import levenshtein, quoted_text, text_similarity
from tempflow.rewards.pickscore import PICKSCORE_NORMALIZER
from tempflow.testing import seeded_module

BUILTINS = ("pickscore", "clip_score", "hpsv2", "edit_consistency", "edit_direction", "aesthetic", "ocr", "remote")
PROMPTS = ["a photo of a red circle", "a blue square", "two green triangles", "an empty gray image"]


@pytest.fixture(scope="module")
def images():
    """Four 40x48 images: noise, a gradient, and two solid colours (resized and cropped by each processor)."""
    noise = torch.rand(1, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    ramp = torch.linspace(0, 1, 48).expand(1, 3, 40, 48).clone()
    red = torch.zeros(1, 3, 40, 48)
    red[:, 0] = 0.9
    gray = torch.full((1, 3, 40, 48), 0.5)
    return torch.cat([noise, ramp, red, gray])


def _assert_scores(scores, count):
    assert isinstance(scores, list) and len(scores) == count
    assert all(isinstance(s, float) and np.isfinite(s) for s in scores)
    assert len(set(scores)) == count, "different (image, prompt) pairs got identical scores"


# ---------------------------------------------------------------------------------- transformers CLIP models


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    """A tiny ``CLIPModel`` and ``CLIPProcessor`` (real CLIP tokenizer) saved in one directory."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from tempflow.testing import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    model = seeded_module(0, lambda: CLIPModel(config))
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    directory = tmp_path_factory.mktemp("tiny-hf-clip")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return str(directory), model, processor


def _hf_embeddings(model, processor, images, prompts):
    from tempflow.rewards.loading import pooled

    with torch.no_grad():
        image_inputs = processor(images=to_pil(images), return_tensors="pt")
        text_inputs = processor(text=prompts, padding=True, return_tensors="pt")
        image_embeds = pooled(model.get_image_features(**image_inputs))
        text_embeds = pooled(model.get_text_features(**text_inputs))
    return image_embeds, text_embeds


def test_every_builtin_is_registered():
    names = available()
    assert all(name in names for name in BUILTINS)


def test_pickscore_is_logit_scale_times_cosine(hf_clip, images):
    directory, model, processor = hf_clip
    reward = get_reward("pickscore", processor=directory, model=directory, device="cpu")
    scores = reward(images, PROMPTS)
    _assert_scores(scores, len(PROMPTS))
    assert reward(images, PROMPTS) == scores

    image_embeds, text_embeds = _hf_embeddings(model, processor, images, PROMPTS)
    cosine = torch.nn.functional.cosine_similarity(image_embeds, text_embeds, dim=-1)
    assert scores == pytest.approx((model.logit_scale.exp() * cosine).tolist(), rel=1e-4, abs=1e-5)

    normalized = get_reward("pickscore", processor=directory, model=directory, normalize=True, device="cpu")
    assert normalized(images, PROMPTS) == pytest.approx([s / PICKSCORE_NORMALIZER for s in scores], rel=1e-6)


def test_pickscore_scores_each_image_with_its_own_prompt(hf_clip, images):
    directory, _, _ = hf_clip
    reward = get_reward("pickscore", processor=directory, model=directory, device="cpu")
    scores = reward(images, PROMPTS)
    order = [2, 0, 3, 1]
    assert reward(images[order], [PROMPTS[i] for i in order]) == pytest.approx(
        [scores[i] for i in order], rel=1e-5
    )
    assert reward(images[:1], PROMPTS[1:2]) != pytest.approx(
        scores[:1]
    )  # the prompt matters, not only the image


def test_aesthetic_is_the_mlp_on_normalised_image_embeddings(hf_clip, images, tmp_path):
    directory, model, processor = hf_clip
    head = seeded_module(1, lambda: AestheticHead(embed_dim=16))
    torch.save(head.state_dict(), tmp_path / "head.pth")
    save_file(head.state_dict(), str(tmp_path / "head.safetensors"))

    reward = get_reward("aesthetic", head=str(tmp_path / "head.pth"), clip_model=directory, device="cpu")
    scores = reward(images, PROMPTS)
    _assert_scores(scores, len(PROMPTS))
    image_embeds, _ = _hf_embeddings(model, processor, images, PROMPTS)
    with torch.no_grad():
        expected = head(image_embeds / image_embeds.norm(dim=-1, keepdim=True))
    assert scores == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-5)
    assert reward(images, ["another prompt"] * 4) == scores  # the aesthetic score ignores the prompt

    from_safetensors = get_reward("aesthetic", head=str(tmp_path / "head.safetensors"), clip_model=directory)
    assert from_safetensors(images, PROMPTS) == pytest.approx(scores, rel=1e-6)


def test_aesthetic_rejects_a_head_of_the_wrong_width(hf_clip, tmp_path):
    directory, _, _ = hf_clip
    torch.save(AestheticHead(embed_dim=768).state_dict(), tmp_path / "head768.pth")
    with pytest.raises(ValueError, match="expects 768-d embeddings"):
        get_reward("aesthetic", head=str(tmp_path / "head768.pth"), clip_model=directory, device="cpu")


# ------------------------------------------------------------------------------------------ open-clip models

TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


class _NotATensor:
    pass


@pytest.fixture(scope="module")
def open_clip_model(tmp_path_factory):
    """A tiny open-clip CLIP registered as ``tempflow-tiny-clip`` and saved as safetensors and as a
    DDP-style HPSv2 checkpoint (``{"state_dict": {"module.…": …}, "epoch": …}``)."""
    import open_clip

    directory = tmp_path_factory.mktemp("tiny-open-clip")
    (directory / "tempflow-tiny-clip.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(directory / "tempflow-tiny-clip.json")
    model = seeded_module(0, lambda: open_clip.create_model("tempflow-tiny-clip", pretrained=None))
    state_dict = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state_dict, str(directory / "clip.safetensors"))
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in state_dict.items()}, "epoch": 3}, directory / "hps.pt"
    )
    torch.save({"state_dict": state_dict, "payload": _NotATensor()}, directory / "unsafe.pt")
    return directory, model


def _open_clip_cosines(model, images, prompts):
    import open_clip

    _, _, preprocess = open_clip.create_model_and_transforms("tempflow-tiny-clip", pretrained=None)
    pixels = torch.stack([preprocess(image) for image in to_pil(images)])
    tokens = open_clip.get_tokenizer("tempflow-tiny-clip")(prompts)
    with torch.no_grad():
        out = model(pixels, tokens)
    image_features, text_features = (
        (out["image_features"], out["text_features"]) if isinstance(out, dict) else out[:2]
    )
    return (image_features @ text_features.T).diagonal()  # HPSv2's formula on normalised features


def test_clip_score_loads_a_local_weights_file(open_clip_model, images):
    directory, model = open_clip_model
    reward = get_reward(
        "clip_score", model_name="tempflow-tiny-clip", pretrained=str(directory / "clip.safetensors")
    )
    scores = reward(images, PROMPTS)
    _assert_scores(scores, len(PROMPTS))
    assert all(-1 <= s <= 1 for s in scores)
    assert scores == pytest.approx(_open_clip_cosines(model, images, PROMPTS).tolist(), rel=1e-4, abs=1e-5)
    assert reward(images, PROMPTS) == scores


def test_openai_clip_tags_are_built_with_the_quick_gelu_they_were_trained_with(monkeypatch):
    """open-clip 3 builds ``ViT-L-14`` with plain GELU and only warns when OpenAI's QuickGELU weights are loaded into
    it; the edit rewards' and GenEval's colour model (``ViT-L-14`` / ``openai``) must ask for QuickGELU."""
    import open_clip

    calls = []

    def record(model_name, pretrained=None, force_quick_gelu=False, **kwargs):
        calls.append((model_name, pretrained, force_quick_gelu))
        raise RuntimeError("stop before any download")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", record)
    for name, kwargs in [("edit_consistency", {}), ("clip_score", {}), ("clip_score", {"model_name": "ViT-B-32",
                                                                                         "pretrained": "openai"})]:
        with pytest.raises(RuntimeError, match="stop before"):
            get_reward(name, **kwargs)
    assert calls == [("ViT-L-14", "openai", True), ("ViT-H-14", "laion2b_s32b_b79k", False),
                     ("ViT-B-32", "openai", True)]


def test_edit_rewards_compare_the_output_with_its_source(open_clip_model, images):
    directory, model = open_clip_model
    weights = dict(model_name="tempflow-tiny-clip", pretrained=str(directory / "clip.safetensors"))
    consistency, direction = get_reward("edit_consistency", **weights), get_reward("edit_direction", **weights)
    sources = images.flip(0)
    image_features = _open_clip_image_features(model, images)
    source_features = _open_clip_image_features(model, sources)
    expected = (image_features * source_features).sum(-1)
    assert consistency(images, PROMPTS, source_images=sources) == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-5)
    assert consistency(images, PROMPTS, source_images=images) == pytest.approx([1.0] * len(PROMPTS), abs=1e-5)
    change = image_features - source_features
    text = _open_clip_text_features(model, PROMPTS)
    expected = (change * text).sum(-1) / change.norm(dim=-1)
    assert direction(images, PROMPTS, source_images=sources) == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-5)
    assert direction(images, PROMPTS, source_images=images) == [0.0] * len(PROMPTS)  # nothing changed
    with pytest.raises(ValueError, match="scores edits: its prompts need source images"):
        direction(images, PROMPTS)


def _open_clip_image_features(model, images):
    import open_clip

    _, _, preprocess = open_clip.create_model_and_transforms("tempflow-tiny-clip", pretrained=None)
    with torch.no_grad():
        return model.encode_image(torch.stack([preprocess(image) for image in to_pil(images)]), normalize=True)


def _open_clip_text_features(model, prompts):
    import open_clip

    with torch.no_grad():
        return model.encode_text(open_clip.get_tokenizer("tempflow-tiny-clip")(prompts), normalize=True)


def test_hpsv2_loads_a_ddp_checkpoint_and_matches_its_formula(open_clip_model, images):
    directory, model = open_clip_model
    reward = get_reward(
        "hpsv2", checkpoint=str(directory / "hps.pt"), model_name="tempflow-tiny-clip", device="cpu"
    )
    scores = reward(images, PROMPTS)
    _assert_scores(scores, len(PROMPTS))
    assert scores == pytest.approx(_open_clip_cosines(model, images, PROMPTS).tolist(), rel=1e-4, abs=1e-5)
    order = [3, 2, 1, 0]
    assert reward(images[order], [PROMPTS[i] for i in order]) == pytest.approx(scores[::-1], rel=1e-5)


def test_weight_files_are_never_unpickled(open_clip_model):
    directory, _ = open_clip_model
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        get_reward("hpsv2", checkpoint=str(directory / "unsafe.pt"), model_name="tempflow-tiny-clip")
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        get_reward("hpsv2", checkpoint=str(directory / "missing.pt"), model_name="tempflow-tiny-clip")


# ------------------------------------------------------------------------------------------------------- OCR


def test_text_distance_helpers():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == levenshtein("abc", "") == 3
    assert quoted_text('a neon sign that says "Open Late" at night') == "Open Late"
    assert quoted_text("a poster reading “SALE” in red") == "SALE"
    assert quoted_text("a photo of a cat") is None
    assert text_similarity("open late", "Open Late") == 1.0
    assert text_similarity("xx OPENLATE yy", "open late") == 1.0  # the target appears in the recognised text
    assert text_similarity("help", "hello") == pytest.approx(1 - 2 / 5)
    assert text_similarity("unrelated words", "hi") == 0.0


def test_ocr_reward_scores_recognised_text_against_the_quoted_target():
    def recognizer(image):
        assert image.dtype == np.uint8 and image.shape == (8, 8, 3)
        return "HELLO" if image.mean() > 127 else "help"

    reward = get_reward("ocr", recognizer=recognizer)
    images = torch.stack([torch.ones(3, 8, 8), torch.zeros(3, 8, 8), torch.ones(3, 8, 8)])
    prompts = ['a sign that says "hello"', 'a sign that says "hello"', "a sign without text"]
    assert reward(images, prompts) == [1.0, pytest.approx(0.6), None]


def test_ocr_without_a_backend_names_the_package(monkeypatch):
    monkeypatch.setitem(
        sys.modules, "easyocr", None
    )  # makes `import easyocr` fail even where it is installed
    with pytest.raises(ModuleNotFoundError, match="pip install easyocr"):
        get_reward("ocr")
