"""Human-preference models: HPSv2.1 (paper Table 1's HPSv2.1 column) and ImageReward (optional).

  hpsv2        s = <image_features, text_features>, both unit norm: HPSv2.1's weights in open_clip's ViT-H-14
  imagereward  ImageReward-v1.0's score (pip install image-reward)

Options: hpsv2: checkpoint (HPSV2_CHECKPOINT, else xswu/HPSv2 HPS_v2.1_compressed.pt from the hub cache),
model_name (open_clip's architecture, ViT-H-14); pip install -r requirements-rewards.txt.
imagereward: model ("ImageReward-v1.0").

Departure: HPSv2.1 is built from open_clip_torch's ViT-H-14 (which ships the tokenizer's vocabulary)
with the HPS_v2.1 weights loaded into it, where Flow-GRPO calls the hpsv2 package's copy of open_clip:
the hpsv2 1.2.0 wheel lacks that vocabulary, pins pytest and protobuf below this project's, and first
downloads the LAION ViT-H weights that HPSv2.1's replace. HPSv2's own evaluation transform (resize on
the tensor, pad to a square; open_clip_torch's resizes the PIL image and crops), the same architecture,
weights and score: bench/hpsv2_same.py compares the two builds on one set of weights.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from plumbing.model_files import hub_offline
from rewards.registry import as_scores, importable, pil_images, register, setting, uint8_images

HPSV2_REPO, HPSV2_FILE = "xswu/HPSv2", "HPS_v2.1_compressed.pt"
HPSV2_INSTALL = "pip install -r requirements-rewards.txt (open_clip_torch and torchvision)"


def hpsv2_checkpoint(checkpoint=None, download: bool = True) -> str:
    """HPSv2.1's weights file: `checkpoint` (or HPSV2_CHECKPOINT), else xswu/HPSv2's
    HPS_v2.1_compressed.pt from the hub cache, downloaded once (the hub checks it); one line saying
    what to download when offline."""
    path = setting(checkpoint, "HPSV2_CHECKPOINT")
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"hpsv2 reward: checkpoint {path!r} does not exist "
                                    "(checkpoint= or HPSV2_CHECKPOINT)")
        return path
    from huggingface_hub import hf_hub_download
    try:
        return hf_hub_download(HPSV2_REPO, HPSV2_FILE, local_files_only=hub_offline() or not download)
    except Exception as e:  # not cached offline, unknown, unreachable: the hub's error types vary by version
        if not download and not hub_offline():
            return ""  # not cached, will be downloaded on first use
        raise FileNotFoundError(f"hpsv2 reward: {HPSV2_FILE} of {HPSV2_REPO} is not in the hub cache and "
                                f"could not be fetched ({type(e).__name__}): "
                                f"huggingface-cli download {HPSV2_REPO} {HPSV2_FILE}, "
                                "or set HPSV2_CHECKPOINT to its path") from None


def _check_hpsv2(checkpoint=None, model_name="ViT-H-14"):
    if not importable("open_clip"):
        raise ImportError(f"the hpsv2 reward (HPSv2.1) needs open_clip: {HPSV2_INSTALL}")
    path = hpsv2_checkpoint(checkpoint, download=False)
    return [f"HPSv2.1 checkpoint {path or HPSV2_REPO + '/' + HPSV2_FILE + ' (downloaded on first use)'}"]


def hps_pixels(images, prompts, metadata, size: int, mean, std) -> torch.Tensor:
    """HPSv2's evaluation transform (its copy of open_clip, transform.py: ResizeMaxSize, as
    create_model_and_transforms(light_augmentation=True) builds preprocess_val): the uint8 image as
    floats in [0, 1], its longer side resized to `size` on the tensor (bicubic, antialiased: torchvision's
    tensor resize), zero-padded to a centred square, normalised. (B, 3, H, W) -> (B, 3, size, size)."""
    x = torch.from_numpy(uint8_images(images, prompts, metadata)).permute(0, 3, 1, 2).float() / 255
    height, width = x.shape[-2:]
    scale = size / max(height, width)
    if scale != 1.0:
        new_h, new_w = round(height * scale), round(width * scale)
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        pad_h, pad_w = size - new_h, size - new_w
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@register("hpsv2", check=_check_hpsv2, models={"HPSv2.1 (open_clip ViT-H-14)": 986_000_000})
def _hpsv2(device, dtype, checkpoint=None, model_name="ViT-H-14"):
    """HPSv2.1: open_clip's ViT-H-14 with the HPS_v2.1 weights, scored as Flow-GRPO's hpsv2_scorer.py
    (94e23ee): HPSv2's evaluation transform, s = <image_features, text_features>, both unit norm, one
    prompt per image; float32 weights, autocast on CUDA (its precision="amp"). Built from open_clip_torch,
    not the hpsv2 package (the departure above); `model_name` is open_clip's architecture (a tiny one in tests)."""
    try:
        import open_clip
    except ImportError as error:
        raise ImportError(f"the hpsv2 reward (HPSv2.1) needs open_clip: {HPSV2_INSTALL}") from error
    checkpoint = hpsv2_checkpoint(checkpoint)
    # the architecture without its LAION weights (the hpsv2 package downloads 3.9 GB of them, then
    # overwrites every tensor with HPSv2.1's), then HPSv2.1's weights, every key checked
    model = open_clip.create_model(model_name, pretrained=None, output_dict=True)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model.load_state_dict(state.get("state_dict", state))
    model = model.to(device).eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(model_name)
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]  # square, as every open_clip ViT-H-14 is
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD

    @torch.no_grad()
    def hpsv2(images, prompts, metadata):
        pixels = hps_pixels(images, prompts, metadata, size, mean, std).to(device)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            outputs = model(pixels, tokenizer(list(prompts)).to(device))
        # s = <image_features, text_features> (both unit norm), one prompt per image
        return as_scores((outputs["image_features"].float() * outputs["text_features"].float()).sum(-1)), {}
    return hpsv2


@register("imagereward", models={"ImageReward-v1.0 (BLIP ViT-L)": 447_000_000})
def _imagereward(device, dtype, model="ImageReward-v1.0"):
    try:
        import ImageReward
    except ImportError as error:
        raise ImportError("the imagereward reward needs its package: pip install image-reward") from error
    scorer = ImageReward.load(model, device=str(device)).eval()

    @torch.no_grad()
    def imagereward(images, prompts, metadata):
        pils = pil_images(images, prompts, metadata)
        return as_scores([float(scorer.score(prompt, pil)) for prompt, pil in zip(prompts, pils)]), {}
    return imagereward
