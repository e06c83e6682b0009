"""The training-run harness shared by pretrain_toy.py, teacher_rl.py and opd.py.

One place for what every training script needs and none of them is about: a commented config
dataclass read from the command line, the distributed helper (plain `python` or `torchrun`, gloo on
CPU, NCCL on CUDA), the run directory (resolved config, one JSONL metrics line per step, atomic
checkpoints, exact resume) and the EMA of the trainable weights (paper section 7).

Departures from the reference code
1. Gradients of the trainable weights are averaged across ranks with one all-reduce after the
   backward passes of a step (what DDP does), instead of wrapping the backbone in DDP: the
   student, teachers and base share one backbone and are called several times per step.
2. All randomness of a step derives from (seed, step, global sample index), so resuming needs no
   RNG state and any rollout can be regenerated; the run is identical on 1 or N ranks.

Run: a library. `python teacher_rl.py --help` lists a script's config.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import types
import typing
from pathlib import Path

import torch
import torch.distributed as tdist


# ---------------------------------------------------------------------- config from the CLI
def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def parse_config(cls, argv=None):
    """Build dataclass `cls` from `--key value` / `--key=value` (hyphens or underscores).

    Types are checked by argparse from the annotations; an unknown key is an error; bool fields
    accept a bare `--flag`; list fields take several values (`--teachers a b c`).
    """
    ap = argparse.ArgumentParser(description=(cls.__doc__ or "").strip().splitlines()[0])
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):  # X | None
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        names = sorted({f"--{f.name}", f"--{f.name.replace('_', '-')}"})
        if tp is bool:
            ap.add_argument(*names, dest=f.name, type=_parse_bool, nargs="?", const=True, default=default)
        elif typing.get_origin(tp) in (list, tuple):
            ap.add_argument(*names, dest=f.name, type=typing.get_args(tp)[0], nargs="+", default=default)
        else:
            ap.add_argument(*names, dest=f.name, type=tp, default=default, help=f"default {default!r}")
    return cls(**vars(ap.parse_args(argv)))


def config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------- distributed
class Dist:
    """Rank/world/device from torchrun's environment; a no-op world of 1 under plain python."""

    def __init__(self, device: str = "auto"):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
        if use_cuda:
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        if self.world > 1 and not tdist.is_initialized():
            tdist.init_process_group("nccl" if use_cuda else "gloo")
        self.is_main = self.rank == 0

    def split(self, n_global: int, what: str) -> slice:
        """This rank's contiguous share of `n_global` items; errors if they do not divide."""
        if n_global % self.world:
            raise ValueError(f"{what} = {n_global} does not divide over {self.world} ranks")
        per = n_global // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

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


def step_seed(seed: int, step: int, index: int = 0) -> int:
    """A distinct 31-bit seed for (run seed, step, global sample index): rollouts are regenerable."""
    return (seed * 1_000_003 + step * 10_007 + index) % (2**31 - 1)


# ---------------------------------------------------------------------- EMA
class EMA:
    """ema <- decay * ema + (1 - decay) * w, every `every` steps (paper section 7: 0.9 every 8)."""

    def __init__(self, params, decay: float, every: int):
        self.params, self.decay, self.every = list(params), decay, every
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int):
        if (step + 1) % self.every == 0:
            for s, p in zip(self.shadow, self.params):
                s.mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)

    @torch.no_grad()
    def swap(self):
        """Exchange live and EMA weights (call twice to undo): evaluate and save the EMA copy."""
        for s, p in zip(self.shadow, self.params):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)


# ---------------------------------------------------------------------- run directory
def atomic_replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written folder `tmp` to `final`, never leaving a half-written `final`."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


