"""toy/world.py: defect-free renders score high and defective ones ~0 on every task (also blurred and
noisy), junk scores low, each GenEval clause, every glyph and the aesthetic ordering pinned by
hand-made images, every reward deterministic, every token of a test prompt seen in training, and
the committed prompt files are what write_datasets makes."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rewards import rules
from toy import world as toy
from data import load_prompts, load_task
from toy.pipeline import make_t5_tokenizer
from toy.world import (CHARSET, GENEVAL_SPACE, IMAGE_SIZE, TASKS, aesthetic_reward, detect_objects, draw_scene,
                 draw_text, geneval_reward, ocr_reward, read_text, render, render_ideal_aesthetic, sample_batch,
                 write_datasets)

REWARDS = {"geneval": geneval_reward, "ocr": ocr_reward, "aesthetic": aesthetic_reward}
DATA = Path(__file__).resolve().parents[2] / "data" / "toy"
GENEVAL_BY_PROMPT = {m["prompt"]: m for metas in GENEVAL_SPACE.values() for m in metas}


def geneval_rules(detections, metadata):
    """(partial, strict) of GenEval's rules as geneval_reward applies them (thresholds in detect_objects)."""
    return rules.geneval_score(detections, metadata, threshold=0.0, counting_threshold=0.0)


def to_batch(images):
    """(B, 3, H, W) float in [0, 1] from a list of uint8 (H, W, 3) arrays."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def ground_truth(task, n, seed):
    """n defect-free scenes of `task`: images (the judge's ideal renders for aesthetic), prompts, metadatas."""
    rng = np.random.default_rng(seed)
    images, prompts, metas = sample_batch(n, rng, tasks=(task,), defect_rate=0.0)
    if task == "aesthetic":
        images = to_batch([render_ideal_aesthetic(m, rng) for m in metas])
    return images, prompts, metas


def blur_and_noise(images, sigma=0.6, noise=0.03, seed=0):
    """Separable Gaussian blur (std `sigma` px) plus Gaussian pixel noise, clipped to [0, 1]."""
    x = torch.arange(-3, 4, dtype=torch.float32)
    kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).repeat(3, 1, 1, 1)  # (3, 1, 1, 7)
    out = torch.nn.functional.conv2d(torch.nn.functional.pad(images, (3, 3, 0, 0), mode="replicate"), kernel, groups=3)
    out = torch.nn.functional.conv2d(torch.nn.functional.pad(out, (0, 0, 3, 3), mode="replicate"),
                                     kernel.transpose(2, 3), groups=3)
    return (out + noise * torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))).clamp(0, 1)


def score(task, images, prompts, metas):
    scores, info = REWARDS[task](images, prompts, metas)
    assert scores.dtype == torch.float32 and scores.shape == (len(prompts),) and scores.device.type == "cpu"
    assert ((scores >= 0) & (scores <= 1)).all(), f"{task} scores outside [0, 1]: {scores}"
    for key, value in info.items():
        assert value.dtype == torch.float32 and value.shape == (len(prompts),), f"{task} info[{key!r}]"
    return scores, info


# ---------------------------------------------------------------- whole-distribution checks

