"""Tests of rewards/ on CPU with tiny random-weight models built offline (no download).

    python -m pytest tests/algorithm/test_rewards.py -q
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import base64
import http.server
import io
import json
import pickle
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import rewards  # noqa: E402
from rewards import clip, geneval, ocr, rules  # noqa: E402
from helpers import f32_atol  # noqa: E402


# ---------------------------------------------------------------------------------------------------
# tiny offline models


def clip_tokenizer():
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer
    # byte-level alphabet, each char also as a word-final "</w>" token, so no merges are needed
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + alphabet + [a + "</w>" for a in alphabet]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def clip_processor(image_mean=(0.48145466, 0.4578275, 0.40821073)):
    from transformers import CLIPImageProcessor, CLIPProcessor
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                         image_mean=list(image_mean))
    return CLIPProcessor(image_processor=image_processor, tokenizer=clip_tokenizer())


def save_tiny_clip(directory, seed):
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(1.7)  # exp = 5.47, not the default, so a missing exp() shows
    model.save_pretrained(directory)
    clip_processor().save_pretrained(directory)
    return str(directory)


DETECTOR_CLASSES = ["person", "cat", "dog", "mouse"]  # "mouse" is GenEval's "computer mouse"


def save_tiny_detector(directory):
    from transformers import (Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor,
                              SwinConfig)
    torch.manual_seed(0)
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=2, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(
        backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=32,
        encoder_layers=1, decoder_layers=2, num_attention_heads=2, dim_feedforward=32, num_queries=5,
        id2label=dict(enumerate(DETECTOR_CLASSES)), label2id={n: i for i, n in enumerate(DETECTOR_CLASSES)})
    with geneval._without_scipy_check():
        model = Mask2FormerForUniversalSegmentation(config).eval()
    with torch.no_grad():  # every query says "mouse" with probability ~1, so objects are found above 0.3
        model.class_predictor.bias.zero_()
        model.class_predictor.bias[DETECTOR_CLASSES.index("mouse")] = 20.0
    model.save_pretrained(directory)
    Mask2FormerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    paths = {"clip": save_tiny_clip(root / "clip", seed=0), "pick": save_tiny_clip(root / "pick", seed=1)}
    # PickScore's processor comes from another repository: give it other statistics, so that a reward
    # that used the model folder's processor instead would give other scores
    clip_processor(image_mean=(0.2, 0.7, 0.4)).save_pretrained(root / "pick_processor")
    paths["pick_processor"] = str(root / "pick_processor")
    paths["detector"] = save_tiny_detector(root / "detector")
    return paths


def batch(seed=0, size=(40, 48), n=3):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, *size, generator=generator)
    prompts = ["a photo of a cat", "a red dog on grass", "two mice"][:n]
    return images, prompts, [{} for _ in range(n)]


def hand_embeddings(directory, processor_directory, images, prompts):
    """Unit text and image embeddings computed here, straight from transformers."""
    from transformers import CLIPModel, CLIPProcessor
    model = CLIPModel.from_pretrained(directory, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(processor_directory, local_files_only=True)
    pils = [Image.fromarray(a) for a in (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()]
    inputs = processor(text=prompts, images=pils, return_tensors="pt", padding=True)
    with torch.no_grad():
        text = model.get_text_features(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).pooler_output
        image = model.get_image_features(pixel_values=inputs.pixel_values).pooler_output
    return model, text / text.norm(dim=-1, keepdim=True), image / image.norm(dim=-1, keepdim=True)


# ---------------------------------------------------------------------------------------------------
# CLIP rewards


def test_pickscore_is_scaled_cosine_with_separate_processor(tiny):
    images, prompts, metadata = batch()
    fn = rewards.load_reward("pickscore", model=tiny["pick"], processor=tiny["pick_processor"])
    scores, info = fn(images, prompts, metadata)
    model, text, image = hand_embeddings(tiny["pick"], tiny["pick_processor"], images, prompts)
    expected = model.logit_scale.exp() * (text * image).sum(-1)
    assert scores.dtype == torch.float32 and scores.shape == (3,) and info == {}
    torch.testing.assert_close(scores, expected, atol=f32_atol(expected), rtol=0)
    divided, _ = rewards.load_reward("pickscore", model=tiny["pick"], processor=tiny["pick_processor"],
                                     divide_by_26=True)(images, prompts, metadata)
    torch.testing.assert_close(divided, expected / 26, atol=f32_atol(expected / 26), rtol=0)


def test_pickscore_reads_model_ids_from_environment(tiny, monkeypatch):
    monkeypatch.setenv("PICKSCORE_MODEL", tiny["pick"])
    monkeypatch.setenv("PICKSCORE_PROCESSOR", tiny["pick_processor"])
    images, prompts, metadata = batch()
    scores, _ = rewards.load_reward("pickscore", divide_by_26=True)(images, prompts, metadata)
    model, text, image = hand_embeddings(tiny["pick"], tiny["pick_processor"], images, prompts)
    expected = model.logit_scale.exp() * (text * image).sum(-1) / 26
    torch.testing.assert_close(scores, expected, atol=f32_atol(expected), rtol=0)


def test_clipscore_is_cosine(tiny):
    images, prompts, metadata = batch(seed=1)
    scores, _ = rewards.load_reward("clipscore", model=tiny["clip"])(images, prompts, metadata)
    _, text, image = hand_embeddings(tiny["clip"], tiny["clip"], images, prompts)
    torch.testing.assert_close(scores, (text * image).sum(-1), atol=f32_atol(1.0), rtol=0)  # cosines


def test_rewards_are_cached_per_options(tiny):
    first = rewards.load_reward("clipscore", model=tiny["clip"])
    assert rewards.load_reward("clipscore", model=tiny["clip"]) is first
    assert rewards.load_reward("pickscore", model=tiny["pick"], processor=tiny["pick_processor"]) is not \
        rewards.load_reward("pickscore", model=tiny["pick"], processor=tiny["pick_processor"], divide_by_26=True)


# ---------------------------------------------------------------------------------------------------
# aesthetic


def aesthetic_state(input_size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    sizes = [(input_size, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    state = {}
    for index, (n_in, n_out) in zip([0, 2, 4, 6, 7], sizes):
        state[f"layers.{index}.weight"] = torch.randn(n_out, n_in, generator=generator) / n_in ** 0.5
        state[f"layers.{index}.bias"] = torch.randn(n_out, generator=generator)
    return state


def hand_mlp(state, x):
    x = x.double()
    for index in [0, 2, 4, 6, 7]:  # linear layers only: the LAION head has no activations
        x = x @ state[f"layers.{index}.weight"].double().T + state[f"layers.{index}.bias"].double()
    return x.squeeze(-1)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_aesthetic_mlp_loads_published_layout(tmp_path, suffix):
    from safetensors.torch import save_file
    state = aesthetic_state(768)
    path = str(tmp_path / f"sac+logos+ava1-l14-linearMSE{suffix}")
    torch.save(state, path) if suffix == ".pth" else save_file(state, path)
    mlp = clip.load_aesthetic_mlp(path)
    x = torch.nn.functional.normalize(torch.randn(4, 768), dim=-1)
    assert not mlp.training
    ref = hand_mlp(state, x)  # float64
    torch.testing.assert_close(mlp(x).double(), ref, atol=f32_atol(ref), rtol=0)


def test_aesthetic_missing_weights_say_what_to_download(tmp_path, monkeypatch):
    monkeypatch.delenv("AESTHETIC_MLP", raising=False)
    with pytest.raises(FileNotFoundError, match=r"missing.pth.*AESTHETIC_MLP.*sac\+logos\+ava1-l14-linearMSE.pth"):
        rewards.load_reward("aesthetic", mlp_path=str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="improved-aesthetic-predictor"):
        rewards.load_reward("aesthetic", clip_model="unused-because-the-mlp-is-checked-first")


def test_aesthetic_end_to_end(tiny, tmp_path, monkeypatch):
    state = aesthetic_state(8, seed=3)  # the tiny CLIP's projection has 8 dims
    path = str(tmp_path / "mlp.pth")
    torch.save(state, path)
    monkeypatch.setenv("AESTHETIC_MLP", path)
    images, prompts, metadata = batch(seed=2)
    scores, _ = rewards.load_reward("aesthetic", clip_model=tiny["clip"])(images, prompts, metadata)
    _, _, image = hand_embeddings(tiny["clip"], tiny["clip"], images, prompts)
    ref = hand_mlp(state, image)  # float64
    torch.testing.assert_close(scores.double(), ref, atol=f32_atol(ref), rtol=0)


# ---------------------------------------------------------------------------------------------------
# GenEval rules on constructed detections (hand-computed partial credits)


def det(name, box, score=0.95, color=None):
    return {"class": name, "box": box, "score": score, "color": color}


SINGLE = {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}
TWO = {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]}
COUNTING = {"tag": "counting", "include": [{"class": "cat", "count": 3}], "exclude": [{"class": "cat", "count": 4}]}
COLORS = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
POSITION = {"tag": "position", "include": [{"class": "laptop", "count": 1},
                                           {"class": "cow", "count": 1, "position": ["right of", 0]}]}
COLOR_ATTR = {"tag": "color_attr", "include": [{"class": "cat", "count": 1, "color": "red"},
                                               {"class": "dog", "count": 1, "color": "blue"}]}
BOX = (0, 0, 10, 10)
LAPTOP = det("laptop", (0, 0, 10, 10))


@pytest.mark.parametrize("detections, metadata, partial, strict", [
    # single_object
    ([det("cat", BOX)], SINGLE, 1.0, True),
    ([det("cat", BOX, score=0.3)], SINGLE, 0.0, False),  # GenEval keeps score > 0.3 only
    ([det("dog", BOX)], SINGLE, 0.0, False),
    ([det("cat", BOX), det("cat", BOX, 0.8)], SINGLE, 0.0, True),  # GenEval: >= 1; Flow-GRPO: 1 - |1-2|/1
    ([det("cat", BOX)] * 3, SINGLE, -1.0, True),  # partial credit is not clamped (as Flow-GRPO)
    ([det("cat", BOX)] * 20, SINGLE, -14.0, True),  # at most 16 objects per class: 1 - |1 - 16|
    # two_object
    ([det("cat", BOX), det("dog", BOX)], TWO, 1.0, True),
    ([det("cat", BOX)], TWO, 0.5, False),  # credits [1, 0]
    ([], TWO, 0.0, False),
    # counting: threshold 0.9, exact count through the exclude clause
    ([det("cat", BOX)] * 3 + [det("cat", BOX, 0.5)], COUNTING, 1.0, True),
    ([det("cat", BOX)] * 4, COUNTING, 2 / 3, False),  # excluded; 1 - |3-4|/3
    ([det("cat", BOX)] * 2, COUNTING, 2 / 3, False),
    ([det("cat", BOX, 0.85)] * 3, COUNTING, 0.0, False),  # 0.85 counts for other tags, not for counting
    # colors
    ([det("car", BOX, color="red")], COLORS, 1.0, True),
    ([det("car", BOX, color="blue")], COLORS, 0.5, False),  # credits [count 1, colour 0]
    ([], COLORS, 0.0, False),  # credits [count 0, one 0 for the colour]
    # colour of the most confident object only: strict passes, partial sees 2 cars for 1
    ([det("car", BOX, 0.9, "red"), det("car", BOX, 0.5, "blue")], COLORS, 0.0, True),
    ([det("car", BOX, 0.5, "red"), det("car", BOX, 0.9, "blue")], COLORS, 0.0, False),
    # position: cow "right of" laptop; centres compared with margin 0.1 * (w_a + w_b) = 2 px on x
    ([LAPTOP, det("cow", (30, 0, 40, 10))], POSITION, 1.0, True),
    ([LAPTOP, det("cow", (30, 30, 40, 40))], POSITION, 1.0, True),  # diagonal: right of and below
    ([LAPTOP, det("cow", (12, 0, 22, 10))], POSITION, 1.0, True),  # offset 12: (12-2)/12 = 0.83 > 0.5
    ([LAPTOP, det("cow", (3, 0, 13, 10))], POSITION, 2 / 3, False),  # offset 3: (3-2)/3 = 0.33 <= 0.5
    ([LAPTOP, det("cow", (1, 0, 11, 10))], POSITION, 2 / 3, False),  # within the margin: no relation
    ([LAPTOP, det("cow", (-30, 0, -20, 10))], POSITION, 2 / 3, False),  # left of; credits [1, 1, 0]
    ([LAPTOP, det("cow", (0, 30, 10, 40))], POSITION, 2 / 3, False),  # straight below
    ([det("cow", (30, 0, 40, 10))], POSITION, 1 / 3, False),  # no laptop: credits [0, 1, 0]
    ([LAPTOP, LAPTOP, det("cow", (30, 0, 40, 10))], POSITION, 1 / 3, True),  # [1 - |1-2|, 1, 0 (no group)]
    # color_attr
    ([det("cat", BOX, color="red"), det("dog", BOX, color="blue")], COLOR_ATTR, 1.0, True),
    ([det("cat", BOX, color="blue"), det("dog", BOX, color="red")], COLOR_ATTR, 0.5, False),  # [1, 0, 1, 0]
    ([det("cat", BOX, color="red")], COLOR_ATTR, 0.5, False),  # [1, 1, 0, 0]
])
def test_geneval_rules(detections, metadata, partial, strict):
    got_partial, got_strict = rules.geneval_score(detections, metadata)
    assert got_partial == pytest.approx(partial) and got_strict is strict


def test_geneval_relations_follow_geneval_directions():
    # image y points down: smaller y is "above"
    assert rules._relations((0, 0, 10, 10), (0, 30, 10, 40), 0.1) == {"above"}
    assert rules._relations((0, 30, 10, 40), (0, 0, 10, 10), 0.1) == {"below"}
    assert rules._relations((-30, 0, -20, 10), (0, 0, 10, 10), 0.1) == {"left of"}
    assert rules._relations((30, 30, 40, 40), (0, 0, 10, 10), 0.1) == {"right of", "below"}
    assert rules._relations((0, 0, 10, 10), (1, 1, 11, 11), 0.1) == set()
    # revised offset 0.0007 < 1e-3 (GenEval's dead zone) although 0.0007 / 0.0009 > 0.5
    assert rules._relations((0.0009, 0, 0.0019, 0.001), (0, 0, 0.001, 0.001), 0.1) == set()


def test_geneval_needs_colors_where_asked():
    with pytest.raises(ValueError, match="color"):
        rules.geneval_score([det("car", BOX)], COLORS)


def test_object_crop_puts_object_on_grey():
    image = Image.fromarray(np.full((6, 8, 3), 200, np.uint8))
    mask = torch.zeros(6, 8, dtype=torch.bool)
    mask[2:4, 3:6] = True
    crop = np.asarray(geneval._object_crop(image, (2, 1, 7, 5), mask))
    assert crop.shape == (4, 5, 3)
    expected = np.full((4, 5), 153)  # "#999"
    expected[1:3, 1:4] = 200
    np.testing.assert_array_equal(crop[..., 0], expected)


def test_color_classifier_averages_prompt_templates(tiny):
    model, processor = clip.load_clip(tiny["clip"], torch.device("cpu"), torch.float32)
    crops = [Image.fromarray(a) for a in (torch.rand(4, 20, 30, 3) * 255).to(torch.uint8).numpy()]
    got = geneval._classify_colors(model, processor, crops, "tv remote", {})
    # independent reference: GenEval's three prompts per colour, unit embeddings averaged, renormalised
    texts = [p for c in rules.COLORS for p in
             (f"a photo of a {c} tv remote", f"a photo of a {c}-colored tv remote", f"a photo of a {c} object")]
    tokens = processor.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        text = model.get_text_features(**tokens).pooler_output.double()
        image = model.get_image_features(**processor.image_processor(crops, return_tensors="pt")).pooler_output
    text = (text / text.norm(dim=-1, keepdim=True)).view(10, 3, -1).mean(1)
    classifier = text / text.norm(dim=-1, keepdim=True)
    logits = image.double() / image.double().norm(dim=-1, keepdim=True) @ classifier.T
    assert got == [rules.COLORS[i] for i in logits.argmax(-1).tolist()]


def test_geneval_end_to_end(tiny):
    fn = rewards.load_reward("geneval", detector=tiny["detector"], clip_model=tiny["clip"])
    images, prompts, _ = batch(seed=4, size=(48, 40), n=3)
    metadata = [{"tag": "single_object", "include": [{"class": "computer mouse", "count": 1}]},
                {"tag": "single_object", "include": [{"class": "dog", "count": 1}]},
                {"tag": "colors", "include": [{"class": "computer mouse", "count": 1, "color": "red"}]}]
    scores, info = fn(images, prompts, metadata)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and set(info) == {"strict"}
    # the tiny detector's 5 queries all find a "mouse" (GenEval's "computer mouse") with score ~0.5:
    # partial credits [1 - |1 - 5|] = -3 / [0] / [-3, 0 for the colour]; strict: >= 1 mouse, no dog
    torch.testing.assert_close(scores, torch.tensor([-3.0, 0.0, -1.5]))
    assert info["strict"][0] == 1.0 and info["strict"][1] == 0.0
    assert info["strict"][2] in (0.0, 1.0)  # the colour path ran; the tiny CLIP's colour is arbitrary


# ---------------------------------------------------------------------------------------------------
# OCR


def test_quoted_target():
    assert rules.quoted_target('a sign that says "Hello World" on a wall') == "Hello World"
    assert rules.quoted_target('"first" and "second"') == "first"
    with pytest.raises(ValueError, match="no double-quoted text"):
        rules.quoted_target("a sign with no quotes")
    with pytest.raises(ValueError, match="no double-quoted text"):
        rules.quoted_target('an unmatched " quote')


@pytest.mark.parametrize("recognised, target, expected", [
    ("hello world", "Hello World", 1.0),  # case and spaces ignored
    ("xx HELLOWORLD yy", "hello world", 1.0),  # substring -> distance 0
    ("helo world", "hello world", 0.9),  # 1 edit over 10 characters
    ("kitten", "sitting", 1 - 3 / 7),  # the textbook Levenshtein distance 3
    ("", "cat", 0.0),
    ("abcdefghijklmnopqrs", "cat", 0.0),  # distance 17 capped at |target| = 3
    ("ba", "ab", 0.0),
    ("cta", "cat", 1 - 2 / 3),
])
def test_ocr_score(recognised, target, expected):
    assert rules.ocr_score(recognised, target) == pytest.approx(expected)


def test_ocr_score_rejects_empty_target():
    with pytest.raises(ValueError, match="empty"):
        rules.ocr_score("anything", "  ")


def test_ocr_reward_with_known_reader():
    seen = []

    def reader(array):  # "recognises" a string chosen by the image's red value
        seen.append(array.shape)
        return {0: "HELLO there", 255: "helo"}[int(array[0, 0, 0])]
    images = torch.stack([torch.zeros(3, 8, 12), torch.ones(3, 8, 12)])
    prompts = ['a neon sign "hello"', 'a cake with "hello" written on it']
    scores, _ = rewards.load_reward("ocr", reader=reader)(images, prompts, [{}, {}])
    torch.testing.assert_close(scores, torch.tensor([1.0, 0.8]))
    assert seen == [(8, 12, 3), (8, 12, 3)]


@pytest.mark.skipif(rewards.importable("easyocr") or rewards.importable("paddleocr"), reason="an engine is here")
def test_ocr_without_engine_says_how_to_install():
    with pytest.raises(ImportError, match=r"pip install -r requirements-rewards.txt \(PaddleOCR, the paper's engine\), "
                                          "or pip install easyocr"):
        rewards.load_reward("ocr")


def test_ocr_engine_is_paddleocr_with_flow_grpos_calls_when_both_are_installed(monkeypatch):
    calls = []

    class PaddleOCR:  # PaddleOCR 2.x's surface: ocr() -> [[(box, (text, confidence)), ...]] or [None]
        def __init__(self, **kwargs):
            calls.append(kwargs)

        def ocr(self, image, cls):
            calls.append({"cls": cls, "shape": image.shape})
            return [[(None, ("HEL", 0.9)), (None, ("LO", 0.8))]] if image[0, 0, 0] else [None]
    monkeypatch.setitem(sys.modules, "paddleocr", type(sys)("paddleocr"))
    sys.modules["paddleocr"].PaddleOCR = PaddleOCR
    monkeypatch.setattr(ocr, "importable", lambda module: module in ("paddleocr", "easyocr"))
    images = torch.stack([torch.ones(3, 8, 12), torch.zeros(3, 8, 12)])
    scores, _ = rewards.load_reward("ocr", engine="auto")(images, ['a sign "hello"', 'a sign "hello"'], [{}, {}])
    torch.testing.assert_close(scores, torch.tensor([1.0, 0.0]))  # "HELLO" contains the target; nothing read
    assert calls == [{"use_angle_cls": False, "lang": "en", "use_gpu": False, "show_log": False},
                     {"cls": False, "shape": (8, 12, 3)}, {"cls": False, "shape": (8, 12, 3)}]


@pytest.mark.parametrize("name, message", [("hpsv2", "pip install -r requirements-rewards.txt"),
                                           ("imagereward", "pip install image-reward")])
def test_optional_rewards_say_how_to_install(name, message):
    if rewards.importable({"hpsv2": "open_clip", "imagereward": "ImageReward"}[name]):
        pytest.skip(f"{name} is installed")
    with pytest.raises(ImportError, match=message):
        rewards.load_reward(name)


# ---------------------------------------------------------------------------------------------------
# HTTP reward server client


class RewardServer(http.server.BaseHTTPRequestHandler):
    """/ok: Flow-GRPO-style pickle answers; /json: the same in JSON; /slow: too slow; /error: HTTP 500;
    /flaky: HTTP 500 on the first request, then /ok."""
    requests = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        RewardServer.requests.append(self.path)
        if self.path == "/slow":
            time.sleep(0.5)
        if self.path == "/error" or (self.path == "/flaky" and RewardServer.requests.count("/flaky") == 1):
            return self.answer(500, b"Traceback: model exploded")
        json_wire = self.path == "/json"
        data = json.loads(body) if json_wire else pickle.loads(body)
        images = [Image.open(io.BytesIO(base64.b64decode(i) if json_wire else i), formats=["jpeg"])
                  for i in data["images"]]
        answer = {"scores": [float(len(p)) for p in data["prompts"]],
                  "strict_rewards": [float(m["n"]) for m in data["meta_datas"]],
                  "width": [im.size[0] for im in images],
                  "group_rewards": {"counting": [1.0]}}  # not per image: left out of info
        self.answer(200, json.dumps(answer).encode() if json_wire else pickle.dumps(answer))

    def answer(self, status, body):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    RewardServer.requests = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RewardServer)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def http_batch():
    images = torch.rand(2, 3, 16, 24)
    return images, ["a cat", "three dogs"], [{"n": 1}, {"n": 0}]


@pytest.mark.parametrize("path, wire", [("/ok", "pickle"), ("/json", "json")])
def test_http_reward(server, path, wire):
    scores, info = rewards.load_reward("http", url=server + path, wire=wire, timeout_s=2)(*http_batch())
    torch.testing.assert_close(scores, torch.tensor([5.0, 10.0]))
    assert set(info) == {"strict_rewards", "width"}
    torch.testing.assert_close(info["strict_rewards"], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(info["width"], torch.tensor([24.0, 24.0]))


def test_http_retries_server_errors(server):
    scores, _ = rewards.load_reward("http", url=server + "/flaky", retries=1, backoff_s=0.0)(*http_batch())
    torch.testing.assert_close(scores, torch.tensor([5.0, 10.0]))
    assert RewardServer.requests == ["/flaky", "/flaky"]


def test_http_error_status(server):
    with pytest.raises(RuntimeError, match="HTTP 500.*model exploded"):
        rewards.load_reward("http", url=server + "/error", retries=1, backoff_s=0.0)(*http_batch())
    assert RewardServer.requests == ["/error", "/error"]


def test_http_timeout(server):
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="unreachable after 1 attempts"):
        rewards.load_reward("http", url=server + "/slow", timeout_s=0.2, retries=0)(*http_batch())
    assert time.perf_counter() - start < 0.45


def test_http_unreachable(monkeypatch):
    listener = socket.socket()  # a server that accepts connections while the reward is built, then goes away
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    fn = rewards.load_reward("http", url=f"http://127.0.0.1:{port}", retries=1, backoff_s=0.0)
    listener.close()
    with pytest.raises(RuntimeError, match=f"127.0.0.1:{port} unreachable after 2 attempts"):
        fn(*http_batch())
    # a server that is not up when the run starts: one line when the reward is built, before any model loads
    with pytest.raises(ValueError, match=f"reward server http://127.0.0.1:{port} is not reachable"):
        rewards.load_reward("http", url=f"http://127.0.0.1:{port}", retries=2, backoff_s=0.0)
    monkeypatch.delenv("REWARD_SERVER_URL", raising=False)
    with pytest.raises(ValueError, match="REWARD_SERVER_URL"):
        rewards.load_reward("http")


# ---------------------------------------------------------------------------------------------------
# JPEG and composition


def test_jpeg_rewards_are_sizes_in_kilobytes():
    images = torch.stack([torch.full((3, 32, 32), 0.5), torch.rand(3, 32, 32)])
    size, _ = rewards.load_reward("jpeg_incompressibility")(images, ["", ""], [{}, {}])
    negated, _ = rewards.load_reward("jpeg_compressibility")(images, ["", ""], [{}, {}])
    expected = []
    for array in (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy():
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=95)
        expected.append(len(buffer.getvalue()) / 1000)
    torch.testing.assert_close(size, torch.tensor(expected))
    torch.testing.assert_close(negated, -size)
    assert size[0] < size[1]  # flat grey compresses better than noise


@pytest.fixture
def test_rewards(monkeypatch):
    """Two registered test rewards: "lengths" (prompt lengths, info "double") and "gated" (mean pixel,
    computed only after `gate` is set)."""
    gate, built = threading.Event(), []

    def lengths(device, dtype, offset=0.0):
        built.append("lengths")
        return lambda images, prompts, metadata: (
            torch.tensor([len(p) + offset for p in prompts]), {"double": torch.tensor([2.0 * len(p) for p in prompts])})

    def gated(device, dtype):
        def fn(images, prompts, metadata):
            assert gate.wait(5), "gate never opened"
            return images.mean((1, 2, 3)), {}
        return fn
    monkeypatch.setitem(rewards.REWARDS, "lengths", lengths)
    monkeypatch.setitem(rewards.REWARDS, "gated", gated)
    monkeypatch.setattr(rewards.registry, "_LOADED", {})  # no fn cached by another test (with another gate)
    return gate, built


def test_composition_is_weighted_sum(test_rewards):
    images = torch.rand(2, 3, 16, 16)
    prompts, metadata = ["abc", "a longer prompt"], [{}, {}]
    composed = rewards.make_reward("lengths=0.5, jpeg_compressibility=-2", lengths={"offset": 1.0})
    scores, info = composed(images, prompts, metadata)
    jpeg, _ = rewards.load_reward("jpeg_compressibility")(images, prompts, metadata)
    lengths = torch.tensor([4.0, 16.0])
    torch.testing.assert_close(scores, 0.5 * lengths - 2 * jpeg)
    assert set(info) == {"lengths", "lengths/double", "jpeg_compressibility"}
    torch.testing.assert_close(info["lengths"], lengths)
    torch.testing.assert_close(info["lengths/double"], torch.tensor([6.0, 30.0]))
    torch.testing.assert_close(info["jpeg_compressibility"], jpeg)


def test_composition_spec_errors_before_loading(test_rewards):
    _, built = test_rewards
    with pytest.raises(ValueError, match=r"unknown reward .nonexistent.*known rewards:.*geneval.*pickscore.*"
                                         r"its task.json names as \"reward_module\", with rewards.register"):
        rewards.make_reward("lengths=1,nonexistent=1")
    with pytest.raises(ValueError, match="must be a float"):
        rewards.make_reward("lengths=1,jpeg_compressibility=heavy")
    with pytest.raises(ValueError, match="not name=weight"):
        rewards.make_reward("lengths")
    with pytest.raises(ValueError, match="twice"):
        rewards.make_reward("lengths=1,lengths=2")
    with pytest.raises(ValueError, match="not in the spec"):
        rewards.make_reward("lengths=1", pickscore={"divide_by_26": True})
    assert built == []


def test_submit_equals_call_and_copies_images(test_rewards):
    gate, _ = test_rewards
    composed = rewards.make_reward("gated=2,lengths=1")
    images, prompts, metadata = torch.rand(3, 3, 8, 8), ["a", "bb", "ccc"], [{}, {}, {}]
    original = images.clone()
    future = composed.submit(images, prompts, metadata)
    images.zero_()  # the next rollout overwrites the buffer while the reward still waits
    gate.set()
    scores, info = future.result(timeout=5)
    expected, expected_info = composed(original, prompts, metadata)
    torch.testing.assert_close(scores, expected)
    assert info.keys() == expected_info.keys()
    torch.testing.assert_close(scores, 2 * original.mean((1, 2, 3)) + torch.tensor([1.0, 2.0, 3.0]))


def test_composition_rejects_bad_component_output(monkeypatch):
    monkeypatch.setitem(rewards.REWARDS, "listy", lambda device, dtype: lambda i, p, m: ([1.0] * len(p), {}))
    monkeypatch.setattr(rewards.registry, "_LOADED", {})
    with pytest.raises(TypeError, match="'listy' must return float32 CPU tensors"):
        rewards.make_reward("listy=1")(torch.rand(2, 3, 8, 8), ["a", "b"], [{}, {}])


def test_registry_has_every_reward_and_imports_nothing_heavy():
    """rewards/' own rewards, and the embedded world's once a toy task is loaded (its task.json names
    the module that registers them); importing rewards loads no model library."""
    assert {"pickscore", "clipscore", "aesthetic", "ocr", "geneval", "http", "jpeg_compressibility",
            "jpeg_incompressibility", "hpsv2", "imagereward"} <= set(rewards.REWARDS)
    from data import load_task
    load_task("ocr", "data/toy/ocr")
    assert {"toy_geneval", "toy_ocr", "toy_aesthetic"} <= set(rewards.REWARDS)
    import subprocess
    code = "import sys, rewards; print('transformers' in sys.modules, any(m.startswith('toy') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(Path(rewards.__file__).parents[1]))
    assert out.stdout.strip() == "False False"


def test_a_built_reward_is_not_reused_after_its_environment_setting_changes(monkeypatch):
    import re
    sources = "".join(p.read_text() for p in Path(rewards.__file__).parent.glob("*.py"))
    read = set(re.findall(r'(?<![\w.])setting\([^,()]+, "([A-Z0-9_]+)"', sources))
    missing = read - set(rewards.SETTINGS_ENV)
    assert read and not missing, f"settings missing from SETTINGS_ENV: {missing}"
    with socket.socket() as listener:  # a reachable server, named by the environment only
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        monkeypatch.setenv("REWARD_SERVER_URL", f"http://127.0.0.1:{listener.getsockname()[1]}")
        rewards.load_reward("http", retries=0)
    monkeypatch.delenv("REWARD_SERVER_URL")
    with pytest.raises(ValueError, match="REWARD_SERVER_URL"):  # built again, not taken from the cache
        rewards.load_reward("http", retries=0)


# ---------------------------------------------------------------------------------------------------
# The dry run builds every reward from the files here (check_spec(build=True))


def test_dry_run_builds_each_reward_from_the_files_here(tiny, tmp_path, monkeypatch):
    torch.save(aesthetic_state(8, seed=3), tmp_path / "mlp.pth")
    monkeypatch.setenv("AESTHETIC_MLP", str(tmp_path / "mlp.pth"))
    options = {"pickscore": {"model": tiny["pick"], "processor": tiny["pick_processor"]},
               "clipscore": {"model": tiny["clip"]}, "aesthetic": {"clip_model": tiny["clip"]},
               "geneval": {"detector": tiny["detector"], "clip_model": tiny["clip"]}}
    built = rewards.check_spec("pickscore=1,clipscore=1,aesthetic=1,geneval=1", build=True, **options)
    assert [line for line in built if "built on the CPU" in line] == [
        f"{name}: built on the CPU from the files here" for name in options]
    # without build, nothing is loaded: a folder that lacks its weights passes the check but not the build
    broken = tmp_path / "clip-without-weights"
    shutil.copytree(tiny["clip"], broken)
    for weights in broken.glob("model*.safetensors"):
        weights.unlink()
    assert rewards.check_spec("clipscore=1", clipscore={"model": str(broken)}) == [
        f"clipscore: CLIP model {broken}: a local folder"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing could fetch it: one line that names the folder and file
    with pytest.raises(FileNotFoundError, match=rf"clipscore reward: a file it needs is not here .*{broken}") as e:
        rewards.check_spec("clipscore=1", build=True, clipscore={"model": str(broken)})
    assert "\n" not in str(e.value) and "model.safetensors" in str(e.value)
    monkeypatch.delenv("HF_HUB_OFFLINE")  # online: the run would download it, so the dry run says so and goes on
    lines = rewards.check_spec("clipscore=1", build=True, clipscore={"model": str(broken)})
    assert lines[-1].startswith("clipscore: not built: a file is not here yet; the run downloads it on first use")
    assert "HF_HUB_OFFLINE" not in os.environ  # the build's own offline switch is put back


def test_dry_run_names_a_reward_that_fails_to_build_for_another_reason(monkeypatch):
    def broken_api(device, dtype):
        raise TypeError("__init__() got an unexpected keyword argument 'use_gpu'")  # PaddleOCR 3.x, say
    monkeypatch.setitem(rewards.REWARDS, "jpeg_compressibility", broken_api)
    with pytest.raises(ValueError, match="jpeg_compressibility reward cannot be built here: TypeError: "
                                         "__init__.. got an unexpected keyword argument 'use_gpu'"):
        rewards.check_spec("jpeg_compressibility=1", build=True)


def test_the_dry_run_build_downloads_nothing(monkeypatch):
    seen = []
    monkeypatch.setitem(rewards.REWARDS, "jpeg_compressibility",
                        lambda device, dtype: seen.append(rewards.registry.hub_kwargs()))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert rewards.check_spec("jpeg_compressibility=1", build=True)[-1].endswith("built on the CPU from the files here")
    assert seen == [{"local_files_only": True}] and "HF_HUB_OFFLINE" not in os.environ