class RunDir:
    """out/config.json, out/metrics.jsonl, out/checkpoint/ (atomic), out/samples/*.png.

    A run directory belongs to one config: reusing it for a different one is an error, reusing it
    without --resume is an error, and --resume continues from out/checkpoint exactly.
    """

    # keys that may differ between a run and its resumption
    RESUMABLE = ("resume", "steps")

    def __init__(self, out: str, cfg, dist: Dist):
        self.path, self.dist = Path(out), dist
        self.cfg = config_dict(cfg)
        cfg_file = self.path / "config.json"
        if cfg_file.exists():
            old = json.loads(cfg_file.read_text())
            # a field added to the script after the run started counts as its default
            defaults = json.loads(json.dumps(config_dict(type(cfg)())))
            diff = sorted(k for k in set(old) | set(self.cfg)
                          if k not in self.RESUMABLE and old.get(k, defaults.get(k)) != self.cfg.get(k))
            if diff:
                raise ValueError(f"output directory {out} holds a different run (config differs in {diff}); "
                                 "choose another --out")
            if not self.cfg.get("resume"):
                raise ValueError(f"output directory {out} already holds this run; pass --resume to continue it")
        elif self.path.exists() and any(self.path.iterdir()) and not (self.path / "checkpoint").exists():
            raise ValueError(f"output directory {out} is not empty and holds no run; choose another --out")
        dist.barrier()
        if dist.is_main:
            (self.path / "samples").mkdir(parents=True, exist_ok=True)
            cfg_file.write_text(json.dumps(self.cfg, indent=2))
        dist.barrier()

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint"

    def start_step(self) -> int:
        """0 for a new run; the saved step for --resume (metrics past it are dropped)."""
        state = self.checkpoint / "trainer_state.pt"
        if not self.cfg.get("resume"):
            return 0
        # a run killed before its first checkpoint restarts from 0 and drops its earlier metrics
        step = torch.load(state, map_location="cpu", weights_only=True)["step"] if state.exists() else 0
        self.dist.barrier()
        if self.dist.is_main and (self.path / "metrics.jsonl").exists():
            lines = (self.path / "metrics.jsonl").read_text().splitlines()
            kept = [ln for ln in lines if json.loads(ln).get("step", -1) < step]
            (self.path / "metrics.jsonl").write_text("".join(ln + "\n" for ln in kept))
        self.dist.barrier()
        return step

    def log(self, metrics: dict) -> None:
        if self.dist.is_main:
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")

    def save(self, step: int, model, optimizer, ema: EMA, extra_config: dict) -> None:
        """checkpoint/: the EMA student as a PEFT folder (the copy to use), plus the raw weights,
        EMA shadow and optimizer state needed to resume; written to a temp folder, then renamed."""
        from safetensors.torch import save_file
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
            torch.save({"step": step, "optimizer": optimizer.state_dict()}, tmp / "trainer_state.pt")
            atomic_replace_dir(tmp, self.checkpoint)
        self.dist.barrier()

    def load(self, optimizer, ema: EMA) -> None:
        """Restore raw weights, EMA shadow and optimizer state from checkpoint/ (for --resume)."""
        from safetensors.torch import load_file
        raw = load_file(self.checkpoint / "raw_weights.safetensors")
        shadow = load_file(self.checkpoint / "ema_weights.safetensors")
        with torch.no_grad():
            for i, (p, s) in enumerate(zip(ema.params, ema.shadow)):
                p.copy_(raw[f"p{i}"])
                s.copy_(shadow[f"p{i}"])
        state = torch.load(self.checkpoint / "trainer_state.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])


# ---------------------------------------------------------------------- the trainable student
@dataclasses.dataclass
class StudentConfig:
    """Fields every student-training script shares (paper section 7 defaults)."""
    height: int = 0                     # 0: the model's default resolution
    width: int = 0
    lora_rank: int = 32                 # LoRA r on the 8 attention projections
    lora_alpha: int = 64
    full_finetune: bool = False         # train every transformer weight instead of a LoRA
    lr: float = 3e-4                    # AdamW, betas (0.9, 0.999)
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    ema_decay: float = 0.9              # EMA of the trainable weights: evaluated and saved
    ema_every: int = 1                  # paper: 8, over thousands of steps; 1 suits ~100-step toy runs
    eval_every: int = 20                # evaluate the EMA weights every this many steps (and at the end)
    eval_prompts: int = 64              # test prompts per task
    eval_steps: int = 40                # ODE steps at evaluation
    save_every: int = 20
    resume: bool = False                # continue the run in --out exactly
    device: str = "auto"                # auto: cuda if available, else cpu


class StudentTrainer:
    """The trainable weights of a run: a fresh LoRA (or `--init_lora`, or full fine-tuning), AdamW,
    gradient averaging over ranks + clipping, the EMA copy, the run directory and exact resume."""

    def __init__(self, model, cfg, dist: Dist):
        self.model, self.cfg, self.dist = model, cfg, dist
        if cfg.full_finetune:
            params = model.enable_full_finetune()
        elif getattr(cfg, "init_lora", ""):
            check_same_base(cfg.init_lora, model)
            from model import STUDENT
            model.load_lora(cfg.init_lora, STUDENT, trainable=True)
            params = model.trainable_parameters()
        else:
            params = model.add_student_lora(cfg.lora_rank, cfg.lora_alpha, seed=cfg.seed)
        self.params = params
        # AdamW, betas (0.9, 0.999), paper section 7
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
        self.ema = EMA(params, cfg.ema_decay, cfg.ema_every)
        self.run = RunDir(cfg.out, cfg, dist)
        self.start = self.run.start_step()
        if self.start > 0:
            check_same_base(str(self.run.checkpoint), model)  # the same --model path may hold new weights
            self.run.load(self.opt, self.ema)

    def update(self, step: int) -> float:
        """Average gradients over ranks, clip, step, zero, update the EMA. Returns the grad norm."""
        self.dist.average_gradients(self.params)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update(step)
        return norm.item()

    def ema_weights(self):
        """Context: the student's weights are the EMA copy inside (for evaluation)."""
        import contextlib

        @contextlib.contextmanager
        def ctx():
            self.ema.swap()
            try:
                yield
            finally:
                self.ema.swap()
        return ctx()

    def save(self, step: int, extra_config: dict) -> None:
        self.run.save(step, self.model, self.opt, self.ema,
                      {"base_model": self.cfg.model, **extra_config})

    def mean_over_ranks(self, stats: dict) -> dict:
        """Average per-rank scalar statistics over ranks (max for keys ending in _dev)."""
        keys = sorted(stats)
        vals = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=self.dist.device)
        if self.dist.world > 1:
            maxes = vals.clone()
            tdist.all_reduce(maxes, op=tdist.ReduceOp.MAX)
            vals = self.dist.sum(vals) / self.dist.world
            vals = torch.where(torch.tensor([k.endswith("_dev") for k in keys], device=vals.device), maxes, vals)
        return dict(zip(keys, vals.tolist()))


def check_same_base(adapter_dir: str, model) -> None:
    """An adapter this project saved records its base's fingerprint; refuse it on another base."""
    cfg_file = Path(adapter_dir) / "run_config.json"
    if not Path(adapter_dir).is_dir():
        raise FileNotFoundError(f"adapter folder {adapter_dir} does not exist")
    if cfg_file.is_file():
        saved = json.loads(cfg_file.read_text()).get("base_fingerprint")
        if saved and saved != model.fingerprint():
            raise ValueError(f"adapter {adapter_dir} was trained on another base model "
                             f"(fingerprint {saved}, this base {model.fingerprint()})")