@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("degrade", [False, True], ids=["clean", "blur0.6+noise0.03"])
def test_ground_truth_renders_score_high(task, degrade):
    images, prompts, metas = ground_truth(task, 150, seed=1)
    scores, info = score(task, blur_and_noise(images) if degrade else images, prompts, metas)
    assert scores.mean() >= 0.95, f"{task}: mean {scores.mean():.3f} on ground truth"
    if task == "geneval":
        assert info["strict"].mean() >= 0.95, f"strict accuracy {info['strict'].mean():.3f}"
        for tag in toy.GENEVAL_TAGS:  # every tag is covered and handled
            tagged = [i for i, m in enumerate(metas) if m["tag"] == tag]
            assert tagged and info["strict"][tagged].mean() >= 0.9, f"{tag}: {info['strict'][tagged]}"
    if task == "ocr":
        assert info["exact"].mean() >= 0.95, f"exact reads {info['exact'].mean():.3f}"
        assert info["char_accuracy"].mean() >= 0.97 and info["copies"].sum() == 0


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("degrade", [False, True], ids=["clean", "blur0.6+noise0.03"])
def test_defective_renders_score_about_zero(task, degrade):
    """The planted defect (cracked objects, a blot beside the text, an amateur picture) is what the
    task's reward penalises: GenEval and OCR pay nothing for it; the aesthetic judge pays little,
    well under what it pays for the defect-free pretraining render."""
    images, prompts, metas = sample_batch(150, np.random.default_rng(2), tasks=(task,), defect_rate=1.0)
    images = blur_and_noise(images) if degrade else images
    scores, info = score(task, images, prompts, metas)
    if task == "aesthetic":
        clean = sample_batch(150, np.random.default_rng(2), tasks=(task,), defect_rate=0.0)
        clean_scores = score(task, *clean)[0]
        assert scores.mean() <= 0.2 and clean_scores.mean() >= 0.8, (scores.mean(), clean_scores.mean())
        assert info["align"].mean() >= 0.95  # the shape and colour are right: only the picture is poor
        return
    key = "strict" if task == "geneval" else "exact"
    assert scores.mean() <= 0.1 and info[key].mean() <= 0.05, (scores.mean(), info[key].mean())
    if task == "ocr":  # the blot leaves every glyph's pixels as in the defect-free render
        meta = {"text": "A7", "color": "red"}
        plain, blotted = (render("ocr", meta, np.random.default_rng(5), rate) for rate in (0.0, 1.0))
        outside = np.ones(plain.shape[:2], bool)
        outside[toy.BLOT[1]:toy.BLOT[3], toy.BLOT[0]:toy.BLOT[2]] = False
        assert np.array_equal(plain[outside], blotted[outside]) and not np.array_equal(plain, blotted)


@pytest.mark.parametrize("task", TASKS)
def test_defects_follow_the_rate(task):
    images, prompts, metas = sample_batch(400, np.random.default_rng(3), tasks=(task,))
    scores, info = score(task, images, prompts, metas)
    # the aesthetic judge pays 0.84 for a defect-free render and 0.14 for a defective one
    good = info["strict"] if task == "geneval" else info["exact"] if task == "ocr" else scores > 0.5
    # 400 Bernoulli(1/2) draws: the share lies within 0.5 +- 4 standard errors (0.1)
    assert abs(good.float().mean() - (1 - toy.DEFECT_RATE)) <= 4 * (0.25 / 400) ** 0.5, good.float().mean()


@pytest.mark.parametrize("task", TASKS)
def test_rewards_are_deterministic(task):
    images, prompts, metas = sample_batch(30, np.random.default_rng(7), tasks=(task,))
    images = blur_and_noise(images)
    first, again = score(task, images, prompts, metas), score(task, images.clone(), prompts, metas)
    assert torch.equal(first[0], again[0]) and all(torch.equal(first[1][k], again[1][k]) for k in first[1])


@pytest.mark.parametrize("task", TASKS)
def test_noise_blank_and_flat_images_score_low(task):
    _, prompts, metas = ground_truth(task, 60, seed=2)
    shape = (len(prompts), 3, IMAGE_SIZE, IMAGE_SIZE)
    for name, images in {"noise": torch.rand(shape, generator=torch.Generator().manual_seed(0)),
                         "black": torch.zeros(shape), "gray": torch.full(shape, 0.5)}.items():
        scores, _ = score(task, images, prompts, metas)
        assert scores.mean() <= 0.1, f"{task} on {name}: mean {scores.mean():.3f}"


