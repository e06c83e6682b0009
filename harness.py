"""The training-run harness shared by teacher_rl.py, nft.py, opd.py and toy/pretrain.py.

One place for what every training script needs and none of them is about: a commented config
dataclass read from the command line, the recipe in force (the paper's defaults, or the values a base
model folder carries in its recipe.json for its own scale), the
distributed helper (plain `python` or `torchrun`, gloo on CPU, NCCL on CUDA), the run directory
(resolved config, one JSONL metrics line per step, checkpoints that survive a kill at any instant,
exact resume), the EMA of the trainable weights (paper section 7) and the update that never lets a
non-finite loss or gradient reach the weights.

Departures from the reference code
1. Gradients of the trainable weights are averaged across ranks with one all-reduce after the
   backward passes of a step (what DDP does), instead of wrapping the backbone in DDP: the
   student, teachers and base share one backbone and are called several times per step.
2. All randomness of a step derives from (seed, step, global sample index), so resuming needs no
   RNG state and any rollout can be regenerated; the run is identical on 1 or N ranks.
3. A step whose loss or gradient norm is not finite is skipped (no optimizer, EMA or checkpoint
   change) and logged as `skipped_nonfinite`; `max_skipped_steps` in a row stop the run. The
   reference code steps the optimizer whatever the gradient is.
4. Checkpoints carry a manifest (checkpoint.json: step, size and SHA-256 of every file) written
   last; --resume uses the newest checkpoint whose files match it and never deletes that one.
5. SIGTERM (a scheduler's preemption notice) ends the run at the end of the step it arrives in, with
   that step saved (every rank agrees on the step: one all-reduce of a flag per step), one line and
   exit 143; under torchrun its workers have the 30 s the launcher gives them after the signal.
   A collective that waits longer than --collective_timeout_s for a rank ends the run with one line
   naming the rank that stopped answering (gloo's monitored barrier on a side group).
6. A resume keeps the run's value of every key the command line does not set (a recipe or a default
   that changed since) and accepts new values of what does not change the training (RESUMABLE) and
   of the remedies (lr, grad_clip); each is printed. An adapter or a run records its base's stored
   weights (model.weights_digest: every component), checked before any model loads.

Run: a library. `python teacher_rl.py --help` lists a script's config.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import errno
import fcntl
import functools
import hashlib
import inspect
import json
import os
import re
import shutil
import sys
import time
import types
import typing
from pathlib import Path

import torch
import torch.distributed as tdist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from evaluate import EVAL_STEPS
from jsonfiles import read_json, read_jsonl
from model import DTYPES, portable_path, repo_path
from reporting import Trackers, command_line, model_card, parse_report_to, push_to_hub


# ---------------------------------------------------------------------- config from the CLI
def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def field_comments(cls) -> dict[str, str]:
    """{field: the comment beside it in the dataclass source (and its comment-only continuation lines)},
    over cls and its bases, so that --help says what the config at the top of a script says."""
    names, comments = {f.name for f in dataclasses.fields(cls)}, {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        name = None
        for line in inspect.getsource(klass).splitlines():
            field_line = re.match(r"\s+(\w+)\s*:[^#]*(?:#\s*(.*))?$", line)
            if field_line and field_line.group(1) in names:
                name = field_line.group(1)
                comments[name] = field_line.group(2) or ""
            elif name and line.strip().startswith("#"):
                comments[name] += " " + line.strip().lstrip("#").strip()
            else:
                name = None
    return {k: v.strip() for k, v in comments.items() if v.strip()}


def _parser(cls, suppress: bool) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=(cls.__doc__ or "").strip().splitlines()[0],
                                 argument_default=argparse.SUPPRESS if suppress else None)
    hints, comments = typing.get_type_hints(cls), ({} if suppress else field_comments(cls))
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):  # X | None
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        names = sorted({f"--{f.name}", f"--{f.name.replace('_', '-')}"})
        kw = {} if suppress else {"default": default}
        shown = default if tp is bool or typing.get_origin(tp) in (list, tuple) else repr(default)
        # argparse formats help with %: a literal % in a comment is doubled
        help_text = f"{comments[f.name]} (default {shown})" if f.name in comments else f"default {shown}"
        help_text = help_text.replace("%", "%%")
        if tp is bool:
            ap.add_argument(*names, dest=f.name, type=_parse_bool, nargs="?", const=True,
                            help=help_text, **kw)
        elif typing.get_origin(tp) in (list, tuple):
            ap.add_argument(*names, dest=f.name, type=typing.get_args(tp)[0], nargs="+",
                            help=help_text, **kw)
        else:
            ap.add_argument(*names, dest=f.name, type=tp, help=help_text, **kw)
    return ap


def parse_config(cls, argv=None):
    """Build dataclass `cls` from `--key value` / `--key=value` (hyphens or underscores).

    Types are checked by argparse from the annotations; an unknown key is an error; bool fields
    accept a bare `--flag`; list fields take several values (`--teachers a b c`).
    """
    return cls(**vars(_parser(cls, suppress=False).parse_args(argv)))


def given_keys(cls, argv=None) -> set[str]:
    """The config keys set on the command line (a recipe never overrides those)."""
    return set(vars(_parser(cls, suppress=True).parse_args(argv)))


def config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _with_flags(command: str, **values) -> str:
    """`command` with each --key set to its value (replacing any --key of it) and without --resume."""
    import shlex
    words, out = shlex.split(command), []
    skip = False
    for w in words:
        name = w.removeprefix("--").split("=")[0].replace("-", "_") if w.startswith("--") else None
        if skip and not w.startswith("--"):
            continue
        skip = name in values or name == "resume"
        if not skip:
            out.append(w)
    return " ".join([shlex.join(out), *(_flag(k, v) for k, v in values.items())])


def _flag(key: str, value) -> str:
    """`--key value` as a command line takes it (lists as several values, quoted for a shell)."""
    import shlex
    values = value if isinstance(value, list) else [value]
    text = " ".join(shlex.quote(str(v).lower() if isinstance(v, bool) else str(v)) for v in values)
    return f"--{key} {text}".rstrip()


def require(ok: bool, message: str) -> None:
    """A user-input check: ValueError(message) unless ok (scripts turn it into a one-line error)."""
    if not ok:
        raise ValueError(message)


def require_positive(cfg, *names: str) -> None:
    for name in names:
        require(getattr(cfg, name) > 0, f"--{name} must be > 0, got {getattr(cfg, name)}")


# ---------------------------------------------------------------------- the recipe in force
def apply_values(cfg, given: set[str], values: dict[str, tuple]) -> dict[str, tuple]:
    """Set each `values[key] = (value, reason)` on cfg where the key is still at its dataclass default
    and the command line did not set it (so applying twice changes nothing, and a flag always wins).
    Returns {key: (default, value, reason)} of what was changed."""
    defaults = type(cfg)()
    kept = set(given) | {f.name for f in dataclasses.fields(cfg)
                         if getattr(cfg, f.name) != getattr(defaults, f.name)}
    changed = {}
    for key, (value, reason) in values.items():
        if key not in kept and getattr(cfg, key) != value:
            changed[key] = (getattr(cfg, key), value, reason)
            setattr(cfg, key, value)
    return changed


RECIPE_FILE = "recipe.json"  # a base model folder's own recipe (values for its scale, with reasons)


def recipe_of(cfg, model: str) -> tuple[str, dict]:
    """The recipe cfg.recipe names: "auto" is the model folder's recipe.json if it has one, else the
    paper's; "paper" is none; a path is that recipe file. Returns (its name as saved, its contents)."""
    if cfg.recipe == "paper":
        return "paper", {}
    path = Path(repo_path(model)) / RECIPE_FILE if cfg.recipe == "auto" else Path(repo_path(cfg.recipe))
    if cfg.recipe == "auto" and not path.is_file():
        return "paper", {}
    if not path.is_file():
        raise ValueError(f"--recipe must be auto, paper or the path of a recipe.json, got {cfg.recipe!r} "
                         "(no such file)")
    return portable_path(str(path)), read_json(path, "recipe file")


