"""The CLIP-based rewards: PickScore, CLIPScore and the LAION aesthetic score (paper section 10).

  pickscore   s = exp(logit_scale) * <t/|t|, v/|v|>, PickScore_v1 (CLIP ViT-H/14) [/ 26 with divide_by_26]
  clipscore   s = <t/|t|, v/|v|>, openai/clip-vit-large-patch14
  aesthetic   s = MLP(v/|v|), the LAION improved aesthetic predictor on CLIP ViT-L/14's image embedding v

Options (environment variable, default):
  pickscore   model (PICKSCORE_MODEL, yuvalkirstain/PickScore_v1),
              processor (PICKSCORE_PROCESSOR, laion/CLIP-ViT-H-14-laion2B-s32B-b79K), divide_by_26
  clipscore   model (CLIP_MODEL, openai/clip-vit-large-patch14)
  aesthetic   clip_model (CLIP_MODEL), mlp_path (AESTHETIC_MLP; default: the LAION MLP, downloaded once into
              the hub cache and checked against its sha256)
One CLIP ViT-L/14 serves clipscore, aesthetic and geneval's colours (`load_clip`, cached per process).

Departure: CLIPScore is the plain cosine of the paper's table (Flow-GRPO trains on 100 * cos / 30).
"""
from __future__ import annotations

import functools
import hashlib
import os
import threading
import urllib.error
import urllib.request

import torch
import torch.nn.functional as F

from plumbing.model_files import hub_offline
from rewards.registry import as_scores, hub_kwargs, hub_status, pil_images, register, setting

CLIP_L14 = "openai/clip-vit-large-patch14"
AESTHETIC_MLP_NAME = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_MLP_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                     "sac%2Blogos%2Bava1-l14-linearMSE.pth")
# the published file (3,714,759 bytes; the same bytes as Flow-GRPO's flow_grpo/assets copy at ac4c86e)
AESTHETIC_MLP_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"
# a fast tokenizer called from two threads at once can fail ("Already borrowed")
_TOKENIZER_LOCK = threading.Lock()


def check_clip(clip_model=None):
    return [hub_status(setting(clip_model, "CLIP_MODEL", CLIP_L14), "CLIP model")]