def test_renders_of_other_prompts_score_low():
    # geneval: each image scored against the next scene's metadata (classes may overlap: partial credit)
    images, prompts, metas = ground_truth("geneval", 150, seed=3)
    shifted = list(range(1, 150)) + [0]
    scores, info = score("geneval", images[shifted], prompts, metas)
    assert scores.mean() <= 0.45 and info["strict"].mean() <= 0.25, (scores.mean(), info["strict"].mean())
    images, prompts, metas = ground_truth("ocr", 150, seed=3)
    scores, _ = score("ocr", images[shifted], prompts, metas)
    assert scores.mean() <= 0.15, f"ocr on other texts: {scores.mean():.3f}"
    # aesthetic: the ideal render of another colour, of another shape, of both: the strict prompt
    # term pays nothing for the judge's favourite picture of the wrong object
    rng = np.random.default_rng(3)
    _, prompts, metas = ground_truth("aesthetic", 60, seed=3)
    for change_colour, change_shape in ((1, 0), (0, 1), (1, 1)):
        other = [{"color": toy.COLORS[(toy.COLORS.index(m["color"]) + change_colour) % len(toy.COLORS)],
                  "shape": toy.SHAPES[(toy.SHAPES.index(m["shape"]) + change_shape) % 3]} for m in metas]
        scores, info = score("aesthetic", to_batch([render_ideal_aesthetic(m, rng) for m in other]), prompts, metas)
        assert (scores == 0).all() and (info["align"] == 0).all() and (info["size"] >= 0.9).all(), scores


def test_aesthetic_judge_leaves_headroom_and_conflicts_with_geneval():
    """Pretraining renders of aesthetic prompts are mediocre; GenEval's multi-object scenes are bad
    for the judge, and the judge's favourite (one big centred object) fails multi-object prompts."""
    rng = np.random.default_rng(4)
    images, prompts, metas = sample_batch(200, rng, tasks=("aesthetic",))
    pretraining = score("aesthetic", images, prompts, metas)[0].mean()
    assert 0.3 <= pretraining <= 0.65, f"aesthetic score of the pretraining renders {pretraining:.3f}"
    images, prompts, metas = sample_batch(300, rng, tasks=("geneval",), defect_rate=0.0)
    several = [i for i, m in enumerate(metas) if sum(c["count"] for c in m["include"]) >= 2]
    judged = score("aesthetic", images[several], [prompts[i] for i in several], [metas[i] for i in several])[0]
    assert judged.mean() <= 0.3, f"aesthetic judge on multi-object GenEval scenes {judged.mean():.3f}"
    big_first = [render_ideal_aesthetic({"shape": metas[i]["include"][0]["class"], "color": "red"}, rng) for i in several]
    partial = score("geneval", to_batch(big_first), [prompts[i] for i in several], [metas[i] for i in several])[0]
    assert partial.mean() <= 0.6, f"geneval on one big centred object {partial.mean():.3f}"
    print(f"aesthetic: pretraining renders {pretraining:.3f}, GenEval multi-object scenes {judged.mean():.3f}")


# ---------------------------------------------------------------- GenEval clauses by hand

def scene(*objects):
    """(1, 3, 32, 32) image of (class, color, box) triples."""
    return to_batch([draw_scene([{"class": c, "color": col, "box": box} for c, col, box in objects])])


def geneval_of(image, prompt, metadata=None):
    scores, info = geneval_reward(image, [prompt], [metadata or GENEVAL_BY_PROMPT[prompt]])
    return round(float(scores[0]), 4), bool(info["strict"][0])


ROW = [(1, 12, 8, 19), (9, 12, 16, 19), (17, 12, 24, 19), (25, 12, 32, 19)]  # four 7-px boxes in a row