def apply_recipe(cfg, given: set[str], model: str, script: str) -> dict[str, tuple]:
    """Set the values of the recipe in force (recipe_of) for `script` to the keys still at their default
    that the command line did not set (apply_values); its "datasets" give a Stage-1 task its prompt
    folder when --dataset is not given. Returns {key: (default, value, reason)} of what was changed;
    cfg.recipe holds the resolved name (saved in config.json)."""
    cfg.recipe, recipe = recipe_of(cfg, model)
    values = {key: (v["value"], v["reason"]) for key, v in recipe.get(script, {}).items()}
    datasets = recipe.get("datasets", {})
    if hasattr(cfg, "dataset") and cfg.task in datasets.get("value", {}):
        values["dataset"] = (datasets["value"][cfg.task], datasets["reason"])
    return apply_values(cfg, given, values)


def describe_recipe(cfg, changed: dict[str, tuple]) -> str:
    """The lines printed at start: which recipe is in force and every value it changed, with why."""
    if cfg.recipe == "paper":
        return "recipe: the paper's (every default as in paper sections 7-8)"
    lines = [f"recipe: {cfg.recipe} (--recipe paper for the paper's values), {len(changed)} values differ:"]
    lines += [f"  {key} = {value!r} (paper {default!r}): {reason}"
              for key, (default, value, reason) in changed.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------- distributed
FIRST_USE_WAIT_S = 6 * 3600  # how long the other ranks of a node wait for local rank 0's first-use downloads


class Dist:
    """Rank/world/device from torchrun's environment; a no-op world of 1 under plain python.

    plan_only (a --dry_run): `--device cuda` on a machine without a GPU names the device the run will
    have, so that the plan is made for it; nothing runs there."""

    def __init__(self, device: str = "auto", plan_only: bool = False, timeout_s: float = 1800.0):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        indexed = device.startswith("cuda:") and device[5:].isdigit()
        if device not in ("auto", "cpu", "cuda") and not indexed:
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
        use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
        if use_cuda and not torch.cuda.is_available() and not plan_only:
            raise ValueError(f"--device {device}: no CUDA device is available here; "
                             "use --device cpu (or auto)")
        index = int(device[5:]) if indexed else self.local_rank
        if use_cuda and torch.cuda.is_available():
            if index >= torch.cuda.device_count():
                raise ValueError(f"--device {device}: this machine has "
                                 f"{torch.cuda.device_count()} CUDA devices")
            torch.cuda.set_device(index)
        self.device = torch.device("cuda", index) if use_cuda else torch.device("cpu")
        if self.world > 1 and not tdist.is_initialized():
            # a collective that waits longer than timeout_s raises (NCCL: in the main thread, blocking wait)
            os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
            nccl = use_cuda and torch.cuda.is_available()
            tdist.init_process_group("nccl" if nccl else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
        if self.world > 1 and tdist.is_initialized() and "group" not in _DIAGNOSIS:
            # side groups of gloo: one on which a timed-out rank asks which ranks stopped answering, one on
            # which a node's ranks wait for its first-use downloads (longer than a collective may take)
            _DIAGNOSIS.update(group=tdist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s)),
                              wait_group=tdist.new_group(backend="gloo",
                                                         timeout=datetime.timedelta(seconds=FIRST_USE_WAIT_S)),
                              timeout_s=min(30.0, timeout_s))
        self.is_main = self.rank == 0

    def split(self, n_global: int, what: str, flag: str = "") -> slice:
        """This rank's contiguous share of `n_global` items; a one-line error naming the values that divide
        (and what each gives per GPU) if they do not."""
        if n_global % self.world:
            lo, hi = n_global // self.world * self.world, (n_global // self.world + 1) * self.world
            use = " or ".join(f"{flag} {n} ({n // self.world} per GPU)" for n in (lo, hi) if n)
            raise ValueError(f"{what} = {n_global} does not divide over {self.world} ranks: use {use}")
        per = n_global // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    @contextlib.contextmanager
    def local_first(self):
        """Run the block on each node's local rank 0 first, then on the node's other ranks: a first-use
        download (a hub model, a reward's weights) happens once per node, and the others read the cache.
        Every rank passes one barrier, also when the block fails on local rank 0."""
        ranks = self.world > 1 and tdist.is_initialized() and "wait_group" in _DIAGNOSIS
        # a download may take longer than --collective_timeout_s: this barrier (on a side group of gloo) waits
        # up to FIRST_USE_WAIT_S
        if ranks and self.local_rank != 0:
            tdist.barrier(_DIAGNOSIS["wait_group"])
        try:
            yield
        finally:
            if ranks and self.local_rank == 0:
                tdist.barrier(_DIAGNOSIS["wait_group"])

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped per-rank tensors along dim 0, in rank order."""
        if self.world == 1:
            return x
        out = [torch.empty_like(x) for _ in range(self.world)]
        tdist.all_gather(out, x.contiguous())
        return torch.cat(out)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            x = x.clone()
            tdist.all_reduce(x)
        return x

    def average_gradients(self, params) -> None:
        """grad <- mean over ranks, for every trainable parameter, in one flat all-reduce."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.flatten() for g in grads])
        tdist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    def barrier(self):
        if self.world > 1:
            tdist.barrier()

    def close(self):
        if self.world > 1 and tdist.is_initialized():
            tdist.destroy_process_group()


