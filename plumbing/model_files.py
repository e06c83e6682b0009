"""Where a base model comes from and what its files say, read without loading it: paths written for
reuse (relative to the repository), a hub id or a local folder and the checks that it can be used, its
resolution rule and T5 length from its configs, a LoRA folder's files, and the digest of its stored
weights that runs and adapters record of their base (checked before anything loads).

model.py loads what these describe; plumbing/memory.py, the scripts' checks and the run folder read them.

Run: a library.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch

from plumbing.jsonfiles import read_json

REPO = Path(__file__).resolve().parents[1]  # the repository root (this file is in plumbing/)
SD35_MEDIUM = "stabilityai/stable-diffusion-3.5-medium"  # the paper's base model (section 7)
MAX_SEQUENCE_LENGTH = 128                  # T5 tokens per prompt: the release's and Flow-GRPO's (section 7)
PEFT_WEIGHTS, PEFT_CONFIG, DIFFUSERS_WEIGHTS = (
    "adapter_model.safetensors", "adapter_config.json", "pytorch_lora_weights.safetensors")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")  # an SD3 pipeline's three folders
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}      # transformer + text encoders (--dtype)


# ---------------------------------------------------------------------- paths written for reuse
def repo_path(path: str) -> str:
    """Where a path points: as given when it exists (absolute, or relative to the working directory),
    else relative to the repository root (the embedded model, data and teachers, and every path this
    project stored relative to the repository); else as given (a hub id, or a missing path)."""
    if not path or Path(path).exists() or Path(path).is_absolute():
        return path
    return str(REPO / path) if (REPO / path).exists() else path


def portable_path(path: str) -> str:
    """How a path is written into a file meant for reuse (run_config.json, adapter_config.json,
    config.json): a path inside the repository relative to the repository, any other path as given.
    A checkout's absolute path in a shipped file would break every other machine."""
    resolved = Path(repo_path(path))
    if not resolved.exists():
        return path
    try:
        return resolved.resolve().relative_to(REPO).as_posix()
    except ValueError:
        return path


def t5_length(path: str) -> int:
    """T5 tokens per prompt that FlowModel encodes for an SD3 pipeline (folder or hub id), read from its
    tokenizer config without loading it: min(MAX_SEQUENCE_LENGTH, the tokenizer's limit)."""
    config = Path(config_folder(path) or path) / "tokenizer_3" / "tokenizer_config.json"
    limit = read_json(config, "tokenizer config").get("model_max_length", MAX_SEQUENCE_LENGTH) \
        if config.is_file() else MAX_SEQUENCE_LENGTH
    return min(MAX_SEQUENCE_LENGTH, int(limit))


def check_hub_repo(repo: str, what: str, filename: str = "model_index.json") -> None:
    """A hub repo `repo` is usable: `filename` of it is in the local hub cache, or (online) it can be
    fetched. Otherwise a FileNotFoundError in one line that says why (offline, unknown or private, the
    hub unreachable) and what to do; nothing big is downloaded."""
    from huggingface_hub import hf_hub_download
    try:
        hf_hub_download(repo, filename, local_files_only=True)
        return
    except Exception:  # not cached: the cache's own error types vary across hub versions
        pass
    if hub_offline():
        raise FileNotFoundError(f"{what} {repo} is not in the local hub cache and HF_HUB_OFFLINE is set: "
                                f"download it first (huggingface-cli download {repo}) "
                                "or unset HF_HUB_OFFLINE")
    try:
        hf_hub_download(repo, filename)
    except Exception as e:  # RepositoryNotFoundError, GatedRepoError, EntryNotFoundError, connection errors
        kind = type(e).__name__
        why = {"RepositoryNotFoundError": "does not exist on the hub, or is private (huggingface-cli login)",
               "GatedRepoError": "is gated: accept its terms on huggingface.co, then huggingface-cli login",
               "EntryNotFoundError": f"has no {filename}: not a diffusers pipeline repo"}.get(
            kind, f"could not be reached on the hub ({kind}): check the connection, or download it elsewhere "
                  "and pass its folder")
        raise FileNotFoundError(f"{what} {repo} {why}") from None


CONFIG_FILES = ["model_index.json", "*/config.json", "scheduler/scheduler_config.json",
                "tokenizer_3/tokenizer_config.json"]  # what the planner and the checks read of a pipeline


def is_hub_id(path: str) -> bool:
    """`owner/name` that is not a local path (check_model_path's rule)."""
    p = Path(repo_path(path))
    return not (p.is_absolute() or path.startswith(".") or p.exists() or path.count("/") != 1)


