r"""The reward registry: every reward of paper section 10 behind one signature.

    fn(images, prompts, metadata) -> (scores, info)
      images   (B, 3, H, W) float in [0, 1], any device
      prompts  list[str], len B;  metadata  list[dict], len B (may be empty dicts)
      scores   (B,) float32 CPU tensor;  info  dict[str, (B,) float32 CPU tensor] (extra values to log)

A factory `REWARDS[name](device, dtype, **options) -> fn` builds a reward; heavy imports and model
loads happen inside it, never at import time. `load_reward` caches what a factory returns per
(name, device, dtype, options), so each model loads once per process. `make_reward("a=1,b=0.5")`
returns the weighted sum r = sum_k w_k r_k with the same signature, plus `submit()`, which scores in
a background thread so that scoring overlaps the next rollout.

Rewards (section 10; s = scores):
  pickscore        s = exp(logit_scale) * cos(text, image), PickScore_v1 (CLIP-H) [/26 with divide_by_26]
  clipscore        s = cos(text, image), openai/clip-vit-large-patch14
  aesthetic        s = MLP(image_emb / |image_emb|), LAION improved aesthetic predictor on CLIP-L/14
  ocr              s = 1 - min(d, |y|) / |y|, y = first "quoted" span, d = 0 if y in OCR text else Levenshtein
  geneval          rules.py's GenEval rules on Mask2Former detections + CLIP-L/14 colours;
                   s = Flow-GRPO partial credit, info["strict"] = GenEval's all-clauses accuracy
                   (the number the paper reports)
  http             scores from an external reward server (Flow-GRPO reward-server wire format, below)
  jpeg_incompressibility / jpeg_compressibility   s = +/- JPEG size in kB at quality 95 (DDPO)
  hpsv2            s = cos(text, image), HPSv2.1 on open_clip ViT-H-14 (departure 9)
  imagereward      ImageReward-v1.0 (optional package: pip install image-reward)
The OCR engine, open_clip (HPSv2.1) and other reward extras: requirements-rewards.txt, pinned to install beside requirements.txt
without moving any of its pins (`make check-extras` asks pip's resolver).
Other modules register their own rewards with `register` (a dataset's task.json names the module that
registers its reward as "reward_module": data.load_task imports it), e.g. the embedded world's.

Options and environment variables (an option wins over its variable, which wins over the default):
  pickscore   model (PICKSCORE_MODEL, yuvalkirstain/PickScore_v1),
              processor (PICKSCORE_PROCESSOR, laion/CLIP-ViT-H-14-laion2B-s32B-b79K), divide_by_26
  clipscore   model (CLIP_MODEL, openai/clip-vit-large-patch14)
  aesthetic   clip_model (CLIP_MODEL), mlp_path (AESTHETIC_MLP; default: the LAION MLP, downloaded once into
              the hub cache and checked against its sha256)
  ocr         engine ("auto": PaddleOCR if installed, else EasyOCR | "paddleocr" | "easyocr") or reader
              (a callable: HxWx3 uint8 array -> str); PaddleOCR: pip install -r requirements-rewards.txt
  geneval     detector (GENEVAL_DETECTOR, facebook/mask2former-swin-small-coco-instance),
              clip_model (CLIP_MODEL), threshold 0.3, counting_threshold 0.9, max_objects 16,
              position_margin 0.1
  http        url (REWARD_SERVER_URL), timeout_s 60, retries 3, backoff_s 1, wire "pickle" | "json"
  hpsv2       checkpoint (HPSV2_CHECKPOINT, else xswu/HPSv2 HPS_v2.1_compressed.pt from the hub cache),
              model_name (open_clip's architecture, ViT-H-14); pip install -r requirements-rewards.txt
With HF_HUB_OFFLINE set, weights not in the cache fail with one line naming what to download and where.
`check_spec` says whether every reward of a spec can be built here (its weights cached or downloadable,
its package installed, its server reachable) and, in the scripts' --dry_run, builds each one on the CPU
from the files already here (downloads forbidden), naming a file that is missing.
Model ids may be local folders; with HF_HUB_OFFLINE set, loads pass local_files_only=True.

HTTP wire format (Flow-GRPO's reward-server, github.com/yifan123/reward-server, app_geneval.py): one
POST per call to `url`, body = pickle (or JSON with wire="json") of
  {"images": [JPEG bytes (base64 text in JSON)], "prompts": [...], "meta_datas": [...], "only_strict": False}
answered with a pickled (JSON) dict holding "scores" (GenEval server) or "outputs" (DeQA/UnifiedReward
servers) as a list of B numbers; every other list of B numbers is returned in info under its own key
(Flow-GRPO's GenEval server: scores = partial credit, info["rewards"] = GenEval accuracy,
info["strict_rewards"] = its exact-count accuracy).
HTTP 5xx and connection errors are retried `retries` times with exponential backoff. Unpickle only the
answers of servers you trust; wire="json" avoids pickle on both sides.

Departures from the paper / reference code, with reasons:
 1. GenEval detector: the transformers Mask2Former (facebook/mask2former-swin-small-coco-instance, its
    own 384 px preprocessing) instead of mmdet's checkpoint at 1333x800, so no mmdet/mmcv. Boxes come
    from masks as in mmdet (mask2bbox); no NMS (GenEval's default max_overlap=1 disables it). Its COCO
    names "mouse", "remote", "keyboard" are renamed to GenEval's "computer mouse", "tv remote",
    "computer keyboard". Scores can differ slightly from the official GenEval numbers.
 2. GenEval colours: transformers' openai/clip-vit-large-patch14 (the weights of open_clip ViT-L-14
    "openai") with its processor, instead of open_clip's transform.
 3. Mask2Former's training loss needs scipy (Hungarian matching); inference does not, and scipy is not
    a dependency, so its import check is bypassed while the detector is built (_without_scipy_check).
 4. GenEval partial credit follows Flow-GRPO's evaluate_reward (reward-server/gen_eval.py) except that
    a failed relation adds one 0 clause (Flow-GRPO appends 0 and then 1 for it, a bug). Like Flow-GRPO
    it ignores "exclude" and is not clamped: 3 cats for "a cat" give 1 - |1 - 3| / 1 = -1.
 5. info["strict"] is GenEval's own rule (evaluate_images.py: at least n objects, exclude clauses),
    not Flow-GRPO's exact-count "strict_rewards".
 6. OCR: a prompt without a double-quoted span raises ValueError (Flow-GRPO: IndexError), OCR errors
    propagate instead of scoring 0, and Levenshtein is computed in rules.py (python-Levenshtein is not a dep).
    The engine is PaddleOCR 2.x as in Flow-GRPO, at 2.10.0 (Flow-GRPO: 2.9.1, which needs numpy < 2; the
    same API); EasyOCR is accepted where PaddleOCR is not installed, and its scores are not the paper's.
 7. CLIPScore is the plain cosine of the paper's table (Flow-GRPO trains on 100 * cos / 30).
 8. JPEG rewards are DDPO's (kB, negated); Flow-GRPO divides the compressibility by 500.
 9. HPSv2.1 is built from open_clip_torch's ViT-H-14 (which ships the tokenizer's vocabulary) with the
    HPS_v2.1 weights loaded into it, where Flow-GRPO calls the hpsv2 package's copy of open_clip: the
    hpsv2 1.2.0 wheel lacks that vocabulary, pins pytest and protobuf below this project's, and first
    downloads the LAION ViT-H weights that HPSv2.1's replace. HPSv2's own evaluation transform (resize
    on the tensor, pad to a square; open_clip_torch's resizes the PIL image and crops), the same
    architecture, weights and score: bench/hpsv2_same.py compares the two builds on one set of weights.
 (Not a departure: every image reward quantises images to uint8 first, as the reference scorers do.)

Run (CPU; 1 GPU; with N GPUs every rank builds its own rewards on its own device, e.g. f"cuda:{rank}"):
  python -c "import rewards, torch; r = rewards.make_reward('jpeg_incompressibility=1'); \
             print(r(torch.rand(2, 3, 64, 64), ['a cat', 'a dog'], [{}, {}]))"
  python -c "import rewards, torch; r = rewards.make_reward('pickscore=1,clipscore=1', 'cuda', torch.float16); \
             print(r(torch.rand(2, 3, 512, 512, device='cuda'), ['a cat', 'a dog'], [{}, {}]))"
  python -m pytest tests/test_rewards.py -q
"""
import base64
import concurrent.futures
import functools
import io
import json
import numbers
import os
import pickle
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from PIL import Image