def test_detector_reads_class_colour_and_box():
    image = scene(("circle", "red", (2, 2, 12, 12)), ("square", "blue", (18, 3, 27, 12)),
                  ("triangle", "yellow", (8, 18, 21, 31)))
    found = sorted((d["class"], d["color"], d["box"]) for d in detect_objects(image[0]))
    assert found == [("circle", "red", (2, 2, 12, 12)), ("square", "blue", (18, 3, 27, 12)),
                     ("triangle", "yellow", (8, 18, 21, 31))]
    assert detect_objects(scene(("square", "green", (5, 5, 8, 8)))[0]) == []  # 9 px < MIN_AREA


def test_detector_drops_regions_that_are_not_shapes():
    image = draw_scene([{"class": "square", "color": "red", "box": (4, 4, 16, 16)}])
    image[5:15, 5:15] = 0  # a hollow 12 px square outline: IoU 0.31 with the filled square
    image[20:23, 2:30] = toy.PALETTE["blue"]  # a 3 x 28 bar: a rectangle, but aspect ratio 0.11
    assert detect_objects(to_batch([image])[0]) == []


@pytest.mark.parametrize("n_drawn, expected", [(2, (0.6667, False)), (3, (1.0, True)), (4, (0.6667, False))])
def test_count_clause(n_drawn, expected):
    image = scene(*[("circle", "white", box) for box in ROW[:n_drawn]])
    assert geneval_of(image, "a photo of three circles") == expected


def test_exclude_clause_is_what_fails_too_many_objects():
    detections = detect_objects(scene(*[("circle", "white", box) for box in ROW])[0])
    meta = GENEVAL_BY_PROMPT["a photo of three circles"]
    assert meta["exclude"] == [{"class": "circle", "count": 4}]
    assert geneval_rules(detections, meta)[1] is False
    assert geneval_rules(detections, {k: v for k, v in meta.items() if k != "exclude"})[1] is True


def test_colour_clause():
    assert geneval_of(scene(("circle", "red", (10, 10, 22, 22))), "a photo of a red circle") == (1.0, True)
    assert geneval_of(scene(("circle", "blue", (10, 10, 22, 22))), "a photo of a red circle") == (0.5, False)
    assert geneval_of(scene(("square", "red", (10, 10, 22, 22))), "a photo of a red circle") == (0.0, False)


def test_color_attr_clause_binds_each_colour_to_its_object():
    prompt = "a photo of a red circle and a blue square"
    right = scene(("circle", "red", (2, 10, 12, 20)), ("square", "blue", (18, 10, 28, 20)))
    swapped = scene(("circle", "blue", (2, 10, 12, 20)), ("square", "red", (18, 10, 28, 20)))
    assert geneval_of(right, prompt) == (1.0, True)
    assert geneval_of(swapped, prompt) == (0.5, False)  # counts 1, 1; colours 0, 0


def test_missing_object_fails_its_count_and_dependent_clauses():
    assert geneval_of(scene(("circle", "red", (10, 10, 20, 20))), "a photo of a circle and a square") == (0.5, False)
    # clauses: square count 1, circle count 0, position 0 (the missing circle cannot be left of it)
    assert geneval_of(scene(("square", "red", (10, 10, 20, 20))), "a photo of a circle left of a square") == \
        (0.3333, False)


def test_same_colour_objects_stay_separate_under_blur():
    meta = {"tag": "counting", "include": [{"class": "square", "count": 4, "color": "white"}],
            "exclude": [{"class": "square", "count": 5}], "prompt": "a photo of four white squares"}
    rng = np.random.default_rng(10)
    images = blur_and_noise(to_batch([render("geneval", meta, rng, 0.0) for _ in range(40)]), sigma=0.8)
    strict = geneval_reward(images, [meta["prompt"]] * 40, [meta] * 40)[1]["strict"]
    assert strict.mean() >= 0.95, f"{strict.mean():.3f}: touching objects merged"