def trained_steps(cfg) -> list[int]:
    """The sampling steps j whose transitions are trained, one meaning for every script: cfg.train_steps
    when the script has that field and it is set, else Flow-GRPO's and the release's first
    K = int(N x timestep_fraction) steps 0 .. K-1 (paper: 0..8 of 10; the last step is never trained)."""
    if getattr(cfg, "train_steps", None):
        return list(cfg.train_steps)
    return list(range(max(1, int(cfg.timestep_fraction * cfg.num_steps))))


class Phases:
    """Seconds spent in each named phase of a step: `with phases("rollout"): ...`; phases.sec holds
    them (exact on CUDA: synchronised). A benchmark may pass its own hook with the same call."""

    def __init__(self, device: torch.device):
        self.device, self.sec = device, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = self._clock()
        try:
            yield
        finally:
            self.sec[name] = self.sec.get(name, 0.0) + self._clock() - t0

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def peak_memory(device: torch.device) -> dict[str, float]:
    """On CUDA, the step's peak device memory in GiB (what tensors held, and what the caching allocator
    reserved; the CUDA context comes on top), read and reset once per step; {} elsewhere. The memory
    plan's prediction is printed at start (memory.py)."""
    if device.type != "cuda":
        return {}
    out = {"mem/peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
           "mem/peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    torch.cuda.reset_peak_memory_stats(device)
    return out


def no_phase(name: str):
    """The phase hook that times nothing."""
    return contextlib.nullcontext()


def step_seed(seed: int, step: int, index: int = 0) -> int:
    """A distinct 31-bit seed for (run seed, step, global sample index): rollouts are regenerable."""
    return (seed * 1_000_003 + step * 10_007 + index) % (2**31 - 1)


# ---------------------------------------------------------------------- EMA
class EMA:
    """The references' EMA of the trainable weights (paper section 7): Flow-GRPO's EMAModuleWrapper
    (flow_grpo/ema.py at ac4c86e), which Flow-GRPO, NVlabs' DiffusionNFT and the DiffusionOPD release all
    use. A call at optimizer-step count s (the steps taken so far) updates the shadow when
    (s + 1) % every == 0, with a warm-up decay:
        d(s) = min((1 + s) / (10 + s), decay),        ema <- d ema + (1 - d) w
    (0.47 at s = 7, 0.64 at s = 15, `decay` from s = 80 for 0.9). Each reference calls it `calls` times per
    optimizer step: calls - 1 times before the step (during its gradient accumulation, with the count and
    weights before it) and once after it (with the new count and weights): the release once per task
    batch of a round (calls = M tasks), Flow-GRPO once per training micro-batch, NVlabs once per step
    (calls = 1). `before_step` and `after_step` are those calls."""

    def __init__(self, params, decay: float, every: int, calls: int = 1):
        self.params, self.decay, self.every, self.calls = list(params), decay, every, calls
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def call(self, s: int) -> None:
        """One call of the reference's ema.step(params, s)."""
        if (s + 1) % self.every == 0:
            d = min((1 + s) / (10 + s), self.decay)
            for e, p in zip(self.shadow, self.params):
                e.mul_(d).add_(p.detach(), alpha=1 - d)

    def before_step(self, s: int) -> None:
        for _ in range(self.calls - 1):
            self.call(s)

    def after_step(self, s: int) -> None:
        self.call(s)

    @torch.no_grad()
    def swap(self):
        """Exchange live and EMA weights (call twice to undo): evaluate and save the EMA copy."""
        for s, p in zip(self.shadow, self.params):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)


# ---------------------------------------------------------------------- checkpoints on disk
MANIFEST = "checkpoint.json"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path, step: int) -> None:
    """Seal a fully written checkpoint folder: every file fsynced, then checkpoint.json (step, size and
    SHA-256 of each file) written to a temporary name and renamed into place, last."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for p in files:
        _fsync(p)
    manifest = {"step": step, "files": {p.relative_to(folder).as_posix():
                                        {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    _fsync(tmp)
    os.replace(tmp, folder / MANIFEST)
    _fsync(folder)


def read_manifest(folder: Path) -> tuple[int | None, str]:
    """(step, "") for a complete checkpoint whose files all match its manifest; (None, why) if not."""
    if not (folder / MANIFEST).is_file():
        return None, f"{folder.name}/ has no {MANIFEST} (its writing was interrupted)"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, f"{folder.name}/{MANIFEST} is not valid JSON"
    if not (isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) and "step" in manifest):
        return None, f"{folder.name}/{MANIFEST} lacks its 'files' or 'step' entry"
    for name, want in manifest["files"].items():
        p = folder / name
        if not p.is_file():
            return None, f"{folder.name}/{name} is missing"
        if p.stat().st_size != want["bytes"]:
            return None, (f"{folder.name}/{name} has {p.stat().st_size} bytes where its manifest says "
                          f"{want['bytes']}")
        if _sha256(p) != want["sha256"]:
            return None, f"{folder.name}/{name} does not match its SHA-256 in {MANIFEST}"
    return manifest["step"], ""


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` such that a kill at any instant leaves the old file or the new one:
    written to path.tmp, fsynced, renamed over path."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def publish_dir(tmp: Path, final: Path) -> None:
    """Move a fully written folder `tmp` to `final`: final -> final.old, tmp -> final, remove old.
    A kill between the two renames leaves tmp and old complete; RunDir.create recovers from that."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync(final.parent)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------- run directory