from rules import COLORS, _kept_objects, geneval_score, ocr_score, quoted_target

REWARDS = {}  # name -> factory(device, dtype, **options) -> fn(images, prompts, metadata)
_LOADED = {}  # (name, device, dtype, options) -> fn
_LOAD_LOCK = threading.Lock()
# a fast tokenizer called from two threads at once can fail ("Already borrowed")
_TOKENIZER_LOCK = threading.Lock()

CLIP_L14 = "openai/clip-vit-large-patch14"
AESTHETIC_MLP_NAME = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_MLP_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                     "sac%2Blogos%2Bava1-l14-linearMSE.pth")
# the published file (3,714,759 bytes; the same bytes as Flow-GRPO's flow_grpo/assets copy at ac4c86e)
AESTHETIC_MLP_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"
HPSV2_REPO, HPSV2_FILE = "xswu/HPSv2", "HPS_v2.1_compressed.pt"
HPSV2_INSTALL = "pip install -r requirements-rewards.txt (open_clip_torch and torchvision)"


def register(name):
    """Decorator: REWARDS[name] = factory."""
    def add(factory):
        assert name not in REWARDS, f"reward {name!r} is registered twice"
        REWARDS[name] = factory
        return factory
    return add


def load_reward(name, device="cpu", dtype=torch.float32, **options):
    """The reward fn of REWARDS[name], built once per (name, device, dtype, options) and process."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))}")
    device = torch.device(device)
    # the environment settings a reward reads where an option is not given are part of what it is
    key = (name, str(device), dtype, tuple(sorted(options.items())), tuple(os.environ.get(v) for v in SETTINGS_ENV))
    try:
        hash(key)
    except TypeError as error:
        raise TypeError(f"options of reward {name!r} must be hashable (use tuples, not lists): "
                        f"{options}") from error
    with _LOAD_LOCK:
        if key not in _LOADED:
            _LOADED[key] = REWARDS[name](device, dtype, **options)
        return _LOADED[key]


def parse_spec(spec):
    """"name=weight,name=weight" -> {name: weight}; every name is checked before anything loads."""
    weights = {}
    for entry in spec.split(","):
        name, has_weight, weight = (part.strip() for part in entry.partition("="))
        if not has_weight:
            raise ValueError(f"reward spec entry {entry!r} is not name=weight (spec {spec!r})")
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r} in {spec!r}; "
                             f"known rewards: {', '.join(sorted(REWARDS))}")
        if name in weights:
            raise ValueError(f"reward {name!r} appears twice in {spec!r}")
        try:
            weights[name] = float(weight)
        except ValueError:
            raise ValueError(f"weight of reward {name!r} must be a float, "
                             f"got {weight!r} in {spec!r}") from None
    return weights


def make_reward(spec, device="cpu", dtype=torch.float32, **options):
    """The weighted sum of the rewards in spec; options[name] is the dict of options of reward name,
    e.g. make_reward("pickscore=1,aesthetic=1",
                     aesthetic={"mlp_path": "sac+logos+ava1-l14-linearMSE.pth"})."""
    weights = parse_spec(spec)
    stray = sorted(set(options) - set(weights))
    if stray:
        raise ValueError(f"options given for rewards {stray} that are not in the spec {spec!r}")
    fns = {name: load_reward(name, device, dtype, **options.get(name, {})) for name in weights}
    return ComposedReward(weights, fns)


def _hub_status(ref: str, what: str, filename: str = "config.json") -> str:
    """Where the model `ref` (a folder or a hub id) comes from, checked without loading it."""
    if os.path.isdir(ref):
        return f"{what} {ref}: a local folder"
    from model import check_hub_repo
    check_hub_repo(ref, what, filename)
    return f"{what} {ref}: in the hub cache or fetchable"


def _check_clip(clip_model=None):
    return [_hub_status(_setting(clip_model, "CLIP_MODEL", CLIP_L14), "CLIP model")]


def _check_aesthetic(clip_model=None, mlp_path=None):
    path = aesthetic_mlp_path(_setting(mlp_path, "AESTHETIC_MLP"), download=False)
    how = "" if os.path.isfile(path) else f" (downloaded from {AESTHETIC_MLP_URL} on first use)"
    mlp = f"LAION MLP {path}{how}"
    return [mlp, *_check_clip(clip_model)]


def _check_hpsv2(checkpoint=None, model_name="ViT-H-14"):
    if not _importable("open_clip"):
        raise ImportError(f"the hpsv2 reward (HPSv2.1) needs open_clip: {HPSV2_INSTALL}")
    path = hpsv2_checkpoint(checkpoint, download=False)
    return [f"HPSv2.1 checkpoint {path or HPSV2_REPO + '/' + HPSV2_FILE + ' (downloaded on first use)'}"]


def _check_ocr(engine="auto", reader=None):
    if reader is None and not _ocr_engines(engine):
        raise ImportError(f"ocr reward (engine={engine!r}) needs an OCR engine: {OCR_INSTALL}")
    return [f"OCR engine {engine}" if reader is None else "OCR reader given"]


def _check_http(url=None, timeout_s=60.0):
    url = _setting(url, "REWARD_SERVER_URL")
    if not url:
        raise ValueError("http reward needs url=... or REWARD_SERVER_URL, e.g. http://127.0.0.1:18085")
    check_reachable(url, timeout_s)
    return [f"reward server {url}: reachable"]


CHECKS = {  # name -> fn(**options) -> lines: what each reward needs, checked without loading it
    "pickscore": lambda model=None, processor=None, divide_by_26=False: [
        _hub_status(_setting(model, "PICKSCORE_MODEL", "yuvalkirstain/PickScore_v1"), "PickScore model"),
        _hub_status(_setting(processor, "PICKSCORE_PROCESSOR", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
                    "PickScore processor", "preprocessor_config.json")],
    "clipscore": lambda model=None: _check_clip(model),
    "aesthetic": _check_aesthetic,
    "geneval": lambda detector=None, clip_model=None, **rules: [
        _hub_status(_setting(detector, "GENEVAL_DETECTOR", "facebook/mask2former-swin-small-coco-instance"),
                    "GenEval detector"), *_check_clip(clip_model)],
    "hpsv2": _check_hpsv2,
    "ocr": _check_ocr,
    "http": lambda url=None, timeout_s=60.0, **wire: _check_http(url, timeout_s),
}


def _needs_quoted_target(prompt: str, where: str) -> None:
    try:
        quoted_target(prompt)
    except ValueError:
        raise ValueError(f"{where}: {prompt!r} has no double-quoted text, which the ocr reward reads as the "
                         "target: quote it, or drop the prompt") from None


# What a reward reads of each prompt, checked in every prompt file before anything loads (data.check_prompts):
# name -> fn(prompt, where) raising a ValueError that names the file and line
PROMPT_RULES = {"ocr": _needs_quoted_target}


# The models each reward loads and their parameter counts (from their published configs), for the memory
# planner (memory.py): a model that several rewards share (one CLIP ViT-L/14 for clipscore, aesthetic and
# geneval, through _load_clip) counts once. A reward not listed loads no model on the device.
REWARD_MODELS = {
    "pickscore": {"yuvalkirstain/PickScore_v1 (CLIP ViT-H/14)": 986_000_000},
    "clipscore": {CLIP_L14: 427_600_000},
    "aesthetic": {CLIP_L14: 427_600_000, "LAION aesthetic MLP": 928_000},
    "geneval": {"facebook/mask2former-swin-small-coco-instance": 69_000_000, CLIP_L14: 427_600_000},
    "hpsv2": {"HPSv2.1 (open_clip ViT-H-14)": 986_000_000},
    "imagereward": {"ImageReward-v1.0 (BLIP ViT-L)": 447_000_000},
    "ocr": {"OCR engine (text detector + recogniser)": 25_000_000},
}


def reward_bytes(specs: list[str], dtype: torch.dtype = torch.float32) -> int:
    """Device bytes of the reward models of every spec in `specs` ("name=w,..."), each model once."""
    models = {}
    for spec in specs:
        for name in parse_spec(spec):
            models.update(REWARD_MODELS.get(name, {}))
    return sum(models.values()) * torch.finfo(dtype).bits // 8


def check_spec(spec, build: bool = False, **options) -> list[str]:
    """What every reward of `spec` needs and where it comes from (the scripts' --dry_run): weights cached
    or fetchable, packages installed, servers reachable. Returns one line per need; raises the one-line
    error of the first that cannot be met.

    build=True (the dry run) then builds each reward on the CPU from the files already here, with
    downloads forbidden, so that "built" means the run will build it too: a reward whose files are
    not all here says which is missing (an error when HF_HUB_OFFLINE is set: nothing could fetch it);
    one that fails for any other reason (a package at a version whose API differs) raises that.
    PaddleOCR fetches its own models on first use whatever the setting (it has no switch for it)."""
    lines = []
    for name in parse_spec(spec):
        for line in CHECKS.get(name, lambda **kw: ["nothing to fetch"])(**options.get(name, {})):
            lines.append(f"{name}: {line}")
        if build:
            lines.append(f"{name}: {_build_here(name, options.get(name, {}))}")
    return lines


def _build_here(name: str, options: dict) -> str:
    """Build reward `name` on the CPU with downloads forbidden (check_spec(build=True)); one line."""
    offline = _offline()
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # every loader here asks _offline() / _hub_kwargs() at call time
    try:
        REWARDS[name](torch.device("cpu"), torch.float32, **options)
    except OSError as error:  # a weights file not here: transformers' OSError, our FileNotFoundError
        what = " ".join(str(error).split())
        if offline:
            raise FileNotFoundError(f"{name} reward: a file it needs is not here and HF_HUB_OFFLINE is set: "
                                    f"{what}") from None
        return f"not built: a file is not here yet; the run downloads it on first use ({what})"
    except (ImportError, ValueError):
        raise
    except Exception as error:
        raise ValueError(f"{name} reward cannot be built here: {type(error).__name__}: "
                           f"{' '.join(str(error).split())}") from None
    finally:
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved
    return "built on the CPU from the files here"


class ComposedReward:
    """r = sum_k w_k r_k; info[name] holds r_k, info[f"{name}/{key}"] the k-th reward's own info.

    A prompt whose metadata lists "rewards" (names of components) is scored by those only: mixed
    multi-task prompt sets (the multi-task baselines) route each prompt to its own task's reward."""

    def __init__(self, weights, fns):
        self.weights, self.fns = weights, fns
        self._component_pool = concurrent.futures.ThreadPoolExecutor(len(fns), thread_name_prefix="reward")
        self._submit_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="reward-submit")

    def __call__(self, images, prompts, metadata):
        # Per-sample routing (mixed multi-task prompt sets): a prompt whose metadata lists "rewards" is
        # scored by those components only, r_i = sum_{k in rewards_i} w_k r_k(x_i); other prompts by all.
        # Every component is called, on its (possibly empty) share, so info has the same keys every call.
        unknown = {name for m in metadata for name in m.get("rewards", ())} - set(self.fns)
        if unknown:
            raise ValueError(f"metadata route prompts to rewards {sorted(unknown)} that are not in "
                             f"{sorted(self.fns)}")
        rows = {name: [i for i, m in enumerate(metadata) if name in m.get("rewards", self.fns)]
                for name in self.fns}
        futures = {name: self._component_pool.submit(fn, images[rows[name]], [prompts[i] for i in rows[name]],
                                                     [metadata[i] for i in rows[name]])
                   for name, fn in self.fns.items()}
        total = torch.zeros(len(prompts), dtype=torch.float32)
        info = {}
        for name, future in futures.items():
            scores, extra = future.result()
            idx = torch.tensor(rows[name], dtype=torch.long)
            for key, value in {name: scores, **extra}.items():
                if not (isinstance(value, torch.Tensor) and value.dtype == torch.float32
                        and value.device.type == "cpu" and value.shape == (len(idx),)):
                    raise TypeError(f"reward {name!r} must return float32 CPU tensors of shape "
                                    f"({len(idx)},); "
                                    f"{key!r} is a {type(value).__name__} "
                                    f"{getattr(value, 'dtype', '')} {tuple(getattr(value, 'shape', ()))}")
                # info entries are 0 on the prompts a component does not score
                full = torch.zeros(len(prompts), dtype=torch.float32).index_copy_(0, idx, value)
                info[name if key == name else f"{name}/{key}"] = full
            # r = sum_k w_k r_k
            total.index_add_(0, idx, self.weights[name] * scores)
        return total, info

    def submit(self, images, prompts, metadata):
        """Score in the background -> Future of (scores, info). The images are copied first, so the
        caller may overwrite its buffers with the next rollout at once."""
        return self._submit_pool.submit(self, images.detach().clone(), list(prompts),
                                        [dict(m) for m in metadata])