# square centred at (16, 16); the circle's box for "circle <relation> square" and for the opposite
SIDES = {"left of": (2, 12, 10, 20), "right of": (22, 12, 30, 20), "above": (12, 2, 20, 10), "below": (12, 22, 20, 30)}
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@pytest.mark.parametrize("relation", list(SIDES))
@pytest.mark.parametrize("coloured", [False, True])
def test_position_clause_each_direction(relation, coloured):
    # the world's position prompts name no colour, as GenEval's; the rule also checks named colours
    colours = ("red", "green") if coloured else ("white", "white")
    prompt = f"a photo of a circle {relation} a square"
    meta = GENEVAL_BY_PROMPT[prompt]
    if coloured:
        prompt = f"a photo of a red circle {relation} a green square"
        meta = {"tag": "position", "prompt": prompt, "include": [dict(meta["include"][0], color="green"),
                                                                 dict(meta["include"][1], color="red")]}
    square = ("square", colours[1], (13, 13, 19, 19))
    assert geneval_of(scene(("circle", colours[0], SIDES[relation]), square), prompt, meta) == (1.0, True)
    wrong = geneval_of(scene(("circle", colours[0], SIDES[OPPOSITE[relation]]), square), prompt, meta)
    assert wrong == ((0.8, False) if coloured else (0.6667, False))  # clauses: counts, [colours], position 0


# ---------------------------------------------------------------- OCR

@pytest.mark.parametrize("char", list(CHARSET))
def test_reader_reads_every_glyph_at_both_scales(char):
    for text, scale, x0, y0 in ((char * 3, 1, 4, 12), (char * 2, 2, 5, 9), (char + "7" + char, 1, 7, 3)):
        image = draw_text(draw_scene([]), text, "blue", x0, y0, scale)
        assert read_text(to_batch([image])[0]) == text


def test_reader_on_blank_image_other_colours_and_stray_pixels():
    assert read_text(torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE)) == ""
    for colour in toy.COLORS:
        image = draw_text(draw_scene([], background=(60, 60, 60)), "P4X", colour, 3, 20, 1)
        image[[3, 6, 28], [29, 2, 30]] = 255  # isolated white pixels: noise, not ink
        assert read_text(to_batch([image])[0]) == "P4X", colour


def test_reader_tolerates_a_pixel_of_irregular_spacing():
    image = draw_scene([])
    for char, x0 in zip("A37", (6, 13, 19)):  # pitch 7 then 6 instead of 6, 6
        draw_text(image, char, "white", x0, 10, 1)
    assert read_text(to_batch([image])[0]) == "A37"


def test_ocr_reward_scores_the_quoted_target_by_flow_grpo_rule():
    image = to_batch([draw_text(draw_scene([]), "K9", "white", 4, 8, 2)])
    for prompt, expected in (('a sign that says "K9"', 1.0), ('a sign that says "k9"', 1.0),
                             ('a sign that says "K8"', 0.5), ('the code "K" on a screen', 1.0),  # substring
                             ('a label reading "E7"', 0.0), ('a label reading "K9AA"', 0.5)):
        scores, info = ocr_reward(image, [prompt], [{}])
        assert scores.item() == expected, prompt
        assert info["exact"].item() == float(prompt.lower().count('"k9"')), prompt
    with pytest.raises(ValueError, match="double-quoted"):
        ocr_reward(image, ["a sign that says K9"], [{}])


# ---------------------------------------------------------------- aesthetics

def aesthetic_of(image, prompt="a red circle"):
    return float(aesthetic_reward(image, [prompt], [{}])[0][0])


def test_aesthetic_preference_ordering():
    large_centred = aesthetic_of(scene(("circle", "red", (5, 5, 27, 27))))
    medium_centred = aesthetic_of(scene(("circle", "red", (9, 9, 23, 23))))
    small_off_centre = aesthetic_of(scene(("circle", "red", (2, 3, 10, 11))))
    two_objects = aesthetic_of(scene(("circle", "red", (2, 9, 14, 21)), ("circle", "red", (18, 9, 30, 21))))
    frame_filling = aesthetic_of(scene(("circle", "red", (1, 1, 31, 31))))
    assert large_centred >= 0.95 and large_centred - frame_filling > 0.3, (large_centred, frame_filling)
    assert large_centred > medium_centred > small_off_centre > two_objects, \
        (large_centred, medium_centred, small_off_centre, two_objects)


