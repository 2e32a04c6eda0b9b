"""GenEval in process: its rules on hand-built detections, with expected values derived by hand from the official
evaluator (djghosh13/geneval evaluation/evaluate_images.py) and the official training reward server
(yifan123/reward-server reward_server/gen_eval.py evaluate_reward); the detector path on a tiny random Mask2Former
and the colour path on a tiny random open-clip model, both saved and loaded through the reward's own loading code;
the reward behind `tempflow serve-reward`."""

import contextlib
import io
import json
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tempflow.rewards import get_reward, to_uint8
from tempflow.rewards.geneval import COLOR_TEMPLATES, geneval_label_names, jpeg_roundtrip, mask_boxes
from tempflow.rewards.geneval_rules import (
    COLORS,
    OBJECT_NAMES,
    Detection,
    GenEvalThresholds,
    box_iou,
    check_metadata,
    geneval_correct,
    partial_credit,
    relative_position,
    select_detections,
)
from tempflow.rewards.remote import images_from_uint8
from tempflow.rewards.server import RewardServer
from tempflow.testing import seeded_module


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The models here are tiny: a second thread only adds synchronisation, which costs seconds per call when the
    CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def box(x1, y1, x2, y2, score=0.95):
    return Detection((x1, y1, x2, y2), score)


def colors_of(palette: dict):
    """A colour classifier that reads each detection's colour from ``palette`` (box → colour) and records what it
    was asked."""
    asked = []

    def classify(found, name):
        asked.append((name, len(found)))
        return [palette[d.box] for d in found]

    classify.asked = asked
    return classify


NO_COLORS = colors_of({})
CAT = {"tag": "single_object", "include": [{"class": "cat", "count": 1}]}
CAT_AND_DOG = {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]}
TWO_CLOCKS = {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}]}
RED_CAR = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
CAT_LEFT_OF_DOG = {"tag": "position", "include": [{"class": "dog", "count": 1},
                                                   {"class": "cat", "count": 1, "position": ["left of", 0]}]}
RED_CAR_BLUE_BUS = {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"},
                                                     {"class": "bus", "count": 1, "color": "blue"}]}


# ------------------------------------------------------------------------------------- selecting detections


def test_detections_above_the_threshold_most_confident_first():
    scores = [0.5, 0.95, 0.3, 0.85, 0.31]
    candidates = {"cat": [box(i, 0, i + 5, 5, s) for i, s in enumerate(scores)], "dog": [box(0, 0, 5, 5, 0.2)]}
    kept = select_detections(candidates, "two_object")
    assert [d.score for d in kept["cat"]] == [0.95, 0.85, 0.5, 0.31]  # 0.3 is not above 0.3
    assert "dog" not in kept  # a class with nothing kept is absent
    assert [d.score for d in select_detections(candidates, "counting")["cat"]] == [0.95]  # counting: above 0.9


def test_at_most_sixteen_objects_a_class():
    candidates = {"cup": [box(i, 0, i + 5, 5, 0.4 + i / 100) for i in range(20)]}
    kept = select_detections(candidates, "single_object")["cup"]
    assert len(kept) == 16 and kept[0].score == pytest.approx(0.59) and kept[-1].score == pytest.approx(0.44)


def test_iou_counts_boxes_inclusively_and_nms_is_off_at_one():
    # [0,0,9,9] and [5,0,14,9] are 10x10 pixels each and share 5x10: IoU 50 / 150
    assert box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(1 / 3)
    candidates = {"cat": [box(0, 0, 9, 9, 0.9), box(5, 0, 14, 9, 0.8), box(0, 0, 9, 9, 0.7)]}
    assert len(select_detections(candidates, "single_object")["cat"]) == 3  # GenEval's default: NMS off
    kept = select_detections(candidates, "single_object", GenEvalThresholds(nms=0.3))["cat"]
    assert [d.score for d in kept] == [0.9]  # 1/3 >= 0.3 and the duplicate (IoU 1) both go
    kept = select_detections(candidates, "single_object", GenEvalThresholds(nms=0.4))["cat"]
    assert [d.score for d in kept] == [0.9, 0.8]