LOCK = ".lock"                  # out/.lock: held (flock) by the process that runs in out/
_CLAIMED: list["RunDir"] = []   # the run folders this process claimed (fail() removes unused ones)


class RunDir:
    """out/config.json, out/metrics.jsonl, out/checkpoint/ (sealed by a manifest), out/samples/*.png.

    A run directory belongs to one config: reusing it for a different one is an error, reusing it
    without --resume is an error, and --resume continues from the newest complete checkpoint exactly.
    The constructor only checks (before any model loads, writing nothing); `create` writes.
    """

    # keys that may differ between a run and its resumption: what is run, saved, logged and evaluated around
    # the training, and how memory is used (the memory plan may choose anew), not what is trained
    RESUMABLE = ("resume", "steps", "out", "device", "report_to", "wandb_project", "push_to_hub", "dry_run",
                 "collective_timeout_s",
                 "save_every", "eval_every", "eval_prompts", "eval_steps", "max_skipped_steps",
                 "max_memory_gb", "train_chunk", "teacher_chunk", "train_batch", "rollout_batch", "eval_batch",
                 "grad_checkpointing", "offload_text_encoders", "offload_rewards", "compile")
    REMEDIES = ("lr", "grad_clip")  # may change on resume, for the steps after it (a non-finite run's remedy)
    INPUTS = ("model", "teachers", "teacher_task", "teacher_dataset", "teacher_cfg", "teacher_reward", "task",
              "dataset", "reward", "init_lora", "height", "width", "dtype")  # read before the run folder
    SLOTS = ("checkpoint", "checkpoint.tmp", "checkpoint.old")  # where save() leaves complete checkpoints

    def __init__(self, out: str, cfg, dist: Dist, script: str = "", argv: list[str] | None = None):
        self.path, self.dist = Path(out), dist
        self.cfg = config_dict(cfg)
        self.given = given_keys(type(cfg), argv) if script else set()  # the keys the command line set
        self.script, self.command = script, command_line(script, argv) if script else ""
        self.trackers = Trackers([], self.path, {}, 0, False)  # real ones from create()
        self.last_eval: dict = {}
        self.resume_from: Path | None = None
        self.start = 0
        self.saved_step = 0  # the step of the newest complete checkpoint (0: none yet)
        self._created, self._fresh, self._lock_fd = [], False, None  # folders claim() made; a run it starts
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"--out {out} is a file, not a directory")
        if not self.cfg.get("dry_run"):
            self.claim()
        try:
            error = None
            try:
                self._check(out, cfg)
            except ValueError as e:
                error = e
            if self.dist.world > 1 and not self.cfg.get("dry_run"):
                self._same_on_every_rank(error is not None)
            if error is not None:
                raise error
        except BaseException:
            self.release(remove_if_unused=True)
            raise
        self.saved_step = self.start

    def _same_on_every_rank(self, failed: bool) -> None:
        """Every rank sees the run folder alike: the same checkpoint step and manifest, or the same
        failure. Ranks on machines without a shared filesystem see different folders and would disagree on
        the step to resume from (and hang); they stop here with one line instead."""
        manifest = self.resume_from / MANIFEST if self.resume_from is not None else None
        digest = int(_sha256(manifest)[:12], 16) if manifest and manifest.is_file() else 0
        views = self.dist.all_gather(torch.tensor([[float(failed), self.start, digest]], dtype=torch.float64,
                                                  device=self.dist.device)).cpu()
        if (views != views[0]).any():
            seen = "; ".join(f"rank {r}: step {int(v[1])}" + (" (an error)" if v[0] else "")
                             for r, v in enumerate(views.tolist()))
            raise ValueError(f"the ranks see different run folders at --out {self.path} ({seen}): --resume needs "
                             "--out on a filesystem that every node shares")
        if views[:, 0].any() and not failed:
            raise ValueError("another rank stopped on its input checks (rank 0 names the problem)")

    def _check(self, out: str, cfg) -> None:
        cfg_file = self.path / "config.json"
        if cfg_file.exists():
            old = read_json(cfg_file, "the run's config",
                            "restore it from a copy, or start over with another --out")
            # a field added to the script after the run started counts as its default
            defaults = json.loads(json.dumps(config_dict(type(cfg)())))
            changed = sorted(k for k in set(old) | set(self.cfg) if old.get(k, defaults.get(k)) != self.cfg.get(k)
                             and not (k == "dtype" and old.get(k, "auto") == "auto"))  # saved before resolved
            trained = [k for k in changed if k not in self.RESUMABLE]
            if not self.cfg.get("resume"):
                if trained:
                    raise ValueError(f"output directory {out} holds a different run (config differs in {trained}); "
                                     "choose another --out")
                raise ValueError(f"output directory {out} already holds this run; pass --resume to continue it")
            self._resume_config(out, cfg, {k: old.get(k, defaults.get(k)) for k in changed})
            self._find_checkpoint()
        elif self.path.exists() and any(p.name != LOCK for p in self.path.iterdir()):
            raise ValueError(f"output directory {out} is not empty and holds no run; choose another --out")

    def _resume_config(self, out: str, cfg, saved: dict) -> None:
        """--resume with a config that differs from the run's in `saved` ({key: the run's value}): what does
        not change the training (RESUMABLE) and the remedies (REMEDIES) take the new value; a value the
        command line did not give (a recipe's or a default that changed since) takes the run's value back;
        a value given on the command line that would train another run is refused, naming the flags that
        resume it. Every change is printed."""
        notes, refused = [], []
        for key, value in saved.items():
            new = self.cfg.get(key)
            if key in self.RESUMABLE or key in self.REMEDIES:
                if key not in ("resume", "dry_run", "out"):
                    notes.append(f"  {key}: {value!r} -> {new!r}" + (" (the steps after the checkpoint train with it)"
                                                                     if key in self.REMEDIES else ""))
            elif key not in self.given and key not in self.INPUTS:
                setattr(cfg, key, value)
                self.cfg[key] = value
                notes.append(f"  {key} = {value!r} kept from the run ({new!r} is today's recipe or default)")
            else:
                refused.append(_flag(key, value))
        if refused:
            raise ValueError(f"--resume: {out} was trained with other values; resume it with {' '.join(refused)}, "
                             "or choose another --out")
        if notes:
            print_main(self.dist, f"resuming {out} with:", *notes)

    def claim(self) -> None:
        """Take the run folder for this run, on every rank or none: rank 0 creates it if missing and holds
        an OS lock on out/.lock (flock) for the life of the process, so a killed run leaves no stale lock
        and a second process on the same folder fails here with one line naming the holder's PID. An
        unwritable --out (read-only, under a file) fails here too, before any model loads."""
        error = ""
        for stale in [r for r in _CLAIMED if r.path.resolve() == self.path.resolve()]:
            stale.release()  # a run of this process that ended without finish(): its folder is free again
        foreign = self.path.is_dir() and not (self.path / "config.json").exists() and \
            any(p.name != LOCK for p in self.path.iterdir())  # a folder of the user's: _check refuses it
        if self.dist.is_main and not foreign:
            try:
                self._created = [p for p in (self.path, *self.path.parents) if not p.exists()]
                self._fresh = not (self.path / "config.json").exists()  # this run starts the folder
                self.path.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                error = (f"--out {self.path} cannot be created or written ({e.strerror or e}); choose a "
                         "folder you can write to")
                self._remove_created()
            else:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                    os.close(fd)
                    error = (f"--out {self.path} is in use by another run (PID {holder}); wait for it to end "
                             "or choose another --out")
                else:
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
                    self._lock_fd = fd
                    _CLAIMED.append(self)
        if self.dist.world > 1:  # every rank stops if rank 0 could not claim the folder
            failed = self.dist.sum(torch.tensor([float(bool(error))], device=self.dist.device)).item() > 0
            error = error or ("rank 0 could not claim --out" if failed else "")
        if error:
            raise ValueError(error)

    def release(self, remove_if_unused: bool = False) -> None:
        """Let go of the run folder's lock (the end of the run, or a failure). remove_if_unused: after a
        failure or a stop before this run saved its first checkpoint, remove what it wrote (the folder and
        any parents it created, or, in a folder it found empty, its files), so that bad input leaves
        nothing behind and the same command starts again as printed."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self in _CLAIMED:
            _CLAIMED.remove(self)
        if remove_if_unused and self._fresh and not self.saved_step and self.path.is_dir() and \
                not (self.path / "checkpoint").exists():
            if self._created:
                self._remove_created()
            else:
                for p in self.path.iterdir():
                    shutil.rmtree(p) if p.is_dir() else p.unlink()

    def _remove_created(self) -> None:
        """Remove the folder and the parents that claim() created (deepest first)."""
        for p in self._created:
            shutil.rmtree(p, ignore_errors=True) if p == self.path else (p.rmdir() if p.is_dir() and
                                                                          not any(p.iterdir()) else None)

    def _find_checkpoint(self) -> None:
        """The newest complete checkpoint among the slots save() writes, or an error if only damaged
        ones exist (none at all: the run restarts from step 0)."""
        found, problems = {}, []
        for slot in self.SLOTS:
            if (self.path / slot).is_dir():
                step, why = read_manifest(self.path / slot)
                if step is None:
                    problems.append(why)
                else:
                    found[slot] = step
        if found:
            best = max(found, key=lambda s: (found[s], s == "checkpoint"))
            self.resume_from, self.start = self.path / best, found[best]
        elif (self.path / "checkpoint").is_dir():
            raise ValueError(f"{self.path} has no complete checkpoint to resume ({'; '.join(problems)}): "
                             f"restore {self.path}/checkpoint from a copy, or start over with another --out")

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint"

    def create(self) -> None:
        """Write the run directory (rank 0): config.json, samples/; on resume, the newest complete
        checkpoint moved to checkpoint/ (never deleted), incomplete or older ones removed, and the
        metrics of steps past it dropped."""
        self.dist.barrier()
        if self.dist.is_main:
            (self.path / "samples").mkdir(parents=True, exist_ok=True)
            write_atomic(self.path / "config.json", json.dumps(self.cfg, indent=2))
            if self.resume_from is not None and self.resume_from != self.checkpoint:
                if self.checkpoint.is_dir():  # older, or damaged: kept aside, not deleted
                    shutil.rmtree(self.path / "checkpoint.damaged", ignore_errors=True)
                    os.replace(self.checkpoint, self.path / "checkpoint.damaged")
                os.replace(self.resume_from, self.checkpoint)
                self.resume_from = self.checkpoint
            for slot in ("checkpoint.tmp", "checkpoint.old"):
                shutil.rmtree(self.path / slot, ignore_errors=True)
            metrics = self.path / "metrics.jsonl"
            if metrics.exists():  # the steps past the checkpoint go; a kill at any moment keeps every line
                kept = [r for r in read_jsonl(metrics, "the run's metrics", torn_tail_ok=True)
                        if r.get("step", -1) < self.start]
                write_atomic(metrics, "".join(json.dumps(r) + "\n" for r in kept))
        self.resume_from = self.checkpoint if self.start > 0 else None
        self.trackers = Trackers(parse_report_to(self.cfg.get("report_to", "none")), self.path, self.cfg,
                                 self.start, self.dist.is_main)
        self.dist.barrier()

    def log(self, metrics: dict, images: dict[str, str] | None = None) -> None:
        """One JSONL line (the ground truth), mirrored with the step's sample grids to the trackers."""
        if any(k.startswith("eval/") for k in metrics):
            self.last_eval = metrics
        if self.dist.is_main:
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            self.trackers.log(metrics, images)

    def save(self, step: int, model, optimizer, ema: EMA, extra_config: dict, state: dict,
             tensors: dict[str, list[torch.Tensor]]) -> None:
        """checkpoint/: the EMA student as a PEFT folder (the copy to use), plus the raw weights, EMA
        shadow, optimizer state and any other `tensors` (e.g. NFT's old policy) needed to resume;
        written to checkpoint.tmp/, sealed by its manifest, then moved into place (publish_dir).
        Safe against a kill at any instant."""
        if self.dist.is_main:
            tmp = self.path / "checkpoint.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            ema.swap()
            try:
                model.save_student(tmp, {**extra_config, "step": step})
            finally:
                ema.swap()
            save_file({f"p{i}": p.detach().contiguous().cpu() for i, p in enumerate(ema.params)},
                      tmp / "raw_weights.safetensors")
            save_file({f"p{i}": s.contiguous().cpu() for i, s in enumerate(ema.shadow)},
                      tmp / "ema_weights.safetensors")
            for name, values in tensors.items():
                save_file({f"p{i}": v.detach().contiguous().cpu() for i, v in enumerate(values)},
                          tmp / f"{name}_weights.safetensors")
            model_card(tmp, self.cfg, json.loads((tmp / "run_config.json").read_text()), self.last_eval,
                       self.command, self.script)
            torch.save({"step": step, "optimizer": optimizer.state_dict(), **state}, tmp / "trainer_state.pt")
            write_manifest(tmp, step)
            publish_dir(tmp, self.checkpoint)
        self.saved_step = step
        self.dist.barrier()

    def load(self, optimizer, ema: EMA, tensors: dict[str, list[torch.Tensor]]) -> dict:
        """Restore raw weights, EMA shadow, optimizer state and `tensors` from checkpoint/ (for
        --resume); returns the trainer state saved with them."""
        raw = load_file(self.checkpoint / "raw_weights.safetensors")
        shadow = load_file(self.checkpoint / "ema_weights.safetensors")
        with torch.no_grad():
            for i, (p, s) in enumerate(zip(ema.params, ema.shadow)):
                p.copy_(raw[f"p{i}"])
                s.copy_(shadow[f"p{i}"])
            for name, values in tensors.items():
                saved = load_file(self.checkpoint / f"{name}_weights.safetensors")
                for i, v in enumerate(values):
                    v.copy_(saved[f"p{i}"])
        state = torch.load(self.checkpoint / "trainer_state.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state.pop("optimizer"))
        return state


# ---------------------------------------------------------------------- the trainable student
@dataclasses.dataclass
class StudentConfig:
    """Fields every student-training script shares (paper section 7 defaults)."""
    recipe: str = "auto"                # auto (the base folder's recipe.json, if any) | paper | a recipe.json
    height: int = 512                   # pixels (paper: 512); 0 = the model's default resolution
    width: int = 512
    lora_rank: int = 32                 # LoRA r on the 8 attention projections
    lora_alpha: int = 64
    full_finetune: bool = False         # train every transformer weight instead of a LoRA
    lr: float = 3e-4                    # AdamW, betas (0.9, 0.999)
    weight_decay: float = 1e-4
    grad_clip: float = 1.0              # on the gradient of the release's loss scale (see the script)
    ema_decay: float = 0.9              # EMA of the trainable weights (evaluated and saved): its decay after
                                        # the warm-up min((1 + s) / (10 + s), ema_decay) at optimizer step s
    ema_every: int = 8                  # the EMA updates at optimizer steps s with (s + 1) % ema_every == 0
    eval_every: int = 20                # evaluate the EMA weights every this many steps (and at the end)
    eval_prompts: int = 64              # test prompts per task
    eval_steps: int = EVAL_STEPS        # ODE steps at evaluation
    save_every: int = 20
    eval_batch: int = 32                # evaluation images per forward, per rank (lowered by the memory plan)
    max_skipped_steps: int = 5          # consecutive non-finite steps (skipped, logged) before the run stops
    report_to: str = "none"             # none | tensorboard | wandb | tensorboard,wandb (+ JSONL, always)
    wandb_project: str = "diffusion-opd"
    push_to_hub: str = ""               # OWNER/NAME: upload the final checkpoint folder to the Hub
    resume: bool = False                # continue the run in --out exactly
    device: str = "auto"                # auto: cuda if available, else cpu
    collective_timeout_s: float = 1800.0  # several ranks: a collective waiting longer than this for a rank
                                        # that stopped answering ends the run, naming the rank
    dtype: str = "auto"                 # transformer and text encoders: auto (CUDA: bfloat16, the references'
                                        # mixed precision; CPU: float32), float32, bfloat16; the VAE: float32
    grad_checkpointing: bool = False    # recompute the transformer blocks' activations in the backward
    offload_text_encoders: bool = False  # keep the text encoders in host memory between encodings
    max_memory_gb: float = 0.0          # the memory plan's budget per GPU (memory.py picks the settings the
                                        # command line leaves free); 0 = the GPU's memory on CUDA, none on CPU
    dry_run: bool = False               # check every input, print the plan and the config, exit before any
                                        # model loads (--device cuda plans for a GPU, also where none is)


def check_student_config(cfg) -> None:
    """The shared fields' bad values, as one-line errors (before any model loads)."""
    require_positive(cfg, "lora_rank", "lora_alpha", "lr", "grad_clip", "ema_every", "eval_every",
                     "eval_prompts", "eval_steps", "eval_batch", "save_every", "max_skipped_steps")
    require(cfg.height >= 0 and cfg.width >= 0, f"--height/--width must be >= 0 (0: the model's own), "
                                                f"got {cfg.height}x{cfg.width}")
    require(0 <= cfg.ema_decay < 1, f"--ema_decay must be in [0, 1), got {cfg.ema_decay}")
    require(cfg.weight_decay >= 0, f"--weight_decay must be >= 0, got {cfg.weight_decay}")
    require(cfg.steps > 0, f"--steps must be > 0, got {cfg.steps}")
    require(cfg.max_memory_gb >= 0, f"--max_memory_gb must be >= 0, got {cfg.max_memory_gb}")
    require(cfg.collective_timeout_s > 0, f"--collective_timeout_s must be > 0, got {cfg.collective_timeout_s}")
    require(cfg.dtype in ("auto", *DTYPES), f"--dtype must be auto, float32 or bfloat16, got {cfg.dtype!r}")
    require(not (cfg.dtype == "bfloat16" and cfg.full_finetune),
            "full fine-tuning trains the transformer's own weights: keep --dtype float32")
    parse_report_to(cfg.report_to)
    require(not cfg.push_to_hub or (cfg.push_to_hub.count("/") == 1 and all(cfg.push_to_hub.split("/"))),
            f"--push_to_hub expects OWNER/NAME, got {cfg.push_to_hub!r}")


def load_base(cfg, dist: Dist):
    """The run's base model as the memory plan placed it: read in --dtype (resolved), the text encoders
    offloaded when planned, gradient checkpointing on when planned; the first download once per node."""
    from model import FlowModel
    with dist.local_first():
        model = FlowModel.load(cfg.model, device=dist.device, dtype=DTYPES[cfg.dtype])
    size = model.default_resolution()
    model.latent_shape(cfg.height or size, cfg.width or size)
    if cfg.offload_text_encoders:
        model.offload_text_encoders()
    if cfg.grad_checkpointing:
        model.transformer.enable_gradient_checkpointing()
    return model


class NonFiniteError(RuntimeError):
    """max_skipped_steps consecutive steps had a non-finite loss or gradient."""


class StudentTrainer:
    """The trainable weights of a run: a fresh LoRA (or `--init_lora`, a folder, or full fine-tuning), AdamW,
    gradient averaging over ranks + clipping + the non-finite guard, the EMA copy, and the run
    directory with exact resume. `begin()` writes the run directory, after every model has loaded."""

    def __init__(self, model, cfg, dist: Dist, run: RunDir | None, ema_calls: int = 1, init_lora: str | None = None):
        self.model, self.cfg, self.dist, self.run = model, cfg, dist, run  # run None: nothing is saved
        init_lora = getattr(cfg, "init_lora", "") if init_lora is None else init_lora  # a folder
        if cfg.full_finetune:
            params = model.enable_full_finetune()
        elif init_lora:
            check_same_base(init_lora, model)
            from model import STUDENT
            model.load_lora(init_lora, STUDENT, trainable=True)
            params = model.trainable_parameters()
        else:
            params = model.add_student_lora(cfg.lora_rank, cfg.lora_alpha, seed=cfg.seed)
        self.params = params
        # AdamW, betas (0.9, 0.999), paper section 7
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
        self.ema = EMA(params, cfg.ema_decay, cfg.ema_every, ema_calls)  # the script's call pattern (EMA)
        self.optimizer_steps = 0  # optimizer steps taken (the EMA's s): skipped steps take none
        self.skipped = 0   # consecutive non-finite steps so far
        self.tensors: dict[str, list[torch.Tensor]] = {}  # more state a resume needs (NFT's old policy)
        self.start = run.start if run else 0
        if run and run.resume_from is not None:
            check_same_base(str(run.resume_from), model)  # the same --model path may hold new weights

    def begin(self) -> int:
        """Write the run directory; on --resume restore the checkpoint. Returns the first step to run."""
        self.run.create()
        if self.start > 0:
            state = self.run.load(self.opt, self.ema, self.tensors)
            self.skipped = state.get("skipped", 0)
            # a checkpoint written before the count was saved: every step so far took its optimizer steps
            self.optimizer_steps = state.get("optimizer_steps", self.start * getattr(self.cfg, "updates_per_rollout", 1))
        return self.start

    def update(self, step: int, loss: torch.Tensor) -> tuple[float, bool]:
        """Average gradients over ranks, clip, step, zero, update the EMA; unless the loss (this rank's,
        any shape) or the gradient norm is not finite on any rank: then nothing changes but the
        gradients are dropped. Returns (grad norm, skipped)."""
        self.dist.average_gradients(self.params)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        bad = (~torch.isfinite(loss.detach())).any().to(norm.device, torch.float32) \
            + (~torch.isfinite(norm)).float()
        skipped = self.dist.sum(bad.reshape(1)).item() > 0
        if skipped:
            self.skipped += 1
        else:
            self.skipped = 0
            self.ema.before_step(self.optimizer_steps)
            self.opt.step()
            self.optimizer_steps += 1
            self.ema.after_step(self.optimizer_steps)
        self.opt.zero_grad(set_to_none=True)
        if self.skipped >= self.cfg.max_skipped_steps:
            run = self.run
            where = "nothing was saved" if not (run and run.saved_step) else \
                f"the checkpoint of step {run.saved_step} in {run.checkpoint} is intact"
            again = f": check the rewards, or resume with a lower learning rate: " \
                    f"{_with_flags(run.command, lr=self.cfg.lr / 10)} --resume" if run and run.command else ""
            raise NonFiniteError(
                f"{self.skipped} consecutive steps (through step {step}) had a non-finite loss or gradient "
                f"and were skipped, the weights never saw them; {where}{again}")
        return norm.item(), skipped

    def finish(self) -> None:
        """End of a run: close the trackers; upload the checkpoint with --push_to_hub (rank 0); let go of
        the run folder."""
        if self.dist.is_main:
            self.run.trackers.close()
            if self.cfg.push_to_hub:
                url = push_to_hub(self.run.checkpoint, self.cfg.push_to_hub,
                                  f"{self.run.script}: step {self.cfg.steps}")
                print_main(self.dist, f"uploaded {self.run.checkpoint} to {url}")
        self.dist.barrier()
        self.run.release()

    def stop_if_terminated(self, step: int, extra_config: dict) -> None:
        """The end of step `step`: if SIGTERM arrived (on any rank: one all-reduce of a flag, so that every
        rank stops at the same step), save the steps done unless this step just saved them, then raise
        Terminated (one_line_stops ends the run with the resume command, exit 143). Bounded by the rest of
        the step plus one save."""
        flag = torch.tensor([float(_SIGTERM["received"])], device=self.dist.device)
        if self.dist.sum(flag).item() == 0:
            return
        if self.run.saved_step != step + 1:
            self.save(step + 1, extra_config)
        raise Terminated

    def ema_weights(self):
        """Context: the student's weights are the EMA copy inside (for evaluation)."""
        @contextlib.contextmanager
        def ctx():
            self.ema.swap()
            try:
                yield
            finally:
                self.ema.swap()
        return ctx()

    def save(self, step: int, extra_config: dict) -> None:
        self.run.save(step, self.model, self.opt, self.ema, {"base_model": self.cfg.model, **extra_config},
                      {"skipped": self.skipped, "optimizer_steps": self.optimizer_steps}, self.tensors)

    def mean_over_ranks(self, stats: dict) -> dict:
        """Average per-rank scalar statistics over ranks (max for keys ending in _dev)."""
        keys = sorted(stats)
        vals = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=self.dist.device)
        if self.dist.world > 1:
            maxes = vals.clone()
            tdist.all_reduce(maxes, op=tdist.ReduceOp.MAX)
            vals = self.dist.sum(vals) / self.dist.world
            is_dev = torch.tensor([k.endswith("_dev") for k in keys], device=vals.device)
            vals = torch.where(is_dev, maxes, vals)
        return dict(zip(keys, vals.tolist()))


