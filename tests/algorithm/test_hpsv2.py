"""HPSv2.1 (rewards/preference.py's departure): open_clip's architecture with the HPSv2.1 weights loaded into it.

Two levels, because open_clip needs a torchvision that does not import beside this project's CPU torch
2.13.0 file (it does with torch 2.14.1 + torchvision 0.29.1, or on a CUDA machine with torchvision 0.28.0):
- everywhere: a stand-in of open_clip's API checks what the reward asks of it (the architecture without
  LAION's weights, HPSv2.1's weights loaded with every key checked, the score as the cosine of the two
  unit-norm feature vectors), and HPSv2's evaluation transform is checked against PIL's resampler;
- where open_clip imports: a tiny real open_clip architecture with random weights saved as an HPSv2.1
  checkpoint, scored by the reward and by open_clip's own encoders (an independent path: HPSv2's
  transform written with torchvision, prompts through open_clip's tokenizer, features normalised here).
  On the project's CPU machines it runs in a side venv:
    python3 -m venv /tmp/hps && /tmp/hps/bin/pip install torch==2.14.1 torchvision==0.29.1 \
        open_clip_torch==3.3.0 pytest && /tmp/hps/bin/python -m pytest tests/algorithm/test_hpsv2.py
bench/hpsv2_same.py compares the reward with the hpsv2 package's own model on one set of ViT-H-14 weights.
"""
import json
import sys

import pytest
import torch

import rewards
from rewards import preference


def _standin(monkeypatch, calls):
    """A stand-in open_clip module: features = a fixed projection of the pixels / of the token ids."""
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.image = torch.nn.Linear(3, 4)
            self.text = torch.nn.Linear(2, 4)
            self.visual = type("Visual", (), {"image_size": (7, 7)})()

        def forward(self, pixels, tokens):
            calls.append(("forward", pixels, tokens))
            image = self.image(pixels.mean((2, 3)))
            text = self.text(tokens.float())
            return {"image_features": image / image.norm(dim=-1, keepdim=True),
                    "text_features": text / text.norm(dim=-1, keepdim=True)}

        def load_state_dict(self, state, strict=True):
            calls.append(("load_state_dict", sorted(state), strict))
            return super().load_state_dict(state, strict)

    module = type(sys)("open_clip")

    def create_model(name, pretrained="laion2b", **options):
        calls.append(("create", name, pretrained, options))
        return Model()

    module.create_model = create_model
    module.get_tokenizer = lambda name: lambda texts: torch.tensor([[len(t), t.count(" ")] for t in texts])
    module.OPENAI_DATASET_MEAN, module.OPENAI_DATASET_STD = (0.5, 0.25, 0.0), (0.5, 0.25, 2.0)
    monkeypatch.setitem(sys.modules, "open_clip", module)
    importable = rewards.importable
    monkeypatch.setattr(preference, "importable", lambda name: name == "open_clip" or importable(name))
    return Model


def test_hpsv2_asks_open_clip_for_the_architecture_then_loads_hpsv21_weights(tmp_path, monkeypatch):
    calls = []
    Model = _standin(monkeypatch, calls)
    torch.manual_seed(0)
    weights = Model().state_dict()
    torch.save({"state_dict": weights, "epoch": 3}, tmp_path / "HPS_v2.1_compressed.pt")
    reward = preference._hpsv2(torch.device("cpu"), torch.float32, checkpoint=str(tmp_path / "HPS_v2.1_compressed.pt"))
    assert calls[0] == ("create", "ViT-H-14", None, {"output_dict": True})  # no LAION weights downloaded
    assert calls[1] == ("load_state_dict", sorted(weights), True)          # every key, strict
    images = torch.rand(2, 3, 14, 14)
    prompts = ["a cat", "two red dogs"]
    scores, info = reward(images, prompts, [{}, {}])
    _, pixels, tokens = calls[-1]
    # what the model was given: HPSv2's transform at the model's size with the constants open_clip names
    torch.testing.assert_close(pixels, preference.hps_pixels(images, prompts, [{}, {}], 7, (0.5, 0.25, 0.0),
                                                          (0.5, 0.25, 2.0)), atol=0, rtol=0)
    assert tokens.tolist() == [[5, 1], [12, 2]]
    # the reference, computed here from the same weights: cosine of the two features of each pair
    reference = Model()
    reference.load_state_dict(weights)
    expected = torch.nn.functional.cosine_similarity(reference.image(pixels.mean((2, 3))),
                                                     reference.text(tokens.float()), dim=-1)
    torch.testing.assert_close(scores, expected.detach(), atol=1e-6, rtol=1e-5)
    assert info == {} and scores.shape == (2,)