def test_thresholds_are_checked():
    with pytest.raises(ValueError, match="counting_threshold"):
        GenEvalThresholds(counting=1.5)
    with pytest.raises(ValueError, match="max_objects"):
        GenEvalThresholds(max_objects=0)


# ------------------------------------------------------------------------------------------------- position


def test_relative_position_by_box_centres():
    a, right, below = (0, 0, 10, 10), (30, 0, 40, 10), (0, 30, 10, 40)
    assert relative_position(a, right, 0.1) == {"left of"}  # offset (-30, 0)
    assert relative_position(right, a, 0.1) == {"right of"}
    assert relative_position(a, below, 0.1) == {"above"}  # image rows grow downwards
    assert relative_position(below, a, 0.1) == {"below"}


def test_the_margin_shrinks_the_offset_by_both_sizes():
    a, b = (0, 0, 10, 10), (10, 6, 20, 16)  # centres (5, 5) and (15, 11): offset (-10, -6), length 11.66
    # no margin: (-10, -6) / 11.66 = (-0.86, -0.51): left of and above
    assert relative_position(a, b, 0.0) == {"left of", "above"}
    # margin 0.1 of the summed sizes (20, 20) takes 2 off each axis: (-8, -4) / 11.66 = (-0.69, -0.34): left of only
    assert relative_position(a, b, 0.1) == {"left of"}
    # centres 1 pixel apart: the margin swallows the whole offset, no relation at all
    assert relative_position((0, 0, 10, 10), (1, 1, 11, 11), 0.1) == set()


# ------------------------------------------------------------------------------------- the six task types


def test_single_and_two_objects():
    one_cat, two_cats = {"cat": [box(0, 0, 5, 5)]}, {"cat": [box(0, 0, 5, 5), box(9, 9, 15, 15)]}
    assert geneval_correct(one_cat, CAT, NO_COLORS) and partial_credit(one_cat, CAT, NO_COLORS) == 1.0
    assert not geneval_correct({}, CAT, NO_COLORS) and partial_credit({}, CAT, NO_COLORS) == 0.0
    # GenEval asks for at least one cat; the server's credit is 1 - |1 - 2| / 1 = 0, and -1 for three
    assert geneval_correct(two_cats, CAT, NO_COLORS) and partial_credit(two_cats, CAT, NO_COLORS) == 0.0
    three_cats = {"cat": [box(i, i, i + 5, i + 5) for i in range(3)]}
    assert partial_credit(three_cats, CAT, NO_COLORS) == -1.0
    # cat and dog: one clause met of two
    assert not geneval_correct(one_cat, CAT_AND_DOG, NO_COLORS)
    assert partial_credit(one_cat, CAT_AND_DOG, NO_COLORS) == 0.5
    both = {**one_cat, "dog": [box(20, 20, 30, 30)]}
    assert geneval_correct(both, CAT_AND_DOG, NO_COLORS) and partial_credit(both, CAT_AND_DOG, NO_COLORS) == 1.0


@pytest.mark.parametrize(
    ("clocks", "correct", "credit"),
    [
        (2, True, 1.0),
        (1, False, 0.5),  # 1 - |2 - 1| / 2
        (3, False, 0.5),  # GenEval: the exclude clause (3 or more) fails; the server ignores it: 1 - 1/2
        (5, False, -0.5),  # 1 - |2 - 5| / 2
    ],
)
def test_counting(clocks, correct, credit):
    found = {"clock": [box(10 * i, 0, 10 * i + 5, 5) for i in range(clocks)]}
    assert geneval_correct(found, TWO_CLOCKS, NO_COLORS) is correct
    assert partial_credit(found, TWO_CLOCKS, NO_COLORS) == credit