# -------------------- helpers shared by the rewards -----------------------------------------------


def _uint8_images(images, prompts, metadata):
    """(B, 3, H, W) float in [0, 1] -> (B, H, W, 3) uint8 numpy, as the reference scorers quantise."""
    if not (images.ndim == 4 and images.shape[1] == 3 and images.is_floating_point()):
        raise ValueError(f"images must be a float (B, 3, H, W) tensor in [0, 1], "
                         f"got {images.dtype} {tuple(images.shape)}")
    if not (len(images) == len(prompts) == len(metadata)):
        raise ValueError(f"batch sizes differ: {len(images)} images, {len(prompts)} prompts, "
                         f"{len(metadata)} metadata")
    pixels = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def _pil_images(images, prompts, metadata):
    return [Image.fromarray(array) for array in _uint8_images(images, prompts, metadata)]


def _scores(values):
    return torch.as_tensor(values, dtype=torch.float32).flatten().cpu()


def _jpeg(pil, quality):
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _hub_kwargs():
    return {"local_files_only": True} if _offline() else {}


SETTINGS_ENV = ("AESTHETIC_MLP", "CLIP_MODEL", "GENEVAL_DETECTOR", "HPSV2_CHECKPOINT", "PICKSCORE_MODEL",
                "PICKSCORE_PROCESSOR", "REWARD_SERVER_URL")  # every name _setting reads