@pytest.mark.parametrize("height, width", [(512, 512), (300, 200), (64, 48)])
def test_hps_pixels_is_hpsv2s_evaluation_transform(height, width):
    """Against PIL's float resampler (the antialiased bicubic that torchvision's tensor resize ports),
    then the zero padding and normalisation written out here: longest side to 224, centred."""
    import numpy as np
    from PIL import Image
    torch.manual_seed(0)
    images = torch.rand(1, 3, height, width)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    got = preference.hps_pixels(images, ["p"], [{}], 224, mean, std)[0]
    quantised = (images[0] * 255).round() / 255
    scale = 224 / max(height, width)
    new_h, new_w = round(height * scale), round(width * scale)
    top, left = (224 - new_h) // 2, (224 - new_w) // 2
    expected = torch.zeros(3, 224, 224)
    for c in range(3):
        plane = Image.fromarray(quantised[c].numpy().astype(np.float32), mode="F").resize((new_w, new_h), Image.BICUBIC)
        expected[c, top:top + new_h, left:left + new_w] = torch.tensor(np.array(plane))
    expected = (expected - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    # the two resamplers agree to ~1e-5 on [0, 1] pixels (float32 taps); / std (~0.27) makes it ~4e-5.
    # A bilinear kernel or no antialiasing differs by > 1e-2, a padding one pixel off by > 1
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=0)


def test_hpsv2_refuses_a_checkpoint_that_misses_a_weight(tmp_path, monkeypatch):
    Model = _standin(monkeypatch, [])
    weights = Model().state_dict()
    weights.pop("text.bias")
    torch.save({"state_dict": weights}, tmp_path / "partial.pt")
    with pytest.raises(RuntimeError, match="text.bias"):
        preference._hpsv2(torch.device("cpu"), torch.float32, checkpoint=str(tmp_path / "partial.pt"))


def test_hpsv2_without_open_clip_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip -> ImportError
    monkeypatch.setattr(preference, "importable", lambda name: False)
    for build in (lambda: preference._hpsv2(torch.device("cpu"), torch.float32),
                  lambda: rewards.CHECKS["hpsv2"]()):
        with pytest.raises(ImportError, match="pip install -r requirements-rewards.txt"):
            build()


TINY = {"embed_dim": 8,
        "vision_cfg": {"image_size": 28, "layers": 1, "width": 16, "head_width": 8, "patch_size": 14},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}


def test_hpsv2_on_a_tiny_real_open_clip_equals_open_clips_own_encoders(tmp_path):
    open_clip = pytest.importorskip("open_clip", reason="open_clip needs a torchvision that imports beside torch")
    (tmp_path / "tiny-hps.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(tmp_path / "tiny-hps.json")
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-hps", pretrained=None)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "hps.pt")
    reward = preference._hpsv2(torch.device("cpu"), torch.float32, checkpoint=str(tmp_path / "hps.pt"),
                            model_name="tiny-hps")
    torch.manual_seed(1)
    images = torch.rand(3, 3, 40, 40)
    prompts = ["a photo of a cat", "a red car", "a sign that says \"hello\""]
    scores, _ = reward(images, prompts, [{}] * 3)
    # the reference: HPSv2's evaluation transform written with torchvision (ToTensor, tensor resize of the
    # longer side, centred zero pad, Normalize), then open_clip's encoders, normalised here
    import torchvision.transforms.functional as TF
    from PIL import Image
    pils = [Image.fromarray((image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()) for image in images]
    pixels = torch.stack([TF.normalize(TF.resize(TF.to_tensor(p), [28, 28], TF.InterpolationMode.BICUBIC),
                                       open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD) for p in pils])
    with torch.no_grad():
        model.eval()
        image = model.encode_image(pixels)
        text = model.encode_text(open_clip.get_tokenizer("tiny-hps")(prompts))
    expected = (image / image.norm(dim=-1, keepdim=True) * text / text.norm(dim=-1, keepdim=True)).sum(-1)
    # float32 sums of 8 unit-scale products: 1e-5 is ~100 ulps of the largest term
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    assert scores.abs().max() <= 1 + 1e-6