def test_colors():
    car, second_car = box(0, 0, 9, 9, 0.9), box(20, 0, 29, 9, 0.8)
    red = colors_of({car.box: "red", second_car.box: "red"})
    assert geneval_correct({"car": [car]}, RED_CAR, red) and partial_credit({"car": [car]}, RED_CAR, red) == 1.0
    blue = colors_of({car.box: "blue"})
    assert not geneval_correct({"car": [car]}, RED_CAR, blue)
    assert partial_credit({"car": [car]}, RED_CAR, blue) == 0.5  # count 1, colour 1 - |1 - 0| / 1 = 0
    assert partial_credit({}, RED_CAR, red) == 0.0  # count 0 and a 0 for the colour it could not check
    # two red cars: GenEval checks the colour of the most confident one only and passes; the server's count credit is
    # 0 and it gives the colour a 0 without looking
    two = {"car": [car, second_car]}
    assert geneval_correct(two, RED_CAR, red) and red.asked[-1] == ("car", 1)
    asked = len(red.asked)
    assert partial_credit(two, RED_CAR, red) == 0.0 and len(red.asked) == asked


def test_position():
    dog, cat_left, cat_right = box(30, 0, 40, 10), box(0, 0, 10, 10), box(60, 0, 70, 10)
    assert geneval_correct({"dog": [dog], "cat": [cat_left]}, CAT_LEFT_OF_DOG, NO_COLORS)
    assert partial_credit({"dog": [dog], "cat": [cat_left]}, CAT_LEFT_OF_DOG, NO_COLORS) == 1.0  # [1, 1, 1]
    wrong_way = {"dog": [dog], "cat": [cat_right]}
    assert not geneval_correct(wrong_way, CAT_LEFT_OF_DOG, NO_COLORS)
    assert partial_credit(wrong_way, CAT_LEFT_OF_DOG, NO_COLORS) == 0.75  # the server's [1, 1, 0, 1]
    no_target = {"cat": [cat_left]}
    assert not geneval_correct(no_target, CAT_LEFT_OF_DOG, NO_COLORS)
    assert partial_credit(no_target, CAT_LEFT_OF_DOG, NO_COLORS) == pytest.approx(1 / 3)  # [0, 1, 0]


def test_position_margin_decides_a_diagonal():
    above = {"tag": "position", "include": [{"class": "dog", "count": 1},
                                            {"class": "cat", "count": 1, "position": ["above", 0]}]}
    found = {"cat": [box(0, 0, 10, 10)], "dog": [box(10, 6, 20, 16)]}  # the diagonal pair of the margin test
    assert geneval_correct(found, above, NO_COLORS, margin=0.0)
    assert not geneval_correct(found, above, NO_COLORS, margin=0.1)
    assert partial_credit(found, above, NO_COLORS, margin=0.1) == 0.75


def test_color_attribution():
    car, bus = box(0, 0, 9, 9), box(20, 0, 29, 9)
    found = {"car": [car], "bus": [bus]}
    right = colors_of({car.box: "red", bus.box: "blue"})
    assert geneval_correct(found, RED_CAR_BLUE_BUS, right) and partial_credit(found, RED_CAR_BLUE_BUS, right) == 1.0
    swapped = colors_of({car.box: "blue", bus.box: "red"})
    assert not geneval_correct(found, RED_CAR_BLUE_BUS, swapped)
    assert partial_credit(found, RED_CAR_BLUE_BUS, swapped) == 0.5  # [1, 0, 1, 0]