def config_folder(path: str) -> str | None:
    """A local folder holding the pipeline's configuration files (model_index.json, each component's
    config.json, the T5 tokenizer's config): `path` itself for a local pipeline folder; for a hub id its
    snapshot in the hub cache, where on a machine with internet only these small files are fetched
    (never weights). None when a hub id's configs are neither cached nor fetchable."""
    if not is_hub_id(path):
        return repo_path(path)
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(path, allow_patterns=CONFIG_FILES, local_files_only=hub_offline())
    except Exception:  # offline and not cached, unknown repo, no connection: the hub's error types vary
        return None


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def check_model_path(path: str) -> None:
    """Fail fast on a model path that is neither a readable SD3 folder nor a usable hub id (before
    loading)."""
    p = Path(repo_path(path))
    if is_hub_id(path):
        check_hub_repo(path, "model")
    else:
        if not p.is_dir():
            raise FileNotFoundError(f"model path {path!r} does not exist (expected a diffusers pipeline "
                                    "folder or a hub id such as stabilityai/stable-diffusion-3.5-medium)")
        index = p / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(f"{path!r} has no model_index.json: not a diffusers pipeline folder")
        cls = read_json(index, "pipeline index").get("_class_name", "")
        if not cls.startswith("StableDiffusion3"):
            raise ValueError(f"{path!r} holds a {cls or 'unknown'} pipeline; only SD3-family pipelines "
                             "(StableDiffusion3Pipeline) are supported")


def resolution_rule(path: str) -> tuple[int, int, int] | None:
    """(divisor, default size, largest size) in px of an SD3 pipeline (folder or hub id), read from its
    configs without loading it: height and width must be multiples of VAE factor x patch size, and at most
    pos_embed_max_size patches. None when its configs cannot be read here (a hub id neither cached nor
    fetchable)."""
    p = Path(config_folder(path) or path)
    if not (p / "transformer" / "config.json").is_file() or not (p / "vae" / "config.json").is_file():
        return None
    tr = read_json(p / "transformer" / "config.json", "transformer config")
    vae_scale = 2 ** (len(read_json(p / "vae" / "config.json", "VAE config")["block_out_channels"]) - 1)
    divisor = vae_scale * tr["patch_size"]
    return divisor, tr["sample_size"] * vae_scale, (tr.get("pos_embed_max_size") or 10**6) * divisor


def check_resolution(height: int, width: int, divisor: int, largest: int | None = None) -> None:
    if height % divisor or width % divisor:
        raise ValueError(f"resolution {height}x{width} is not divisible by VAE factor x patch size = "
                         f"{divisor}: pass --height/--width as multiples of {divisor}")
    if largest and max(height, width) > largest:
        raise ValueError(f"resolution {height}x{width} is larger than this model's largest, {largest} px "
                         f"(its pos_embed_max_size patches): pass --height/--width <= {largest} (0: its own "
                         "resolution)")


def check_model_resolution(path: str, height: int, width: int) -> None:
    """A run's --height/--width (0: the model's own) are ones the model at `path` can sample, read from its
    configs before anything loads; nothing is checked when its configs cannot be read here."""
    rule = resolution_rule(path)
    if rule and (height or width):
        check_resolution(height or rule[1], width or rule[1], rule[0], rule[2])



def check_lora_folder(folder: str) -> None:
    """Fail fast on a LoRA folder that would fail to load: missing files, unreadable config, damaged
    (e.g. truncated) safetensors. Reads headers only."""
    from safetensors import safe_open
    p = Path(folder)
    for f in (PEFT_CONFIG, PEFT_WEIGHTS):
        if not (p / f).is_file():
            raise FileNotFoundError(f"LoRA folder {folder} has no {f} (expected a PEFT adapter folder)")
    read_json(p / PEFT_CONFIG, "LoRA config", "re-save or re-download the adapter")
    try:
        with safe_open(str(p / PEFT_WEIGHTS), "pt") as f:
            f.keys()
    except Exception as e:  # safetensors raises its own error type for damaged files
        raise ValueError(f"LoRA folder {folder}: {PEFT_WEIGHTS} is damaged ({e}); "
                         "re-save or re-download it") from None


def check_lora_fits(folder: str, state: dict, modules: dict, base: str) -> None:
    """A LoRA's weights (`state`: module key -> tensor, PEFT prefix removed) against the transformer it is
    loaded into (`modules`: its named modules): every value finite, every target module present, every
    LoRA shape the module's. One line naming the problem otherwise."""
    bad = {k: int((~torch.isfinite(v)).sum()) for k, v in state.items() if not torch.isfinite(v).all()}
    if bad:
        key = next(iter(bad))
        raise ValueError(f"LoRA {folder!r} holds non-finite weights ({sum(bad.values())} values in {len(bad)} "
                         f"tensors, e.g. {key}): the adapter is damaged; re-save or re-download it")
    for key, tensor in state.items():
        module_name = key.split(".lora_")[0]
        if module_name not in modules or not hasattr(modules[module_name], "in_features"):
            raise ValueError(f"LoRA {folder!r} targets module {module_name!r}, which this base model "
                             f"({base}) does not have: the adapter was trained on another architecture")
        m = modules[module_name]
        want = m.in_features if ".lora_A." in key else m.out_features
        got = tensor.shape[1] if ".lora_A." in key else tensor.shape[0]
        if want != got:
            raise ValueError(f"LoRA {folder!r}: {key} has size {got} where this base model has {want}: "
                             "the adapter was trained on another base model")


