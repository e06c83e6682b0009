r"""The reward registry: every reward of paper section 10 behind one signature (`import rewards`).

    fn(images, prompts, metadata) -> (scores, info)
      images   (B, 3, H, W) float in [0, 1], any device
      prompts  list[str], len B;  metadata  list[dict], len B (may be empty dicts)
      scores   (B,) float32 CPU tensor;  info  dict[str, (B,) float32 CPU tensor] (extra values to log)

`register(name, check=, models=, prompt_rule=)` adds a factory `REWARDS[name](device, dtype, **options)
-> fn` with, beside it, what the reward needs (checked without loading it: the scripts' --dry_run),
the models it loads (the memory planner's bytes) and what it reads of each prompt (checked in every
prompt file before anything loads). Heavy imports and model loads happen inside a factory, never at
import time. `load_reward` caches what a factory returns per (name, device, dtype, options and the
settings read from the environment), so each model loads once per process. `make_reward("a=1,b=0.5")`
returns the weighted sum r = sum_k w_k r_k with the same signature, plus `submit()`, which scores in a
background thread so that scoring overlaps the next rollout.

Rewards (section 10; s = scores), one file per family, each with its options and departures:
  clip.py        pickscore   s = exp(logit_scale) * cos(text, image), PickScore_v1 (CLIP-H) [/26]
                 clipscore   s = cos(text, image), openai/clip-vit-large-patch14
                 aesthetic   s = MLP(image_emb / |image_emb|), LAION improved aesthetic predictor on CLIP-L/14
  ocr.py         ocr         s = 1 - min(d, |y|) / |y|, y = the first "quoted" span, d = 0 if y is in the
                             OCR text, else Levenshtein (PaddleOCR 2.x, the paper's engine)
  geneval.py     geneval     rules.py's GenEval rules on Mask2Former detections + CLIP-L/14 colours;
                             s = Flow-GRPO's partial credit, info["strict"] = GenEval's accuracy (the paper's)
  http.py        http        scores from an external reward server (Flow-GRPO's reward-server wire format)
  preference.py  hpsv2       s = cos(text, image), HPSv2.1 on open_clip's ViT-H-14
                 imagereward ImageReward-v1.0 (pip install image-reward)
  jpeg.py        jpeg_incompressibility / jpeg_compressibility   s = +/- JPEG kB at quality 95 (DDPO)
The OCR engine and open_clip (HPSv2.1): requirements-rewards.txt, pinned to install beside
requirements.txt without moving any of its pins (`make check-extras` asks pip's resolver).
A task's own reward: a module that calls `register` (a dataset's task.json names it as
"reward_module": data.load_task imports it), e.g. the embedded world's.

Options win over their environment variable (`setting`), which wins over the default; model ids may
be local folders. With HF_HUB_OFFLINE set, loads pass local_files_only=True, and weights not in the
cache fail with one line naming what to download and where. `check_spec` says whether every reward of
a spec can be built here and, in the scripts' --dry_run, builds each one on the CPU from the files
already here (downloads forbidden), naming a file that is missing.
(Not a departure: every image reward quantises images to uint8 first, as the reference scorers do.)

Run (CPU; 1 GPU; with N GPUs every rank builds its own rewards on its own device, e.g. f"cuda:{rank}"):
  python -c "import rewards, torch; r = rewards.make_reward('jpeg_incompressibility=1'); \
             print(r(torch.rand(2, 3, 64, 64), ['a cat', 'a dog'], [{}, {}]))"
  python -c "import rewards, torch; r = rewards.make_reward('pickscore=1,clipscore=1', 'cuda', torch.float16); \
             print(r(torch.rand(2, 3, 512, 512, device='cuda'), ['a cat', 'a dog'], [{}, {}]))"
  python -m pytest tests/algorithm/test_rewards.py -q
"""
from __future__ import annotations

import concurrent.futures
import io
import os
import threading