def update_or_stop(trainer: StudentTrainer, step: int, losses: list[torch.Tensor],
                   metrics: dict | None = None):
    """trainer.update on this rank's losses; after too many non-finite steps in a row, the step is
    logged (`skipped_nonfinite`) and the run stops with one line. Returns (grad norm, skipped)."""
    try:
        return trainer.update(step, torch.cat(losses))
    except NonFiniteError as e:
        trainer.run.log({**(metrics or {}), "step": step, "skipped_nonfinite": 1})
        fail(e)


def check_same_base(adapter_dir: str, model) -> None:
    """An adapter this project saved records its base (the digest of every component's stored weights, and
    the transformer's fingerprint); refuse it on another base. `model`: a loaded FlowModel, or the path of
    a base not yet loaded (then only the stored weights are compared, when both are here)."""
    from model import base_weights_differ, weights_digest
    cfg_file = Path(adapter_dir) / "run_config.json"
    if not Path(adapter_dir).is_dir():
        raise FileNotFoundError(f"adapter folder {adapter_dir} does not exist")
    if not cfg_file.is_file():
        return
    saved = read_json(cfg_file, "the adapter's run_config")
    current = weights_digest(model) if isinstance(model, str) else model.base_weights
    differ = base_weights_differ(saved["base_weights"], current) if saved.get("base_weights") and current else []
    if differ:
        raise ValueError(f"adapter {adapter_dir} was trained on another base model: the stored weights of its "
                         f"{', '.join(differ)} differ from this base's ({model if isinstance(model, str) else model.name})")
    if not isinstance(model, str) and saved.get("base_fingerprint") and saved["base_fingerprint"] != model.fingerprint():
        raise ValueError(f"adapter {adapter_dir} was trained on another base model "
                         f"(fingerprint {saved['base_fingerprint']}, this base {model.fingerprint()})")