def sort_safetensors_metadata(path: Path) -> None:
    """Rewrite a safetensors file's header with its metadata keys sorted, in place. safetensors writes its
    metadata map in hash order, which changes from process to process, so two saves of equal tensors and
    equal metadata (diffusers' LoRA file: "format" and "lora_adapter_metadata") could differ in bytes. The
    header keeps its length (padded with spaces, as safetensors pads it); the tensors are not touched."""
    data = Path(path).read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    if "__metadata__" not in header:
        return
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    assert len(text) <= n, f"{path}: the re-serialised header is longer than the original"
    Path(path).write_bytes(data[:8] + text.ljust(n) + data[8 + n:])


# ---------------------------------------------------------------------- precision
def resolve_dtype(name: str, device: torch.device, full_finetune: bool = False) -> str:
    """--dtype as the name of what runs: "auto" is bfloat16 on CUDA (the references' mixed precision
    runs the transformer and text encoders in half precision), float32 on CPU and for full fine-tuning
    (its trained weights are the transformer's own)."""
    if name != "auto":
        return name
    return "bfloat16" if device.type == "cuda" and not full_finetune else "float32"


def weights_dtype(name: str, dist) -> torch.dtype:
    """--dtype as a torch dtype (resolve_dtype on the run's device)."""
    return DTYPES[resolve_dtype(name, dist.device)]


# ---------------------------------------------------------------------- the base's stored weights
WEIGHT_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
_DIGESTS: dict = {}  # (file, size, mtime) -> digest: each weights file is read once per process


def weights_folder(path: str) -> str | None:
    """The local folder holding the weights of a pipeline (a folder, or a hub id's snapshot in the hub cache
    when its weights are downloaded); None when they are not here yet."""
    if not is_hub_id(path):
        return repo_path(path)
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(path, local_files_only=True)
    except Exception:  # not in the cache: the hub's error types vary
        return None


def _file_digest(path: Path, samples: int = 16, window: int = 64) -> str:
    """sha256 of a safetensors file's size, header (every tensor's name, dtype, shape and place) and, of
    every tensor, `samples` windows of `window` bytes spread over its data (all of it when small): a change
    of any tensor's values beyond a few isolated elements changes it, at a few KB read per tensor."""
    import struct
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256(str(stat.st_size).encode())
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = f.read(n)
            h.update(header)
            for name, info in sorted(json.loads(header).items()):
                if name == "__metadata__":
                    continue
                begin, end = (8 + n + o for o in info["data_offsets"])
                starts = [begin] if end - begin <= samples * window else \
                    [begin + (end - begin - window) * i // (samples - 1) for i in range(samples)]
                for start in starts:
                    f.seek(start)
                    h.update(f.read(min(window if len(starts) > 1 else end - begin, end - start)))
        _DIGESTS[key] = h.hexdigest()[:16]
    return _DIGESTS[key]


def weights_digest(path: str) -> dict[str, str] | None:
    """{component: digest of its safetensors files} of a pipeline's stored weights (transformer, VAE, text
    encoders), read without loading them (a few KB per tensor; cached per file): the record a run and its
    adapters keep of their base. None when the weight files are not here (a hub model not yet downloaded)."""
    folder = weights_folder(path)
    if folder is None:
        return None
    out = {}
    for name in WEIGHT_COMPONENTS:
        files = sorted((Path(folder) / name).glob("*.safetensors"))
        if (Path(folder) / name / "config.json").is_file():
            if not files:
                return None
            h = hashlib.sha256()
            for f in files:
                h.update(f"{f.name}:{_file_digest(f)}".encode())
            out[name] = h.hexdigest()[:16]
    return out


def base_weights_differ(recorded: dict, current: dict) -> list[str]:
    """The components whose recorded and current weights digests differ (weights_digest)."""
    return sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))


def weights_fingerprint(config, tensor, names: list[str]) -> str:
    """sha256 of the config and of the first 4,096 bytes of the first and last weight by name, in float32."""
    h = hashlib.sha256(json.dumps({k: v for k, v in config.items() if not k.startswith("_")},
                                  sort_keys=True, default=str).encode())
    for n in (sorted(names)[0], sorted(names)[-1]):
        h.update(tensor(n).detach().float().cpu().numpy().tobytes()[:4096])
    return h.hexdigest()[:16]


def stored_fingerprint(transformer) -> str | None:
    """FlowModel.fingerprint of a transformer loaded from a folder, read from its safetensors files (one
    file or an index of shards): the stored values, whatever dtype they were loaded in. None when the
    files are not found (fingerprint() then hashes the loaded weights)."""
    from safetensors import safe_open
    folder = Path(transformer.config.get("_name_or_path", ""))
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        files = {name: folder / f for name, f in read_json(index, "weights index")["weight_map"].items()}
    elif (folder / "diffusion_pytorch_model.safetensors").is_file():
        files = {}
    else:
        return None
    names = [n for n, _ in transformer.named_parameters() if "lora_" not in n]

    def tensor(name):
        with safe_open(str(files.get(name, folder / "diffusion_pytorch_model.safetensors")), "pt") as f:
            return f.get_tensor(name)
    return weights_fingerprint(transformer.config, tensor, names)