import torch
from PIL import Image

from plumbing.model_files import check_hub_repo, hub_offline

REWARDS = {}        # name -> factory(device, dtype, **options) -> fn(images, prompts, metadata)
CHECKS = {}         # name -> fn(**options) -> lines: what the reward needs, checked without loading it
# The models each reward loads and their parameter counts (from their published configs), for the memory
# planner (plumbing/memory.py): a model that several rewards share (one CLIP ViT-L/14 for clipscore, aesthetic and
# geneval) counts once. A reward not listed loads no model on the device.
REWARD_MODELS = {}  # name -> {model: parameters}
# What a reward reads of each prompt, checked in every prompt file before anything loads (data.check_prompts):
# name -> fn(prompt, where) raising a ValueError that names the file and line
PROMPT_RULES = {}
_LOADED = {}  # (name, device, dtype, options, settings) -> fn
_LOAD_LOCK = threading.Lock()
REGISTER_HOW = ("a task's own reward is registered by the module its task.json names as \"reward_module\", "
                "with rewards.register")
SETTINGS_ENV = ("AESTHETIC_MLP", "CLIP_MODEL", "GENEVAL_DETECTOR", "HPSV2_CHECKPOINT", "PICKSCORE_MODEL",
                "PICKSCORE_PROCESSOR", "REWARD_SERVER_URL")  # every name `setting` reads


def register(name, check=None, models=None, prompt_rule=None):
    """Decorator: REWARDS[name] = factory, with what it needs (check(**options) -> lines), the models it
    loads ({model: parameters}) and what it reads of each prompt (prompt_rule(prompt, where))."""
    def add(factory):
        assert name not in REWARDS, f"reward {name!r} is registered twice"
        REWARDS[name] = factory
        for table, value in ((CHECKS, check), (REWARD_MODELS, models), (PROMPT_RULES, prompt_rule)):
            if value is not None:
                table[name] = value
        return factory
    return add



def load_reward(name, device="cpu", dtype=torch.float32, **options):
    """The reward fn of REWARDS[name], built once per (name, device, dtype, options) and process."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))} ({REGISTER_HOW})")
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
                             f"known rewards: {', '.join(sorted(REWARDS))} ({REGISTER_HOW})")
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
    offline = hub_offline()
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # every loader here asks hub_offline() / hub_kwargs() at call time
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


# -------------------- what the rewards share ------------------------------------------------------


def uint8_images(images, prompts, metadata):
    """(B, 3, H, W) float in [0, 1] -> (B, H, W, 3) uint8 numpy, as the reference scorers quantise."""
    if not (images.ndim == 4 and images.shape[1] == 3 and images.is_floating_point()):
        raise ValueError(f"images must be a float (B, 3, H, W) tensor in [0, 1], "
                         f"got {images.dtype} {tuple(images.shape)}")
    if not (len(images) == len(prompts) == len(metadata)):
        raise ValueError(f"batch sizes differ: {len(images)} images, {len(prompts)} prompts, "
                         f"{len(metadata)} metadata")
    pixels = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def pil_images(images, prompts, metadata):
    return [Image.fromarray(array) for array in uint8_images(images, prompts, metadata)]


def as_scores(values):
    return torch.as_tensor(values, dtype=torch.float32).flatten().cpu()


def jpeg_bytes(pil, quality):
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def hub_kwargs():
    return {"local_files_only": True} if hub_offline() else {}


def setting(value, env, default=None):
    return value if value is not None else os.environ.get(env, default)


def hub_status(ref: str, what: str, filename: str = "config.json") -> str:
    """Where the model `ref` (a folder or a hub id) comes from, checked without loading it."""
    if os.path.isdir(ref):
        return f"{what} {ref}: a local folder"
    check_hub_repo(ref, what, filename)
    return f"{what} {ref}: in the hub cache or fetchable"


def importable(module):
    import importlib.util
    return importlib.util.find_spec(module) is not None