def test_aesthetic_prefers_clean_background_contrast_and_the_prompted_object():
    box = (5, 5, 27, 27)
    clean = aesthetic_of(scene(("circle", "red", box)))
    specks = draw_scene([{"class": "circle", "color": "red", "box": box}])
    specks[[1, 30, 1, 30, 16], [1, 1, 30, 30, 30]] = toy.PALETTE["white"]
    gray = draw_scene([{"class": "circle", "color": "red", "box": box}], background=(150, 150, 150))
    assert clean > aesthetic_of(to_batch([specks])) and clean > aesthetic_of(to_batch([gray]))
    # dark-gray dots on 1/3 of the background: still background pixels, so only `clean` changes
    dotted = draw_scene([{"class": "circle", "color": "red", "box": box}])
    background = (dotted == 0).all(-1) & ((np.arange(IMAGE_SIZE)[:, None] + 2 * np.arange(IMAGE_SIZE)) % 3 == 0)
    dotted[background] = 50
    _, info = aesthetic_reward(to_batch([dotted]), ["a red circle"], [{}])
    assert info["clean"][0] < 0.6 and info["single"][0] == 1 and clean - aesthetic_of(to_batch([dotted])) > 0.05
    # strict prompt term: the same picture for a prompt naming another colour or shape scores 0
    assert clean > 0.9 and aesthetic_of(scene(("circle", "red", box)), "a blue circle") == 0 == \
        aesthetic_of(scene(("circle", "red", box)), "a red square")


# ---------------------------------------------------------------- generation and files

def test_generation_is_deterministic_and_seed_dependent():
    first = sample_batch(24, np.random.default_rng(7))
    second = sample_batch(24, np.random.default_rng(7))
    other = sample_batch(24, np.random.default_rng(8))
    assert torch.equal(first[0], second[0]) and first[1:] == second[1:]
    assert first[1] != other[1] and not torch.equal(first[0], other[0])
    assert first[0].shape == (24, 3, IMAGE_SIZE, IMAGE_SIZE) and first[0].dtype == torch.float32
    kinds = {("tag" in m, "text" in m, "shape" in m) for m in sample_batch(60, np.random.default_rng(0))[2]}
    assert kinds == {(True, False, False), (False, True, False), (False, False, True)}, "not a mixture of 3 tasks"


def test_sample_batch_never_uses_excluded_prompts():
    test_prompts = set(load_prompts(DATA / "geneval", "test")[0])
    _, prompts, _ = sample_batch(300, np.random.default_rng(0), tasks=("geneval",), exclude_prompts=test_prompts)
    assert not set(prompts) & test_prompts
    _, unfiltered, _ = sample_batch(300, np.random.default_rng(0), tasks=("geneval",))
    assert set(unfiltered) & test_prompts  # the filter had something to remove