def _disk_full(error: BaseException) -> bool:
    """A full disk, however the writer reports it: ENOSPC, its message, or torch.save's RuntimeError
    ("PytorchStreamWriter failed writing file ...: file write failed"), which carries no errno."""
    text = str(error)
    return getattr(error, "errno", None) == errno.ENOSPC or "No space left" in text or \
        (isinstance(error, RuntimeError) and "PytorchStreamWriter failed writing" in text)


class Terminated(Exception):
    """SIGTERM arrived and the run saved the steps done (StudentTrainer.stop_if_terminated)."""


_SIGTERM = {"received": False}  # set by the handler one_line_stops installs; read at the end of each step


def one_line_stops(main):
    """Decorator of a script's main(): Ctrl-C, SIGTERM (a scheduler's preemption notice), a full disk during a
    save, or a rank that stops answering end the run with one line that says what was kept and the
    command that resumes (exit 130 after Ctrl-C, 143 after SIGTERM, 1 otherwise). SIGTERM lets the step it
    arrives in finish, saves it, then stops: no step done is lost. The newest complete checkpoint is never
    touched (RunDir.save, publish_dir)."""
    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        import signal
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: _SIGTERM.update(received=True)) \
            if threading_main() else None
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            _stop("interrupted", 130)
        except Terminated:
            _stop("terminated (SIGTERM) at the end of a step", 143)
        except (OSError, SafetensorError, RuntimeError) as e:
            if _disk_full(e):
                _stop("the disk is full", 1, "free some space, then ")
            if _timed_out(e):
                _stop(f"a collective timed out: {_stuck_ranks()} did not answer within --collective_timeout_s "
                      f"(stopped, hung or killed)", 1)
            raise
        finally:
            _SIGTERM["received"] = False
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    return wrapped


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _timed_out(error: BaseException) -> bool:
    """A collective's timeout, as gloo and NCCL (blocking wait) report it."""
    text = str(error).lower()
    return tdist.is_initialized() and ("timed out" in text or "timeout" in text)