def _setting(value, env, default=None):
    return value if value is not None else os.environ.get(env, default)


@functools.lru_cache(maxsize=None)
def _load_clip(path, device, dtype):
    """(CLIPModel, processor) from a hub id or folder; shared by clipscore, aesthetic and geneval."""
    from transformers import AutoProcessor, CLIPModel
    processor = AutoProcessor.from_pretrained(path, **_hub_kwargs())
    model = CLIPModel.from_pretrained(path, dtype=dtype, **_hub_kwargs())
    model = model.to(device).eval().requires_grad_(False)
    return model, processor


@torch.no_grad()
def _clip_text_embeddings(model, processor, texts):
    with _TOKENIZER_LOCK:
        tokens = processor.tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    features = model.get_text_features(input_ids=tokens.input_ids.to(model.device),
                                       attention_mask=tokens.attention_mask.to(model.device)).pooler_output
    return F.normalize(features.float(), dim=-1)  # (N, D)


@torch.no_grad()
def _clip_image_embeddings(model, processor, pil_images):
    pixels = processor.image_processor(images=pil_images, return_tensors="pt").pixel_values
    features = model.get_image_features(pixel_values=pixels.to(model.device, model.dtype)).pooler_output
    return F.normalize(features.float(), dim=-1)  # (N, D)