def test_bad_rows_are_named():
    for row, message in [
        ({"include": CAT["include"]}, "no `tag`"),
        ({"tag": "single_object"}, "no `include`"),
        ({"tag": "x", "include": [{"class": "unicorn", "count": 1}]}, "'unicorn' is not one of GenEval's 80"),
        ({"tag": "x", "include": [{"class": "cat", "count": 1, "color": "teal"}]}, "colour 'teal'"),
        ({"tag": "x", "include": [{"class": "cat", "count": 0}]}, "positive integer"),
        ({"tag": "x", "include": [{"class": "cat", "count": 1, "position": ["left of", 0]}]}, r"include\[0\]"),
        ({"tag": "x", "include": [{"class": "cat", "count": 1}], "exclude": [{"count": 2}]}, r"exclude\[0\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_metadata(row)
    check_metadata(TWO_CLOCKS)
    check_metadata(CAT_LEFT_OF_DOG)


# ------------------------------------------------------------------------------- detector and colour model

MMDET_NAMES = {"computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard"}
"""mmdetection's (and the COCO Mask2Former checkpoints') names for the three classes GenEval renamed."""


def coco_id2label() -> dict[int, str]:
    """The detector's labels: COCO's 80 names as mmdetection spells them, in reverse order (mapping goes by name)."""
    return {i: MMDET_NAMES.get(name, name) for i, name in enumerate(reversed(OBJECT_NAMES))}


def test_detector_labels_map_onto_geneval_names():
    id2label = coco_id2label()
    names = geneval_label_names(id2label)
    assert sorted(names.values()) == sorted(OBJECT_NAMES)
    assert [names[i] for i, label in id2label.items() if label in ("mouse", "remote", "keyboard")] == [
        "computer keyboard", "tv remote", "computer mouse"]
    assert names[0] == "toothbrush" and names[79] == "person"
    assert len(geneval_label_names({**id2label, 80: "sky-other-merged"})) == 80  # a stuff label is ignored
    with pytest.raises(ValueError, match="no hair drier"):
        geneval_label_names({i: label for i, label in id2label.items() if label != "hair drier"})


def test_boxes_enclose_masks_with_exclusive_ends():
    masks = torch.zeros(2, 6, 8, dtype=torch.bool)
    masks[0, 1:4, 2:7] = True  # rows 1-3, columns 2-6
    assert mask_boxes(masks).tolist() == [[2.0, 1.0, 7.0, 4.0], [0.0, 0.0, 0.0, 0.0]]


DETECTOR_SIZE = [64, 128]


@pytest.fixture(scope="module")
def tiny_detector(tmp_path_factory):
    """A tiny random Mask2Former with COCO's labels, saved with its image processor. Its heads are scaled so that
    its 8 queries name "mouse" or "person" with scores spread over (0, 1) (from 2 to 4 mice above 0.3 per image of
    the ``images`` fixture, 0 to 2 above 0.9)."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    id2label = coco_id2label()
    backbone = SwinConfig(image_size=64, embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(
        backbone_config=backbone, num_queries=8, hidden_dim=32, mask_feature_size=32, feature_size=32,
        encoder_layers=1, decoder_layers=2, num_attention_heads=2, dim_feedforward=32, encoder_feedforward_dim=32,
        id2label=id2label, label2id={label: i for i, label in id2label.items()}, use_pretrained_backbone=False,
    )
    model = seeded_module(0, lambda: Mask2FormerForUniversalSegmentation(config))
    with torch.no_grad():
        model.class_predictor.weight.mul_(20)
        model.class_predictor.bias.zero_()
        model.class_predictor.bias[config.label2id["mouse"]] = 12.0
        model.class_predictor.bias[config.label2id["person"]] = 11.0
        mask_head = model.model.transformer_module.decoder.mask_predictor.mask_embedder.get_submodule("2.0")
        mask_head.weight.mul_(1000)  # mask logits far from 0: a mask's mean sigmoid near 1
        mask_head.bias.mul_(1000)
    directory = tmp_path_factory.mktemp("tiny-mask2former")
    model.save_pretrained(directory)
    Mask2FormerImageProcessor(size={"shortest_edge": 32, "longest_edge": 64}).save_pretrained(directory)
    return str(directory)


TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random open-clip model registered as ``tempflow-geneval-clip``, saved as safetensors."""
    import open_clip

    directory = tmp_path_factory.mktemp("tiny-geneval-clip")
    (directory / "tempflow-geneval-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(directory / "tempflow-geneval-clip.json")
    model = seeded_module(0, lambda: open_clip.create_model("tempflow-geneval-clip", pretrained=None))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "clip.safetensors"))
    return str(directory / "clip.safetensors"), model


@pytest.fixture(scope="module")
def reward_kwargs(tiny_detector, tiny_clip):
    return dict(detector=tiny_detector, clip_model="tempflow-geneval-clip", clip_pretrained=tiny_clip[0],
                detector_resolution=DETECTOR_SIZE, device="cpu")


@pytest.fixture(scope="module")
def images():
    """Four 48x40 images on the 8-bit grid: noise, a ramp, and two blocks of colour."""
    noise = torch.rand(1, 3, 48, 40, generator=torch.Generator().manual_seed(0))
    ramp = torch.linspace(0, 1, 40).expand(1, 3, 48, 40).clone()
    red = torch.zeros(1, 3, 48, 40)
    red[:, 0, 8:30, 5:25] = 0.9
    blue = torch.full((1, 3, 48, 40), 0.8)
    blue[:, 2, 20:40, 10:38] = 0.1
    return images_from_uint8(to_uint8(torch.cat([noise, ramp, red, blue])))


def single(name):
    return {"tag": "single_object", "include": [{"class": name, "count": 1}], "exclude": None}


def columns(rows):
    return {key: [row.get(key) for row in rows] for key in ("tag", "include", "exclude")}


def test_detector_files_every_detection_under_its_geneval_name(reward_kwargs, images):
    reward = get_reward("geneval_strict", **reward_kwargs)
    found = reward.detector(to_uint8(images))
    assert len(found) == 4
    assert all(detections.get("computer mouse") for detections in found)  # the detector's "mouse"
    for detection in (d for detections in found for found_class in detections.values() for d in found_class):
        rows, cols = np.nonzero(detection.mask)
        assert detection.mask.shape == (48, 40)
        assert detection.box == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
        assert 0.3 < detection.score <= 1
    assert set().union(*found) == {"computer mouse", "person"}


def test_instances_are_built_as_mmdetection_builds_them(reward_kwargs):
    """Two queries on a 4x4 image: the top (query, class) pairs by class probability (the no-object column left
    out), the mask where the logits are positive, the score the probability times the mean sigmoid in the mask."""
    detector = get_reward("geneval", **reward_kwargs).detector
    mouse, person = (detector.model.config.label2id[name] for name in ("mouse", "person"))
    class_logits = torch.zeros(2, 81)
    class_logits[0, mouse], class_logits[1, person], class_logits[0, 80] = 5.0, 3.0, 2.0
    mask_logits = torch.full((2, 4, 4), -1.0)
    mask_logits[0, :2, 1:3] = 2.0
    mask_logits[1, 3, 3] = 8.0
    found = detector.instances(class_logits, mask_logits, (4, 4), (4, 4))
    mouse_probability = np.exp(5) / (np.exp(5) + 79 + np.exp(2))  # softmax over 80 classes and "no object"
    person_probability = np.exp(3) / (np.exp(3) + 80)
    assert set(found) == {"computer mouse"}  # person: 0.20 x sigmoid(8) = 0.20 is not above 0.3
    (detection,) = found["computer mouse"]
    assert detection.box == (1, 0, 3, 2)
    assert detection.score == pytest.approx(mouse_probability / (1 + np.exp(-2.0)), rel=1e-5)
    assert person_probability / (1 + np.exp(-8.0)) < 0.3
    assert detection.mask.tolist() == (mask_logits[0] > 0).tolist()


def mice(reward, images, above: float) -> list[int]:
    return [sum(d.score > above for d in found.get("computer mouse", [])) for found in reward.detector(to_uint8(images))]


def test_strict_and_partial_scores_through_the_detector(reward_kwargs, images):
    strict, credit = get_reward("geneval_strict", **reward_kwargs), get_reward("geneval", **reward_kwargs)
    one_mouse, toothbrushes = [single("computer mouse")] * 4, [single("toothbrush")] * 4
    assert strict(images, ["a photo of a computer mouse"] * 4, **columns(one_mouse)) == [1.0] * 4
    assert strict(images, ["a photo of a toothbrush"] * 4, **columns(toothbrushes)) == [0.0] * 4
    found = mice(strict, images, 0.3)
    assert credit(images, ["p"] * 4, **columns(one_mouse)) == [1 - abs(1 - n) for n in found]
    assert credit(images, ["p"] * 4, **columns(toothbrushes)) == [0.0] * 4
    # counting prompts count only detections above 0.9
    two_mice = [{"tag": "counting", "include": [{"class": "computer mouse", "count": 2}],
                 "exclude": [{"class": "computer mouse", "count": 3}]}] * 4
    confident = mice(strict, images, 0.9)
    assert confident != found and len(set(confident)) > 1
    assert strict(images, ["p"] * 4, **columns(two_mice)) == [float(n == 2) for n in confident]
    assert credit(images, ["p"] * 4, **columns(two_mice)) == [1 - abs(2 - n) / 2 for n in confident]


def test_one_batch_and_single_images_score_alike(reward_kwargs, images):
    rows = [single("computer mouse"), {"tag": "counting", "include": [{"class": "computer mouse", "count": 2}],
                                       "exclude": [{"class": "computer mouse", "count": 3}]}] * 2
    batched = get_reward("geneval", **reward_kwargs, batch_size=4)
    scores = batched(images, ["p"] * 4, **columns(rows))
    assert len(scores) == 4 and all(isinstance(s, float) for s in scores)
    one_by_one = [batched(images[i:i + 1], ["p"], **columns(rows[i:i + 1]))[0] for i in range(4)]
    assert one_by_one == pytest.approx(scores, abs=1e-6)
    assert get_reward("geneval", **reward_kwargs, batch_size=3)(images, ["p"] * 4, **columns(rows)) == (
        pytest.approx(scores, abs=1e-6))
    arrays = to_uint8(images)
    together = scores_of(batched.detector(arrays))
    for index, alone in enumerate(scores_of(batched.detector(arrays[i:i + 1]))[0] for i in range(4)):
        assert alone == pytest.approx(together[index], abs=1e-5)


def test_dtype_and_device(reward_kwargs, images):
    reward = get_reward("geneval", **{**reward_kwargs, "dtype": "bfloat16"})
    parameter = next(reward.detector.model.parameters())
    assert parameter.dtype == torch.bfloat16 and parameter.device.type == "cpu"
    scores = reward(images, ["p"] * 4, **columns([single("computer mouse")] * 4))
    assert len(scores) == 4 and all(isinstance(s, float) and np.isfinite(s) for s in scores)
    with pytest.raises(ValueError, match="dtype: 'int8'"):
        get_reward("geneval", **{**reward_kwargs, "dtype": "int8"})
    with pytest.raises(ValueError, match="detector_resolution"):
        get_reward("geneval", **{**reward_kwargs, "detector_resolution": [64]})


def test_jpeg_quality_scores_what_the_official_client_sends(reward_kwargs, images):
    from PIL import Image

    arrays = to_uint8(images)
    expected = []
    for array in arrays:  # the client's `img.save(buffer, format="JPEG")`: Pillow's default quality
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG")
        expected.append(np.asarray(Image.open(buffer)))
    assert np.array_equal(jpeg_roundtrip(arrays, 75), np.stack(expected))
    assert not np.array_equal(jpeg_roundtrip(arrays, 95), np.stack(expected))
    reward = get_reward("geneval", **reward_kwargs, jpeg_quality=75)
    detect, seen = reward.detector, []
    reward.detector = lambda batch: seen.append(batch) or detect(batch)
    reward(images, ["p"] * 4, **columns([single("computer mouse")] * 4))
    assert len(seen) == 1 and np.array_equal(seen[0], np.stack(expected))


def scores_of(found):
    return [sorted(d.score for detections in image.values() for d in detections) for image in found]


def test_detector_bgr_swaps_red_and_blue_for_the_detector(reward_kwargs, images):
    swapped = get_reward("geneval", **reward_kwargs, detector_bgr=True).detector
    plain = get_reward("geneval", **reward_kwargs).detector
    arrays = to_uint8(images)
    assert scores_of(swapped(arrays)) == scores_of(plain(arrays[..., ::-1].copy()))
    assert scores_of(swapped(arrays)) != scores_of(plain(arrays))


def test_colour_of_a_masked_crop_on_gray(reward_kwargs, tiny_clip):
    """The crop and classifier restated from GenEval: the mask on #999, cropped to the box, under open-clip's
    preprocessing; per colour the normalised mean of the three templates' normalised embeddings."""
    import open_clip
    from PIL import Image

    _, model = tiny_clip
    reward = get_reward("geneval_strict", **reward_kwargs)
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    rows, cols = np.mgrid[:48, :40]
    masks = [(rows - 14) ** 2 + (cols - 18) ** 2 < 100, (rows > 20) & (cols < rows - 15), (rows < 30) & (cols > 28)]
    masks[2][5:10, 30:35] = False  # a hole: the crop shows gray there
    detections = [Detection(tuple(float(v) for v in (c.min(), r.min(), c.max() + 1, r.max() + 1)), 0.9, m)
                  for m in masks for r, c in [np.nonzero(m)]]

    _, _, preprocess = open_clip.create_model_and_transforms("tempflow-geneval-clip", pretrained=None)
    tokenizer = open_clip.get_tokenizer("tempflow-geneval-clip")
    with torch.no_grad():
        weights = []
        for color in COLORS:
            texts = [f"a photo of a {color} vase", f"a photo of a {color}-colored vase", f"a photo of a {color} object"]
            mean = torch.nn.functional.normalize(model.encode_text(tokenizer(texts)), dim=-1).mean(0)
            weights.append(mean / mean.norm())
        crops = []
        for mask, detection in zip(masks, detections):
            x1, y1, x2, y2 = (int(v) for v in detection.box)
            crop = np.where(mask[..., None], array, np.uint8(0x99))[y1:y2, x1:x2]
            crops.append(preprocess(Image.fromarray(crop)))
        features = torch.nn.functional.normalize(model.encode_image(torch.stack(crops)), dim=-1)
        expected = [COLORS[i] for i in (features @ torch.stack(weights, dim=1)).argmax(1).tolist()]
    assert [template.format(color="red", object="vase") for template in COLOR_TEMPLATES] == [
        "a photo of a red vase", "a photo of a red-colored vase", "a photo of a red object"]
    similarities = reward.colors.similarities(Image.fromarray(array), detections, "vase")
    torch.testing.assert_close(similarities, features @ torch.stack(weights, dim=1), atol=1e-5, rtol=0)
    assert reward.colors(Image.fromarray(array), detections, "vase") == expected
    classifier = reward.colors.text_classifiers["vase"]
    reward.colors(Image.fromarray(array), detections[:1], "vase")
    assert reward.colors.text_classifiers["vase"] is classifier and len(reward.colors.text_classifiers) == 1


def test_colour_prompts_through_the_whole_reward(reward_kwargs, images):
    from PIL import Image

    strict = get_reward("geneval_strict", **reward_kwargs)
    array = to_uint8(images[2:3])
    top = max(strict.detector(array)[0]["computer mouse"], key=lambda d: d.score)  # the one GenEval checks
    color = strict.colors(Image.fromarray(array[0]), [top], "computer mouse")[0]
    other = next(c for c in COLORS if c != color)
    rows = [{"tag": "colors", "include": [{"class": "computer mouse", "count": 1, "color": c}], "exclude": None}
            for c in (color, other)]
    assert strict(images[2:3].expand(2, -1, -1, -1), ["p", "p"], **columns(rows)) == [1.0, 0.0]


def test_rows_without_geneval_metadata_are_refused(reward_kwargs, images):
    reward = get_reward("geneval", **reward_kwargs)
    with pytest.raises(ValueError, match="carry no `tag` metadata"):
        reward(images, ["p"] * 4)
    rows = columns([single("cat")] * 4)
    rows["include"][2] = None
    with pytest.raises(ValueError, match="prompt 2 .*no `include`"):
        reward(images, ["p"] * 4, **rows)
    with pytest.raises(ValueError, match="jpeg_quality"):
        get_reward("geneval", **reward_kwargs, jpeg_quality=0)


# ----------------------------------------------------------------------------------------------- serving


@contextlib.contextmanager
def serving(reward, name):
    server = RewardServer(reward, name, port=0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_served_like_tempflow_serve_reward(reward_kwargs, images):
    # `tempflow serve-reward geneval --reward-kwargs '{...}'` parses its kwargs from JSON (lists, no tuples)
    reward = get_reward("geneval", **json.loads(json.dumps(reward_kwargs)))
    rows = [single("computer mouse"), TWO_CLOCKS, CAT_LEFT_OF_DOG, RED_CAR]
    local = reward(images, ["p"] * 4, **columns(rows))
    with serving(reward, "geneval") as server:
        client = get_reward("remote", url=server.url, retries=0)
        assert client(images, ["p"] * 4, **columns(rows)) == local