def _stuck_ranks() -> str:
    """Which ranks stopped answering: gloo's monitored barrier on the side group Dist made for this, which
    names the ranks that do not arrive (every live rank reaches it after its own timeout)."""
    group = _DIAGNOSIS.get("group")
    if group is None:
        return "another rank"
    try:
        tdist.monitored_barrier(group, timeout=datetime.timedelta(seconds=_DIAGNOSIS["timeout_s"]),
                                wait_all_ranks=True)
    except RuntimeError as e:
        found = re.findall(r"[Rr]anks? ([\d, ]+) failed", str(e))
        if found:
            return "rank " + found[0].strip().rstrip(",")
    return "another rank"


_DIAGNOSIS: dict = {}  # the gloo group and its wait (seconds) that _stuck_ranks uses


def _stop(what: str, code: int, then: str = "") -> typing.NoReturn:
    run = next((r for r in reversed(_CLAIMED) if r.command), None)
    if run is None:
        line = f"{what}; nothing was written"
    elif run.saved_step:
        lost = "(it holds every step done)" if code == 143 else "is intact (steps after it are lost)"
        line = (f"{what}: the checkpoint of step {run.saved_step} in {run.checkpoint} {lost}; "
                f"{then}resume with: {_with_flags(run.command)} --resume")
    else:
        line = f"{what} before the first checkpoint; {then}start again with: {_with_flags(run.command)}"
    for r in list(_CLAIMED):
        r.release(remove_if_unused=True)
    if int(os.environ.get("RANK", 0)) == 0:
        print(line, file=sys.stderr, flush=True)
    raise SystemExit(code)


def fail(error: Exception) -> typing.NoReturn:
    """End the process with a one-line error (the scripts' bad-input path): printed by rank 0 only (every
    rank fails with it), and a run folder this process created for nothing is removed."""
    for run in list(_CLAIMED):
        run.release(remove_if_unused=True)
    if int(os.environ.get("RANK", 0)) != 0:
        raise SystemExit(1)
    raise SystemExit(f"error: {error}") from None


def print_main(dist: Dist, *lines: str) -> None:
    if dist.is_main:
        print(*lines, sep="\n", file=sys.stderr, flush=True)