# -------------------- CLIP-based rewards ----------------------------------------------------------


@register("pickscore")
def _pickscore(device, dtype, model=None, processor=None, divide_by_26=False):
    from transformers import AutoProcessor, CLIPModel
    clip_processor = AutoProcessor.from_pretrained(
        _setting(processor, "PICKSCORE_PROCESSOR", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"), **_hub_kwargs())
    clip = CLIPModel.from_pretrained(_setting(model, "PICKSCORE_MODEL", "yuvalkirstain/PickScore_v1"),
                                     dtype=dtype, **_hub_kwargs()).to(device).eval().requires_grad_(False)

    def pickscore(images, prompts, metadata):
        text = _clip_text_embeddings(clip, clip_processor, prompts)
        image = _clip_image_embeddings(clip, clip_processor, _pil_images(images, prompts, metadata))
        # s = exp(logit_scale) * <t/|t|, v/|v|>   (Flow-GRPO: / 26 to land near [0, 1])
        scores = clip.logit_scale.exp().float() * (text * image).sum(-1)
        return _scores(scores / 26 if divide_by_26 else scores), {}
    return pickscore


@register("clipscore")
def _clipscore(device, dtype, model=None):
    clip, clip_processor = _load_clip(_setting(model, "CLIP_MODEL", CLIP_L14), device, dtype)

    def clipscore(images, prompts, metadata):
        text = _clip_text_embeddings(clip, clip_processor, prompts)
        image = _clip_image_embeddings(clip, clip_processor, _pil_images(images, prompts, metadata))
        # s = cos(t, v)
        return _scores((text * image).sum(-1)), {}
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


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


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
    if _offline():
        raise FileNotFoundError(f"aesthetic reward: the LAION MLP is not in the cache and HF_HUB_OFFLINE is "
                                f"set: download {AESTHETIC_MLP_URL} to {cached}, "
                                "or set AESTHETIC_MLP to its path")
    if not download:
        return cached
    import hashlib
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


@register("aesthetic")
def _aesthetic(device, dtype, clip_model=None, mlp_path=None):
    # the MLP is kept in float32
    mlp = load_aesthetic_mlp(aesthetic_mlp_path(_setting(mlp_path, "AESTHETIC_MLP"))).to(device)
    clip, clip_processor = _load_clip(_setting(clip_model, "CLIP_MODEL", CLIP_L14), device, dtype)

    @torch.no_grad()
    def aesthetic(images, prompts, metadata):
        # s = MLP(v / |v|), v = CLIP-L/14 image embedding
        image = _clip_image_embeddings(clip, clip_processor, _pil_images(images, prompts, metadata))
        return _scores(mlp(image.to(device))), {}
    return aesthetic


# -------------------- OCR -------------------------------------------------------------------------


OCR_ENGINES = ("paddleocr", "easyocr")  # "auto" takes the first installed: PaddleOCR is the paper's (Flow-GRPO's)
OCR_INSTALL = "pip install -r requirements-rewards.txt (PaddleOCR, the paper's engine), or pip install easyocr"


def _ocr_engines(engine: str) -> list[str]:
    """The installed engines that `engine` ("auto" or a name) may use, in OCR_ENGINES' order."""
    return [name for name in OCR_ENGINES if engine in ("auto", name) and _importable(name)]


def _ocr_reader(engine, device):
    """A callable: (H, W, 3) uint8 RGB array -> all recognised text."""
    if engine not in ("auto", *OCR_ENGINES):
        raise ValueError(f"ocr engine must be auto, paddleocr or easyocr: {engine!r}")
    available = _ocr_engines(engine)
    if not available:
        raise ImportError(f"ocr reward (engine={engine!r}) needs an OCR engine: {OCR_INSTALL}, "
                          "or pass reader=callable(image uint8 HxWx3) -> str")
    if available[0] == "easyocr":
        import easyocr
        # with HF_HUB_OFFLINE (and in check_spec's build) its detector and recogniser are not downloaded
        reader = easyocr.Reader(["en"], gpu=device.type == "cuda", verbose=False, download_enabled=not _offline())
        return lambda image: "".join(reader.readtext(image, detail=0))
    from paddleocr import PaddleOCR  # the 2.x API that Flow-GRPO uses
    paddle = PaddleOCR(use_angle_cls=False, lang="en", use_gpu=device.type == "cuda", show_log=False)
    return lambda image: "".join(line[1][0] for line in (paddle.ocr(image, cls=False)[0] or []))


def _importable(module):
    import importlib.util
    return importlib.util.find_spec(module) is not None


@register("ocr")
def _ocr(device, dtype, engine="auto", reader=None):
    read = reader if reader is not None else _ocr_reader(engine, device)

    def ocr(images, prompts, metadata):
        arrays = _uint8_images(images, prompts, metadata)
        return _scores([ocr_score(read(array), quoted_target(prompt))
                        for array, prompt in zip(arrays, prompts)]), {}
    return ocr


# -------------------- GenEval: rules.py's rules on Mask2Former + CLIP colour detections -----

COLOR_TEMPLATES = ["a photo of a {color} {name}", "a photo of a {color}-colored {name}",
                   "a photo of a {color} object"]
_COCO_TO_GENEVAL = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}


def _object_crop(image, box, mask):
    """GenEval's colour input: the object's pixels over a flat #999 background, cropped to its box."""
    if mask is not None:
        background = Image.new("RGB", image.size, "#999")
        image = Image.composite(image, background, Image.fromarray(mask.cpu().numpy().astype(bool)))
    return image.crop(tuple(int(round(float(v))) for v in box))


def _classify_colors(clip, clip_processor, crops, name, classifiers):
    """CLIP zero-shot colour of each crop (GenEval via clip_benchmark); classifiers caches per class."""
    if not crops:
        return []
    if name not in classifiers:
        texts = [template.format(color=color, name=name) for color in COLORS for template in COLOR_TEMPLATES]
        # w_c = normalise(mean_t normalise(text_emb(template_t(c))))   (10, D)
        per_template = _clip_text_embeddings(clip, clip_processor, texts)
        per_template = per_template.view(len(COLORS), len(COLOR_TEMPLATES), -1)
        classifiers[name] = F.normalize(per_template.mean(1), dim=-1)
    image = _clip_image_embeddings(clip, clip_processor, crops)  # (N, D)
    return [COLORS[i] for i in (image @ classifiers[name].T).argmax(-1).tolist()]


def _mask_box(mask):
    """(x1, y1, x2, y2) of a binary (H, W) mask, x2/y2 one past the last pixel (mmdet's mask2bbox)."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return (xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1)


@contextmanager
def _without_scipy_check():
    """Build Mask2Former without scipy: only its training loss's matcher needs it (departure 3)."""
    from transformers.models.mask2former import modeling_mask2former
    if _importable("scipy"):
        yield
        return
    check = modeling_mask2former.requires_backends
    modeling_mask2former.requires_backends = lambda *args, **kwargs: None
    try:
        yield
    finally:
        modeling_mask2former.requires_backends = check


@register("geneval")
def _geneval(device, dtype, detector=None, clip_model=None, threshold=0.3, counting_threshold=0.9,
             max_objects=16, position_margin=0.1):
    from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation
    detector = _setting(detector, "GENEVAL_DETECTOR", "facebook/mask2former-swin-small-coco-instance")
    processor = AutoImageProcessor.from_pretrained(detector, **_hub_kwargs())
    with _without_scipy_check():
        model = Mask2FormerForUniversalSegmentation.from_pretrained(detector, dtype=dtype, **_hub_kwargs())
    model = model.to(device).eval().requires_grad_(False)
    names = {i: _COCO_TO_GENEVAL.get(label, label) for i, label in model.config.id2label.items()}
    clip, clip_processor = _load_clip(_setting(clip_model, "CLIP_MODEL", CLIP_L14), device, dtype)
    classifiers = {}
    rules = dict(threshold=threshold, counting_threshold=counting_threshold, max_objects=max_objects)

    @torch.no_grad()
    def geneval(images, prompts, metadata):
        pils = _pil_images(images, prompts, metadata)
        pixels = processor(images=pils, return_tensors="pt").pixel_values
        outputs = model(pixel_values=pixels.to(device, dtype))
        outputs.class_queries_logits = outputs.class_queries_logits.float()
        outputs.masks_queries_logits = outputs.masks_queries_logits.float()
        results = processor.post_process_instance_segmentation(
            outputs, threshold=min(threshold, counting_threshold),
            target_sizes=[pil.size[::-1] for pil in pils], return_binary_maps=True)
        partial, strict = [], []
        for pil, result, meta in zip(pils, results, metadata):
            # with no segment, "segmentation" is a (H, W) map and zip() stops at the empty segments_info
            detections = [{"class": names[segment["label_id"]], "score": segment["score"],
                           "mask": mask.bool(), "box": _mask_box(mask), "color": None}
                          for segment, mask in zip(result["segments_info"], result["segmentation"])]
            kept = _kept_objects(detections, meta.get("tag"), **rules)
            for clause in meta.get("include", []):
                if "color" in clause:
                    found = kept.get(clause["class"], [])[:clause["count"]]
                    crops = [_object_crop(pil, d["box"], d["mask"]) for d in found]
                    colors = _classify_colors(clip, clip_processor, crops, clause["class"], classifiers)
                    for detection, color in zip(found, colors):
                        detection["color"] = color
            credit, correct = geneval_score(detections, meta, position_margin=position_margin, **rules)
            partial.append(credit)
            strict.append(float(correct))
        return _scores(partial), {"strict": _scores(strict)}
    return geneval


# -------------------- external reward server ------------------------------------------------------


def check_reachable(url: str, timeout_s: float = 5.0) -> None:
    """The reward server's host and port accept a connection (checked when the reward is built, before
    any model loads); else a ValueError in one line."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"http reward: {url!r} is not an http(s) URL, e.g. http://127.0.0.1:18085")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=min(timeout_s, 5.0)).close()
    except OSError as e:
        raise ValueError(f"http reward: the reward server {url} is not reachable ({e.strerror or e}); "
                         "start it, or point url= / REWARD_SERVER_URL at it") from None


@register("http")
def _http(device, dtype, url=None, timeout_s=60.0, retries=3, backoff_s=1.0, wire="pickle", jpeg_quality=95):
    url = _setting(url, "REWARD_SERVER_URL")
    if not url:
        raise ValueError("http reward needs url=... or REWARD_SERVER_URL, e.g. http://127.0.0.1:18085")
    if wire not in ("pickle", "json"):
        raise ValueError(f"http reward: wire must be 'pickle' or 'json', got {wire!r}")
    check_reachable(url, timeout_s)

    def post(body):
        request = urllib.request.Request(url, data=body, method="POST", headers={
            "Content-Type": "application/json" if wire == "json" else "application/octet-stream"})
        for attempt in range(retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=timeout_s) as response:
                    return response.read()
            except urllib.error.HTTPError as error:  # the server answered with an error status
                if error.code < 500 or attempt == retries:
                    raise RuntimeError(f"reward server {url} answered HTTP {error.code}: "
                                       f"{error.read()[:2000].decode(errors='replace')}") from error
            except (urllib.error.URLError, OSError) as error:  # refused, unreachable, timed out
                if attempt == retries:
                    raise RuntimeError(f"reward server {url} unreachable after {retries + 1} attempts "
                                       f"(timeout {timeout_s} s): {error}") from error
            time.sleep(backoff_s * 2 ** attempt)

    def http(images, prompts, metadata):
        jpegs = [_jpeg(pil, jpeg_quality) for pil in _pil_images(images, prompts, metadata)]
        payload = {"images": jpegs, "prompts": list(prompts), "meta_datas": list(metadata),
                   "only_strict": False}
        if wire == "json":
            payload["images"] = [base64.b64encode(jpeg).decode() for jpeg in jpegs]
            answer = json.loads(post(json.dumps(payload).encode()))
        else:
            answer = pickle.loads(post(pickle.dumps(payload)))
        score_key = "scores" if isinstance(answer, dict) and "scores" in answer else "outputs"
        if not isinstance(answer, dict) or len(answer.get(score_key, ())) != len(prompts):
            raise RuntimeError(f"reward server {url} must answer a dict with {len(prompts)} 'scores' or "
                               f"'outputs', got {str(answer)[:500]}")
        info = {key: _scores(value) for key, value in answer.items()
                if key != score_key and isinstance(value, list) and len(value) == len(prompts)
                and all(isinstance(v, numbers.Real) for v in value)}
        return _scores(answer[score_key]), info
    return http


# -------------------- DDPO's JPEG rewards ---------------------------------------------------------


def _jpeg_kilobytes(images, prompts, metadata):
    return _scores([len(_jpeg(pil, quality=95)) / 1000 for pil in _pil_images(images, prompts, metadata)])


@register("jpeg_incompressibility")
def _jpeg_incompressibility(device, dtype):
    return lambda images, prompts, metadata: (_jpeg_kilobytes(images, prompts, metadata), {})


@register("jpeg_compressibility")
def _jpeg_compressibility(device, dtype):
    return lambda images, prompts, metadata: (-_jpeg_kilobytes(images, prompts, metadata), {})


# -------------------- optional packages -----------------------------------------------------------


def hpsv2_checkpoint(checkpoint=None, download: bool = True) -> str:
    """HPSv2.1's weights file: `checkpoint` (or HPSV2_CHECKPOINT), else xswu/HPSv2's
    HPS_v2.1_compressed.pt from the hub cache, downloaded once (the hub checks it); one line saying
    what to download when offline."""
    path = _setting(checkpoint, "HPSV2_CHECKPOINT")
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"hpsv2 reward: checkpoint {path!r} does not exist "
                                    "(checkpoint= or HPSV2_CHECKPOINT)")
        return path
    from huggingface_hub import hf_hub_download
    try:
        return hf_hub_download(HPSV2_REPO, HPSV2_FILE, local_files_only=_offline() or not download)
    except Exception as e:  # not cached offline, unknown, unreachable: the hub's error types vary by version
        if not download and not _offline():
            return ""  # not cached, will be downloaded on first use
        raise FileNotFoundError(f"hpsv2 reward: {HPSV2_FILE} of {HPSV2_REPO} is not in the hub cache and "
                                f"could not be fetched ({type(e).__name__}): "
                                f"huggingface-cli download {HPSV2_REPO} {HPSV2_FILE}, "
                                "or set HPSV2_CHECKPOINT to its path") from None


def hps_pixels(images, prompts, metadata, size: int, mean, std) -> torch.Tensor:
    """HPSv2's evaluation transform (its copy of open_clip, transform.py: ResizeMaxSize, as
    create_model_and_transforms(light_augmentation=True) builds preprocess_val): the uint8 image as
    floats in [0, 1], its longer side resized to `size` on the tensor (bicubic, antialiased: torchvision's
    tensor resize), zero-padded to a centred square, normalised. (B, 3, H, W) -> (B, 3, size, size)."""
    x = torch.from_numpy(_uint8_images(images, prompts, metadata)).permute(0, 3, 1, 2).float() / 255
    height, width = x.shape[-2:]
    scale = size / max(height, width)
    if scale != 1.0:
        new_h, new_w = round(height * scale), round(width * scale)
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        pad_h, pad_w = size - new_h, size - new_w
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@register("hpsv2")
def _hpsv2(device, dtype, checkpoint=None, model_name="ViT-H-14"):
    """HPSv2.1: open_clip's ViT-H-14 with the HPS_v2.1 weights, scored as Flow-GRPO's hpsv2_scorer.py
    (94e23ee): HPSv2's evaluation transform, s = <image_features, text_features>, both unit norm, one
    prompt per image; float32 weights, autocast on CUDA (its precision="amp"). Built from open_clip_torch,
    not the hpsv2 package (departure 9); `model_name` is open_clip's architecture (a tiny one in tests)."""
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
        return _scores((outputs["image_features"].float() * outputs["text_features"].float()).sum(-1)), {}
    return hpsv2


@register("imagereward")
def _imagereward(device, dtype, model="ImageReward-v1.0"):
    try:
        import ImageReward
    except ImportError as error:
        raise ImportError("the imagereward reward needs its package: pip install image-reward") from error
    scorer = ImageReward.load(model, device=str(device)).eval()

    @torch.no_grad()
    def imagereward(images, prompts, metadata):
        pils = _pil_images(images, prompts, metadata)
        return _scores([float(scorer.score(prompt, pil)) for prompt, pil in zip(prompts, pils)]), {}
    return imagereward
