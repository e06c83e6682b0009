"""The trained student that teacher_rl.py, nft.py and opd.py share (paper section 7): its config fields,
its weights (a LoRA or the full transformer), AdamW, the references' EMA, the update that never lets a
non-finite loss or gradient reach the weights, its checkpoints through the run folder (plumbing/rundir.py),
and the phases of a step timed.

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
   weights (plumbing.model_files.weights_digest: every component), checked before any model loads.

Run: a library. `python teacher_rl.py --help` lists a script's config.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

import torch
import torch.distributed as tdist

from evaluate import EVAL_STEPS
from model import STUDENT, FlowModel
from plumbing.config import _with_flags, option, require, require_positive
from plumbing.dist import Dist, print_main
from plumbing.jsonfiles import read_json
from plumbing.model_files import DTYPES, base_weights_differ, weights_digest
from plumbing.reporting import parse_report_to, push_to_hub
from plumbing.rundir import RunDir
from plumbing.stops import Terminated, fail, sigterm_received


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
    plan's prediction is printed at start (plumbing/memory.py)."""
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


# ---------------------------------------------------------------------- the trainable student
@dataclasses.dataclass
class StudentConfig:
    """Fields every student-training script shares (paper section 7 defaults)."""
    recipe: str = option("auto", "auto (the base folder's recipe.json, if any) | paper | a recipe.json")
    height: int = option(512, "pixels (paper: 512); 0 = the model's default resolution")
    width: int = 512
    lora_rank: int = option(32, "LoRA r on the 8 attention projections")
    lora_alpha: int = 64
    full_finetune: bool = option(False, "train every transformer weight instead of a LoRA")
    lr: float = option(3e-4, "AdamW, betas (0.9, 0.999)")
    weight_decay: float = 1e-4
    grad_clip: float = option(1.0, "on the gradient of the release's loss scale (see the script)")
    ema_decay: float = option(0.9, "EMA of the trainable weights (evaluated and saved): its decay after the warm-up "
                                   "min((1 + s) / (10 + s), ema_decay) at optimizer step s")
    ema_every: int = option(8, "the EMA updates at optimizer steps s with (s + 1) % ema_every == 0")
    eval_every: int = option(20, "evaluate the EMA weights every this many steps (and at the end)")
    eval_prompts: int = option(64, "test prompts per task")
    eval_steps: int = option(EVAL_STEPS, "ODE steps at evaluation")
    save_every: int = 20
    eval_batch: int = option(32, "evaluation images per forward, per rank (lowered by the memory plan)")
    max_skipped_steps: int = option(5, "consecutive non-finite steps (skipped, logged) before the run stops")
    report_to: str = option("none", "none | tensorboard | wandb | tensorboard,wandb (+ JSONL, always)")
    wandb_project: str = "diffusion-opd"
    push_to_hub: str = option("", "OWNER/NAME: upload the final checkpoint folder to the Hub")
    resume: bool = option(False, "continue the run in --out exactly")
    device: str = option("auto", "auto: cuda if available, else cpu")
    collective_timeout_s: float = option(1800.0, "several ranks: a collective waiting longer than this for a rank "
                                                 "that stopped answering ends the run, naming the rank")
    dtype: str = option("auto", "transformer and text encoders: auto (CUDA: bfloat16, the references' mixed "
                                "precision; CPU: float32), float32, bfloat16; the VAE: float32")
    grad_checkpointing: bool = option(False, "recompute the transformer blocks' activations in the backward")
    offload_text_encoders: bool = option(False, "keep the text encoders in host memory between encodings")
    max_memory_gb: float = option(0.0, "the memory plan's budget per GPU (plumbing/memory.py picks the settings the "
                                       "command line leaves free); 0 = the GPU's memory on CUDA, none on CPU")
    dry_run: bool = option(False, "check every input, print the plan and the config, exit before any model loads "
                                  "(--device cuda plans for a GPU, also where none is)")


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
        flag = torch.tensor([float(sigterm_received())], device=self.dist.device)
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