def test_render_satisfies_metadata_for_every_geneval_prompt_kind():
    """Every prompt's defect-free layout passes GenEval's rule; its cracked one fails it."""
    rng = np.random.default_rng(9)
    for tag, metas in GENEVAL_SPACE.items():
        for meta in metas[:: max(1, len(metas) // 25)]:
            image = to_batch([render("geneval", meta, rng, 0.0)])
            assert geneval_rules(detect_objects(image[0]), meta) == (1.0, True), meta["prompt"]
            cracked = to_batch([render("geneval", meta, rng, 1.0)])
            assert geneval_rules(detect_objects(cracked[0]), meta)[1] is False, meta["prompt"]


def test_committed_datasets_are_current(tmp_path):
    sizes = write_datasets(tmp_path, seed=0)
    for path in sorted(p for p in DATA.rglob("*") if p.is_file() and p.parent.name in TASKS):
        assert (tmp_path / path.relative_to(DATA)).read_text() == path.read_text(), f"{path} is stale"
    for task in TASKS:
        assert load_task(task, f"data/toy/{task}").reward == f"toy_{task}=1"
        train, train_meta = load_prompts(DATA / task, "train")
        test, test_meta = load_prompts(DATA / task, "test")
        assert (len(train), len(test)) == sizes[task] and len(test) >= 60, sizes[task]
        assert [m["prompt"] for m in test_meta] == test and [m["prompt"] for m in train_meta] == train
        if task != "geneval":  # OCR and aesthetic hold out by prompt
            assert not set(train) & set(test) and len(set(train)) == len(train) and len(set(test)) == len(test)
    ocr_texts = [{m["text"] for m in load_prompts(DATA / "ocr", split)[1]} for split in ("train", "test")]
    assert not ocr_texts[0] & ocr_texts[1], "an OCR test string also appears in training"


def test_split_holds_out_big_tags_by_prompt_and_small_ones_by_seed():
    metas = {split: load_prompts(DATA / "geneval", split)[1] for split in ("train", "test")}
    for tag in toy.GENEVAL_TAGS:
        test, train = ({m["prompt"] for m in metas[s] if m["tag"] == tag} for s in ("test", "train"))
        if len(GENEVAL_SPACE[tag]) < toy.SMALL_TAG:
            assert test == train == {m["prompt"] for m in GENEVAL_SPACE[tag]}, tag
        else:
            assert len(test) == 32 and not test & train, tag
    # both files take the tags in turn, so any prefix of 6k lines has k per tag
    assert [m["tag"] for m in metas["test"]] == list(toy.GENEVAL_TAGS) * 32
    assert [m["tag"] for m in metas["train"]] == list(toy.GENEVAL_TAGS) * 64
    # position prompts name no colour, as GenEval's: one per ordered shape pair and relation
    position = {m["prompt"] for m in metas["test"] if m["tag"] == "position"}
    assert len(position) == 6 * 4 and not any(c in p for p in position for c in toy.COLORS)
    held = toy.held_out_prompts(str(DATA))
    assert held and not held & set(load_prompts(DATA / "geneval", "train")[0])
    _, prompts, _ = sample_batch(300, np.random.default_rng(8), exclude_prompts=held)
    assert not set(prompts) & held


def test_ocr_slot_tokens_bind_each_glyph_to_its_place():
    tokens = make_t5_tokenizer(["a", "sign", "that", "says"], 24, toy.T5_PIECES).tokenize('a sign that says "A7"')
    assert tokens[-2:] == ["\u2581\"A", "7\""]


def test_every_token_of_every_test_prompt_occurs_in_training():
    from toy.pretrain import vocabulary
    tokenizer = make_t5_tokenizer(vocabulary(), 24, toy.T5_PIECES)
    for task in TASKS:
        lines = {split: (DATA / task / f"{split}.txt").read_text().splitlines() for split in ("train", "test")}
        seen = {tok for line in lines["train"] for tok in tokenizer.tokenize(line)}
        unseen = {tok for line in lines["test"] for tok in tokenizer.tokenize(line)} - seen
        assert not unseen, f"{task}: test tokens never in training: {sorted(unseen)[:5]}"
        words = {w for line in lines["test"] for w in line.replace('"', " ").split() if w.isalpha() and w.islower()}
        assert words <= {w for line in lines["train"] for w in line.split()}


def test_the_shipped_vae_keeps_each_task_apart_from_its_defect():
    """The embedded base's VAE reconstructs the renders without changing what the rewards see:
    defect-free renders keep their reward, defective ones stay low."""
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(DATA.parents[1] / "models/toy-sd3", subfolder="vae").eval()
    for task in TASKS:
        for rate in (0.0, 1.0):
            images, prompts, metas = sample_batch(32, np.random.default_rng(9), tasks=(task,), defect_rate=rate)
            with torch.no_grad():
                latents = vae.encode(images * 2 - 1).latent_dist.mode()
                recon = (vae.decode(latents).sample.clamp(-1, 1) + 1) / 2
            before, after = score(task, images, prompts, metas)[0], score(task, recon, prompts, metas)[0]
            if rate == 0.0:  # measured: max |change| 0 for GenEval and OCR, 0.05 for the judge's terms
                tolerance = 0.1 if task == "aesthetic" else 0.0
                assert (after - before).abs().max() <= tolerance, (task, (after - before).abs().max())
            else:  # measured: means 0, 0.05 and 0.11
                assert after.mean() <= 0.15, (task, after.mean())


def test_load_prompts_errors_and_missing_metadata(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompts(tmp_path / "nope", "train")
    with pytest.raises(FileNotFoundError, match="train.txt"):
        load_prompts(tmp_path, "train")
    (tmp_path / "train.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(tmp_path, "train")
    (tmp_path / "train.txt").write_text('a sign that says "A1"\nthe code "77" on a screen\n')
    prompts, metas = load_prompts(tmp_path, "train")
    assert prompts == ['a sign that says "A1"', 'the code "77" on a screen'] and metas == [{}, {}]
    metas[0]["x"] = 1
    assert metas[1] == {}, "metadata dicts must not be shared"
    (tmp_path / "train_metadata.jsonl").write_text(json.dumps({"prompt": 'a sign that says "A1"'}) + "\n")
    with pytest.raises(ValueError, match="1 lines but"):
        load_prompts(tmp_path, "train")
    (tmp_path / "train_metadata.jsonl").write_text(json.dumps({"prompt": "x"}) + "\n" + json.dumps({}) + "\n")
    with pytest.raises(ValueError, match="line 1"):
        load_prompts(tmp_path, "train")


def test_rewards_reject_bad_batches():
    image = torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with pytest.raises(ValueError, match="2 images, 1 prompts"):
        ocr_reward(image, ['"A1"'], [{}])
    with pytest.raises(ValueError, match="include"):
        geneval_reward(image, ["a", "b"], [{}, {}])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        aesthetic_reward(image[:, 0], ["a", "b"], [{}, {}])


def test_colour_check_tells_a_model_that_draws_the_named_colour_from_one_that_ignores_it(monkeypatch, capsys):
    # Stand-in pipelines: one draws the named colour as a centred square, one always draws blue.
    # colour_check must put every image of the first on the diagonal and none of the second off blue.
    import model

    class Pipe:
        def __init__(self, ignore):
            self.ignore = ignore

        def __call__(self, prompts, output_type, **_):
            colours = ["blue" if self.ignore else next(c for c in toy.COLORS if f" {c} " in p) for p in prompts]
            images = [draw_scene([{"class": "square", "color": c, "box": (8, 8, 24, 24)}]) for c in colours]
            return type("Out", (), {"images": to_batch(images)})()

    for ignore in (False, True):
        monkeypatch.setattr(model.FlowModel, "load", classmethod(
            lambda cls, path, ignore=ignore: type("Flow", (), {"pipe": Pipe(ignore), "max_sequence_length": 24})()))
        table = toy.colour_check("any", per_shape=2)
        assert list(table) == list(toy.COLORS)
        assert all(sum(row.values()) == 2 * len(toy.SHAPES) for row in table.values())
        expected = {c: {"blue" if ignore else c: 2 * len(toy.SHAPES)} for c in toy.COLORS}
        assert table == expected
    with pytest.raises(SystemExit):
        toy.main(["--colour-check", "no/such/folder"])
    assert "not a pipeline folder" in capsys.readouterr().err