def _check_pickscore(model=None, processor=None, divide_by_26=False):
    return [hub_status(setting(model, "PICKSCORE_MODEL", "yuvalkirstain/PickScore_v1"), "PickScore model"),
            hub_status(setting(processor, "PICKSCORE_PROCESSOR", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
                       "PickScore processor", "preprocessor_config.json")]


def _check_aesthetic(clip_model=None, mlp_path=None):
    path = aesthetic_mlp_path(setting(mlp_path, "AESTHETIC_MLP"), download=False)
    how = "" if os.path.isfile(path) else f" (downloaded from {AESTHETIC_MLP_URL} on first use)"
    mlp = f"LAION MLP {path}{how}"
    return [mlp, *check_clip(clip_model)]


@functools.lru_cache(maxsize=None)
def load_clip(path, device, dtype):
    """(CLIPModel, processor) from a hub id or folder; shared by clipscore, aesthetic and geneval."""
    from transformers import AutoProcessor, CLIPModel
    processor = AutoProcessor.from_pretrained(path, **hub_kwargs())
    model = CLIPModel.from_pretrained(path, dtype=dtype, **hub_kwargs())
    model = model.to(device).eval().requires_grad_(False)
    return model, processor


@torch.no_grad()
def clip_text_embeddings(model, processor, texts):
    with _TOKENIZER_LOCK:
        tokens = processor.tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    features = model.get_text_features(input_ids=tokens.input_ids.to(model.device),
                                       attention_mask=tokens.attention_mask.to(model.device)).pooler_output
    return F.normalize(features.float(), dim=-1)  # (N, D)


@torch.no_grad()
def clip_image_embeddings(model, processor, pils):
    pixels = processor.image_processor(images=pils, return_tensors="pt").pixel_values
    features = model.get_image_features(pixel_values=pixels.to(model.device, model.dtype)).pooler_output
    return F.normalize(features.float(), dim=-1)  # (N, D)


@register("pickscore", check=_check_pickscore, models={"yuvalkirstain/PickScore_v1 (CLIP ViT-H/14)": 986_000_000})
def _pickscore(device, dtype, model=None, processor=None, divide_by_26=False):
    from transformers import AutoProcessor, CLIPModel
    clip_processor = AutoProcessor.from_pretrained(
        setting(processor, "PICKSCORE_PROCESSOR", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"), **hub_kwargs())
    clip = CLIPModel.from_pretrained(setting(model, "PICKSCORE_MODEL", "yuvalkirstain/PickScore_v1"),
                                     dtype=dtype, **hub_kwargs()).to(device).eval().requires_grad_(False)

    def pickscore(images, prompts, metadata):
        text = clip_text_embeddings(clip, clip_processor, prompts)
        image = clip_image_embeddings(clip, clip_processor, pil_images(images, prompts, metadata))
        # s = exp(logit_scale) * <t/|t|, v/|v|>   (Flow-GRPO: / 26 to land near [0, 1])
        scores = clip.logit_scale.exp().float() * (text * image).sum(-1)
        return as_scores(scores / 26 if divide_by_26 else scores), {}
    return pickscore


@register("clipscore", check=lambda model=None: check_clip(model), models={CLIP_L14: 427_600_000})
def _clipscore(device, dtype, model=None):
    clip, clip_processor = load_clip(setting(model, "CLIP_MODEL", CLIP_L14), device, dtype)

    def clipscore(images, prompts, metadata):
        text = clip_text_embeddings(clip, clip_processor, prompts)
        image = clip_image_embeddings(clip, clip_processor, pil_images(images, prompts, metadata))
        # s = cos(t, v)
        return as_scores((text * image).sum(-1)), {}
    return clipscore


class AestheticMLP(torch.nn.Module):
    """LAION improved aesthetic predictor head: Linear 768-1024-128-64-16-1, no activations. The Dropouts
    only keep the published state-dict keys (layers.0, .2, .4, .6, .7); they are inactive in eval."""

    def __init__(self, input_size=768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1))

    def forward(self, embeddings):  # (B, input_size) -> (B,)
        return self.layers(embeddings).squeeze(-1)


def aesthetic_mlp_path(path=None, download: bool = True) -> str:
    """The LAION MLP's weights file: `path` (mlp_path= or AESTHETIC_MLP) when given; else its copy in the hub
    cache (<HF_HUB_CACHE>/diffusion-opd/), downloaded once from AESTHETIC_MLP_URL and checked against
    AESTHETIC_MLP_SHA256 (download=False: only say whether it could be). A FileNotFoundError in one line
    says what to download and where to put it."""
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"aesthetic reward: MLP weights not found at {path!r} "
                                    f"(mlp_path= or AESTHETIC_MLP); "
                                    f"unset it to download {AESTHETIC_MLP_NAME} automatically")
        return path
    from huggingface_hub import constants
    cached = os.path.join(constants.HF_HUB_CACHE, "diffusion-opd", AESTHETIC_MLP_NAME)
    if os.path.isfile(cached):
        return cached
    if hub_offline():
        raise FileNotFoundError(f"aesthetic reward: the LAION MLP is not in the cache and HF_HUB_OFFLINE is "
                                f"set: download {AESTHETIC_MLP_URL} to {cached}, "
                                "or set AESTHETIC_MLP to its path")
    if not download:
        return cached
    try:
        with urllib.request.urlopen(AESTHETIC_MLP_URL, timeout=120) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as e:
        raise FileNotFoundError(f"aesthetic reward: cannot download {AESTHETIC_MLP_URL} "
                                f"({getattr(e, 'reason', e)}); download it to {cached}, "
                                "or set AESTHETIC_MLP to its path") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != AESTHETIC_MLP_SHA256:
        raise FileNotFoundError(f"aesthetic reward: {AESTHETIC_MLP_URL} has sha256 {digest[:12]}, "
                                f"not the pinned {AESTHETIC_MLP_SHA256[:12]} (changed upstream or damaged); "
                                "set AESTHETIC_MLP to a copy you trust")
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    tmp = f"{cached}.{os.getpid()}.tmp"  # one temporary file per process: never two writers on one path
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, cached)
    return cached


def load_aesthetic_mlp(path):
    """AestheticMLP from sac+logos+ava1-l14-linearMSE.pth (a torch state dict) or a .safetensors copy."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"aesthetic reward: MLP weights not found at {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    mlp = AestheticMLP(input_size=state["layers.0.weight"].shape[1])
    mlp.load_state_dict(state)
    return mlp.eval().requires_grad_(False)


@register("aesthetic", check=_check_aesthetic, models={CLIP_L14: 427_600_000, "LAION aesthetic MLP": 928_000})
def _aesthetic(device, dtype, clip_model=None, mlp_path=None):
    # the MLP is kept in float32
    mlp = load_aesthetic_mlp(aesthetic_mlp_path(setting(mlp_path, "AESTHETIC_MLP"))).to(device)
    clip, clip_processor = load_clip(setting(clip_model, "CLIP_MODEL", CLIP_L14), device, dtype)

    @torch.no_grad()
    def aesthetic(images, prompts, metadata):
        # s = MLP(v / |v|), v = CLIP-L/14 image embedding
        image = clip_image_embeddings(clip, clip_processor, pil_images(images, prompts, metadata))
        return as_scores(mlp(image.to(device))), {}
    return aesthetic
