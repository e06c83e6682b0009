"""Stage 2: DiffusionOPD, multi-teacher on-policy distillation with the closed-form per-step KL.

Implements paper sections 4-7 (Eqs. 4, 10-12, 15-23 and Algorithm 1). The student (base + fresh
LoRA) samples its own trajectories without gradient; at every visited state x_j the teacher of the
batch's task gives its transition mean, and the student's mean is recomputed with gradient:

    SDE (a > 0):  L = E_x [ sum_j ||mu_S(x_j) - mu_T(x_j)||^2 / (2 sbar_j^2) ]     (Eqs. 10-11)
    ODE (a = 0):  L = E_x [ sum_j 1/2 ||mu_S(x_j) - mu_T(x_j)||^2 ]                   (Eq. 12)

Routing (Algorithm 1): each round has one sampling batch per task, in round-robin order; the batch's
prompts come from that task's dataset and only that task's teacher supervises it; the gradients of
the whole round are accumulated and ONE optimizer step is taken, so every rollout is on-policy.

Scale. The logged `loss` is the true L above: summed over latent dims d and trained steps, averaged
over samples. The optimizer sees the release's scale: each step's loss averaged over dims, then
averaged over trained steps, samples and task batches, i.e. L / (d K) with K trained steps; the ODE
loss keeps Eq. 12's factor 1/2 there, as the release does. So lr and grad_clip mean what the paper's mean.

Teachers are frozen LoRA adapters on the student's own backbone (one copy of the base weights), or
full SD3-family checkpoints; each is a local folder or a hub reference owner/repo[/subfolder]. A
teacher trained by teacher_rl.py carries its task, dataset and guidance in run_config.json;
`--teacher_task/--teacher_dataset/--teacher_cfg/--teacher_reward` set or override them
(`--teacher_cfg geneval=1.0`; a folder of Flow-GRPO's or the DiffusionOPD release needs
`--teacher_task` and `--model`, its adapter_config names no base).

`--estimator ppo` trains with the PPO-style estimator of the same objective (Eqs. 16-23): the
loss rho_j KL_j with rho_j = pi_theta(x_{j+1}|x_j) / pi_old(x_{j+1}|x_j), whose on-policy gradient
is grad KL_j + KL_j grad log pi_theta(x_{j+1}|x_j): the same expectation plus a zero-mean noise
term. `--variance_rollouts R` measures the gradient variance of both estimators over R rollouts at
fixed parameters and prints their ratio, then exits.

The defaults are the paper's recipe (section 7); on the embedded toy model the toy recipe
(toy/recipe.py) changes a few values, printed at start and saved in config.json.

Departures from the reference code (DiffusionOPD release)
1. The SDE KL divides by the exact transition variance sbar_j^2 = s_j^2 (-Delta_j) of Eq. 10; the
   authors' code (from Flow-GRPO) divides by s_j^2, which reweights step j by (-Delta_j).
2. Teacher targets for all trained steps of a batch are computed in batched forwards
   (`teacher_chunk` rows at a time) instead of one forward per timestep; the student's forward and
   backward likewise take `train_chunk` rows at a time (0: all of a batch's trained steps at once).
3. Half precision is bfloat16 transformer weights (`--dtype auto`: bfloat16 on CUDA, float32 on CPU)
   with the LoRA, optimizer and loss in float32 (no loss scaling needed), not the release's fp16
   mixed precision. `python -m bench.opd_round` measures it and the other speed levers.
4. A step with a non-finite loss or gradient is skipped, logged, and stops the run after
   `max_skipped_steps` in a row (harness.StudentTrainer.update); the release steps regardless.

Run:
    torchrun --standalone --nproc_per_node=2 opd.py --teachers ckpts/*        # CPU, toy world
    python opd.py --teachers ckpts/* --noise_level 0.7 --estimator ppo --out runs/opd-ppo
    python opd.py --teachers ckpts/* --noise_level 0.7 --variance_rollouts 16
    torchrun --nproc_per_node=8 opd.py --teachers ckpts/geneval ckpts/ocr ckpts/aesthetic \\
        --teacher_cfg geneval=1.0                      # SD3.5-M, the paper's recipe (512 px, bf16)
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import memory
from data import Task, load_prompts, load_task
from evaluate import evaluate_task
from harness import (Dist, NonFiniteError, RunDir, StudentConfig, StudentTrainer, apply_recipe, check_same_base,
                     check_student_config, describe_recipe, fail, given_keys, parse_config, print_main, require,
                     require_positive, step_seed)
from model import FlowModel, TextEmbeds, check_lora_folder, check_model_path, check_resolution, resolution_rule
from rewards import make_reward
from sample import gaussian_kl, gaussian_logprob, rollout, time_grid, transition_mean

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # --dtype (bench/opd_round.py measures both)


@dataclass
class OPDConfig(StudentConfig):
    """DiffusionOPD: distil several task teachers into one student on its own rollouts.
    Fields shared with teacher_rl.py (LoRA, AdamW, EMA, evaluation, checkpoints) are in harness.StudentConfig."""
    teachers: list[str] = field(default_factory=lambda: sorted(str(p) for p in Path("ckpts").glob("*")))
    teacher_task: list[str] = field(default_factory=list)     # i-th entry names teacher i's task
    teacher_dataset: list[str] = field(default_factory=list)  # task=DIR overrides
    teacher_cfg: list[str] = field(default_factory=list)      # task=W guidance overrides
    teacher_reward: list[str] = field(default_factory=list)   # task=SPEC (evaluation) overrides
    model: str = ""                     # base; default: the base the teachers name
    out: str = "runs/opd"
    seed: int = 0
    steps: int = 60                     # rounds = optimizer steps
    prompts_per_batch: int = 24         # prompts of one task per round over all ranks (paper: 3 per GPU x 8)
    num_steps: int = 10                 # sampling steps N
    noise_level: float = 0.0            # a: 0 = ODE (default), > 0 = SDE
    guidance: float = 4.5               # student CFG (rollout and training)
    cfg_detach_uncond: bool = False     # release: the training forward's uncond branch gets gradient too;
                                        # true (ablation): v = sg(v_u) + w (v_c - sg(v_u)), Flow-GRPO before
                                        # 2025-08 (section 8a): the gradient ignores how v_u moves, and on
                                        # the toy the loss climbs above its start after ~20 rounds
    timestep_fraction: float = 0.99     # train steps 0 .. int(fraction N) - 1 (paper: 0..8 of 10)
    train_steps: list[int] = field(default_factory=list)  # which steps j to train; overrides the fraction
    estimator: str = "closed_form"      # or "ppo" (Eqs. 16-23; needs noise_level > 0), or "sft": the
                                        # off-policy baseline, flow matching on the teachers' own samples
    distance_prompts: int = 16          # test prompts per task of the held-out distance to the teacher
    distance_every: int = 0             # also log that distance every this many rounds (0: with evaluations)
    teacher_chunk: int = 0              # rows per teacher forward; 0 = all trained steps at once
    train_chunk: int = 0                # rows per student forward+backward; 0 = all at once
    grad_checkpointing: bool = False    # recompute block activations in the backward (memory for time)
    max_memory_gb: float = 0.0          # memory budget: the planner picks the chunks and checkpointing that
                                        # fit (memory.py); 0 = the GPU's memory on CUDA, no planning on CPU
    dtype: str = "auto"                 # transformer weights: auto (bf16 on CUDA), float32, bfloat16
    teacher_dtype: str = "float32"      # frozen teacher LoRAs: float32, or "model" (the transformer's dtype)
    compile: bool = False               # torch.compile the transformer blocks (FlowModel.compile_blocks)
    variance_rollouts: int = 0          # > 0: measure gradient variance of both estimators, then exit


@dataclass
class Teacher:
    task: Task
    adapter: str | None                 # adapter name on the student's backbone, or None
    model: FlowModel | None = None      # a separate full checkpoint, when not an adapter


def trained_steps(cfg: OPDConfig) -> list[int]:
    """The steps j whose transitions are trained: --train_steps, else 0 .. int(fraction N) - 1."""
    return cfg.train_steps or list(range(max(1, int(cfg.timestep_fraction * cfg.num_steps))))


def weights_dtype(cfg: OPDConfig, dist: Dist) -> torch.dtype:
    return DTYPES[cfg.dtype] if cfg.dtype != "auto" else torch.bfloat16 if dist.device.type == "cuda" else torch.float32


# ---------------------------------------------------------------------- the two estimators
def closed_form_loss(mean_s, mean_t, sbar, ode: bool):
    """Per-row loss (R,) of Eqs. 10-12, summed over dims; mean_t is a constant target.

    ODE: 1/2 ||mu_S - mu_T||^2;  SDE: ||mu_S - mu_T||^2 / (2 sbar^2) (sbar (R,), exact Eq. 10 variance).
    """
    if ode:
        return 0.5 * (mean_s - mean_t).square().flatten(1).sum(1)
    return gaussian_kl(mean_s, mean_t, sbar**2)


def ppo_style_loss(mean_s, mean_t, sbar, x_next):
    """Per-row PPO-style loss (Eqs. 16-23) on-policy: rho KL with rho = pi_theta / sg(pi_theta) = 1.

    KL keeps its gradient (the pathwise term) and rho adds KL grad log pi_theta(x_{j+1} | x_j) (the
    score-function term, zero mean, nonzero variance): the same expectation as the closed form.
    Every rollout is made by the current weights and each round takes one optimizer step, so the
    PPO clip is inactive; pi_old is taken as the detached current density, which keeps float noise
    between rollout and training batches from triggering it.
    """
    kl = gaussian_kl(mean_s, mean_t, sbar**2)
    logp, _ = gaussian_logprob(x_next, mean_s, sbar)
    ratio = torch.exp(logp - logp.detach())
    return ratio * kl


# ---------------------------------------------------------------------- teachers
def _kv(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--{what} expects task=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def fetch_teacher(ref: str) -> str:
    """A local teacher folder, or a hub reference "owner/repo[/sub/folder]" (e.g. the DiffusionOPD
    release's quanhaol/DiffusionOPD/AesTeacher/lora) downloaded to the hub cache; returns a folder."""
    if Path(ref).is_dir():
        return ref
    parts = ref.split("/")
    if len(parts) < 2 or Path(ref).is_absolute() or ref.startswith(".") or Path(ref).exists():
        raise FileNotFoundError(f"teacher {ref} does not exist (expected a PEFT LoRA folder, an SD3 pipeline "
                                "folder or a hub id owner/repo[/subfolder])")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    from huggingface_hub import snapshot_download
    try:
        root = snapshot_download(repo, allow_patterns=[f"{sub}/*"] if sub else None)
    except Exception as e:  # offline, unknown repo, no access: all end here with the hub's reason
        raise FileNotFoundError(f"teacher {ref} is not a local folder and could not be fetched from the hub "
                                f"({type(e).__name__}: {e})") from None
    return str(Path(root) / sub)


def resolve_teachers(cfg: OPDConfig) -> tuple[str, list[dict]]:
    """Read every teacher's saved config (no weights loaded): its task, dataset, guidance, reward,
    base. Returns (base model, [spec]). Every inconsistency is an error here, before any compute."""
    if not cfg.teachers:
        raise ValueError("no teachers given (--teachers DIR [DIR ...])")
    if cfg.teacher_task and len(cfg.teacher_task) != len(cfg.teachers):
        raise ValueError(f"--teacher_task names {len(cfg.teacher_task)} tasks for {len(cfg.teachers)} teachers")
    datasets, cfgs = _kv(cfg.teacher_dataset, "teacher_dataset"), _kv(cfg.teacher_cfg, "teacher_cfg")
    rewards = _kv(cfg.teacher_reward, "teacher_reward")
    for name, w in cfgs.items():
        try:
            float(w)
        except ValueError:
            raise ValueError(f"--teacher_cfg {name}={w}: the guidance must be a number") from None
    specs, bases, fingerprints = [], set(), set()
    for i, ref in enumerate(cfg.teachers):
        path = fetch_teacher(ref)
        p = Path(path)
        saved = json.loads((p / "run_config.json").read_text()) if (p / "run_config.json").is_file() else {}
        kind = "lora" if (p / "adapter_config.json").is_file() else "full" if (p / "model_index.json").is_file() else ""
        if not kind:
            raise ValueError(f"teacher {path} is neither a PEFT LoRA folder nor an SD3 pipeline folder")
        name = cfg.teacher_task[i] if cfg.teacher_task else saved.get("task", "")
        if not name:
            raise ValueError(f"teacher {path} names no task: pass --teacher_task (one per teacher)")
        task = load_task(name, datasets.get(name, saved.get("dataset", "")), rewards.get(name, saved.get("reward", "")),
                         float(cfgs[name]) if name in cfgs else saved.get("guidance"))
        task.eval_key = saved.get("eval_key", task.eval_key)
        if kind == "lora":
            check_lora_folder(path)
            base = saved.get("base_model") or json.loads((p / "adapter_config.json").read_text()).get(
                "base_model_name_or_path")
            bases.add(base or "")  # Flow-GRPO's and the release's adapters name no base (null)
            fingerprints.add(saved.get("base_fingerprint"))
        else:
            check_model_path(path)
        specs.append({"path": path, "kind": kind, "task": task})
    names = [s["task"].name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"two teachers claim the same task {dup}: one teacher per task")
    for key in list(datasets) + list(cfgs) + list(rewards):
        if key not in names:
            raise ValueError(f"override for unknown task {key!r}; teachers' tasks are {names}")
    fingerprints.discard(None)
    if len(fingerprints) > 1:
        raise ValueError(f"teachers were trained on different base models (fingerprints {sorted(fingerprints)})")
    base = cfg.model
    if not base:
        bases.discard("")
        if len(bases) != 1:
            raise ValueError(f"the teachers name {'bases ' + str(sorted(bases)) if bases else 'no base model'}: "
                             "pass --model (e.g. stabilityai/stable-diffusion-3.5-medium)")
        base = bases.pop()
    return base, specs


def load_teachers(model: FlowModel, specs, dist, dtype: torch.dtype = torch.float32) -> list[Teacher]:
    teachers = []
    for s in specs:
        if s["kind"] == "lora":
            check_same_base(s["path"], model)
            name = f"teacher_{s['task'].name}"
            model.load_lora(s["path"], name, dtype=dtype)
            teachers.append(Teacher(s["task"], name))
        else:
            teachers.append(Teacher(s["task"], None, FlowModel.load(s["path"], device=dist.device,
                                                                   dtype=model.dtype)))
    return teachers


# ---------------------------------------------------------------------- one task batch
def no_phase(name: str):
    """The default phase hook: nothing. `Phases` (or a benchmark's hook) times each phase instead."""
    return contextlib.nullcontext()


class Phases:
    """Seconds spent in each named phase: `with phases("rollout"): ...` (exact on CUDA: synchronised)."""

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


def teacher_means(teacher: Teacher, model: FlowModel, prompts, embeds: TextEmbeds, x, t, t_next,
                  noise_level: float, t_guard: float, chunk: int):
    """mu_T(x_j) at the student's states, rows (x_j, t_j) of all trained steps batched together."""
    net = teacher.model or model
    emb = net.encode_prompts(prompts) if teacher.model is not None else embeds
    out = []
    chunk = chunk or x.shape[0]
    with torch.no_grad(), net.adapter(teacher.adapter):
        for lo in range(0, x.shape[0], chunk):
            sl = slice(lo, lo + chunk)
            v = net.velocity(x[sl], t[sl], emb[sl], teacher.task.guidance)
            out.append(transition_mean(x[sl], v, t[sl], t_next[sl], noise_level, t_guard))
    return torch.cat(out)


def batch_gradient(cfg: OPDConfig, model: FlowModel, teacher: Teacher, prompts, seeds, train_steps, scale: float,
                   phase=no_phase):
    """One task batch of Algorithm 1: roll out the student, get the teacher's targets at its states,
    and accumulate the gradient of the batch's loss into .grad, scaled by `scale` (1 / tasks: the round's
    mean; the mean over ranks is Dist.average_gradients'). Returns the true loss per sample, summed
    over trained steps (B,). With --estimator sft: `sft_gradient` instead."""
    if cfg.estimator == "sft":
        return sft_gradient(cfg, model, teacher, prompts, seeds, train_steps, scale, phase)
    with phase("rollout"):
        embeds = model.encode_prompts(prompts)
        traj = rollout(model, embeds, seeds, cfg.num_steps, cfg.guidance, cfg.noise_level,
                       cfg.height or None, cfg.width or None, adapter="student", decode=False)

    with phase("teacher"):
        B, K = len(seeds), len(train_steps)
        js = torch.tensor(train_steps)
        # rows ordered (step k, sample b): x (K*B, C, h, w)
        x = traj.latents[:, js].transpose(0, 1).flatten(0, 1).to(model.device)
        x_next = traj.latents[:, js + 1].transpose(0, 1).flatten(0, 1).to(model.device)
        t = traj.t[js].repeat_interleave(B).to(model.device)
        t_next = traj.t[js + 1].repeat_interleave(B).to(model.device)
        sbar = traj.sbar[js].repeat_interleave(B).to(model.device)
        rows_embeds = TextEmbeds(embeds.seq.repeat(K, 1, 1), embeds.pooled.repeat(K, 1))
        t_guard = traj.t[1].item()
        mean_t = teacher_means(teacher, model, list(prompts) * K, rows_embeds, x, t, t_next, cfg.noise_level,
                               t_guard, cfg.teacher_chunk)

    with phase("train"):
        d = x[0].numel()
        chunk = cfg.train_chunk or x.shape[0]
        per_row = []
        for lo in range(0, x.shape[0], chunk):
            sl = slice(lo, lo + chunk)
            v = model.velocity(x[sl], t[sl], rows_embeds[sl], cfg.guidance, detach_uncond=cfg.cfg_detach_uncond)
            mean_s = transition_mean(x[sl], v, t[sl], t_next[sl], cfg.noise_level, t_guard)
            if cfg.estimator == "ppo":
                loss = ppo_style_loss(mean_s, mean_t[sl], sbar[sl], x_next[sl])
            else:
                loss = closed_form_loss(mean_s, mean_t[sl], sbar[sl], cfg.noise_level == 0)
            # the release's scale: mean over dims, trained steps and samples (module docstring, "Scale")
            ((loss / d).sum() * scale / (K * B)).backward()
            per_row.append(loss.detach())
    return torch.cat(per_row).view(K, B).sum(0)


def sft_gradient(cfg: OPDConfig, model: FlowModel, teacher: Teacher, prompts, seeds, train_steps, scale: float,
                 phase=no_phase):
    """The off-policy distillation baseline (SFT on teacher samples; the paper compares against it): the
    teacher samples x0 with its own ODE and guidance from the batch's seeds, and the student's
    conditional velocity is fitted by flow matching at the same K grid times OPD trains, with fresh
    noise per (sample, step):  x_t = (1 - t) x0 + t eps,  L = ||v_S(x_t, t) - (eps - x0)||^2.
    Same prompts, seeds, rounds and optimizer as OPD; the loss scale as OPD's (mean over dims, steps,
    samples). Returns the loss per sample summed over steps (B,)."""
    net = teacher.model or model
    with phase("teacher"):
        emb_t = net.encode_prompts(prompts)
        x0 = rollout(net, emb_t, seeds, cfg.num_steps, teacher.task.guidance, 0.0, cfg.height or None,
                     cfg.width or None, adapter=teacher.adapter, decode=False).latents[:, -1].to(model.device)
    with phase("train"):
        embeds = model.encode_prompts(prompts)
        grid = time_grid(model.pipe.scheduler, cfg.num_steps)
        B, K, d = len(seeds), len(train_steps), x0[0].numel()
        eps = torch.stack([torch.randn((K, *x0.shape[1:]), generator=torch.Generator().manual_seed(int(s) + 104729))
                           for s in seeds]).to(model.device)     # (B, K, C, h, w)
        per_step = []
        for k, j in enumerate(train_steps):
            t = grid[j].to(model.device).expand(B)
            tt = t.view(-1, 1, 1, 1)
            # x_t = (1 - t) x0 + t eps;  target v = eps - x0
            x_t = (1 - tt) * x0 + tt * eps[:, k]
            v = model.velocity(x_t, t, embeds, 1.0)
            loss = (v - (eps[:, k] - x0)).square().flatten(1).sum(1)
            ((loss / d).sum() * scale / (K * B)).backward()
            per_step.append(loss.detach())
    return torch.stack(per_step).sum(0)


@torch.no_grad()
def distance_to_teacher(cfg: OPDConfig, model: FlowModel, teacher: Teacher, task: Task, dist: Dist) -> float:
    """The held-out distance to the teacher, a low-noise progress measure (Fig. 6 in the study): the
    student's ODE rollouts from the first `distance_prompts` test prompts (prompt i seeded i), and at
    every state the release-scale mean-matching loss mean_dims 1/2 (mu_S - mu_T)^2 of the ODE step,
    averaged over steps and prompts (and ranks). For the ODE mu_S(x_j) is the rollout's x_{j+1}."""
    prompts = load_prompts(task.dataset, "test")[0]
    n = min(cfg.distance_prompts, len(prompts)) // dist.world * dist.world
    mine = list(range(*dist.split(n, "distance prompts").indices(n)))
    embeds = model.encode_prompts([prompts[i] for i in mine])
    traj = rollout(model, embeds, mine, cfg.num_steps, cfg.guidance, 0.0, cfg.height or None, cfg.width or None,
                   adapter="student", decode=False)
    N, B = cfg.num_steps, len(mine)
    x = traj.latents[:, :N].transpose(0, 1).flatten(0, 1)            # (N*B, C, h, w), rows (step, prompt)
    t, t_next = traj.t[:N].repeat_interleave(B), traj.t[1:].repeat_interleave(B)
    rows_embeds = TextEmbeds(embeds.seq.repeat(N, 1, 1), embeds.pooled.repeat(N, 1))
    mean_t = teacher_means(teacher, model, [prompts[i] for i in mine] * N, rows_embeds, x.to(model.device),
                           t.to(model.device), t_next.to(model.device), 0.0, traj.t[1].item(), cfg.teacher_chunk)
    mean_s = traj.latents[:, 1:].transpose(0, 1).flatten(0, 1).to(model.device)
    local = 0.5 * (mean_s - mean_t).square().flatten(1).mean(1)       # (N*B,)
    return (dist.sum(local.sum().reshape(1)) / (N * n)).item()


def round_batches(cfg: OPDConfig, teachers, step: int, dist: Dist, prompts_by_task):
    """Algorithm 1: batch m of round `step` belongs to task m; its prompts (rank's share) and seeds."""
    mine = dist.split(cfg.prompts_per_batch, "prompts_per_batch")
    for m, teacher in enumerate(teachers):
        prompts = prompts_by_task[teacher.task.name]
        rng = np.random.default_rng([cfg.seed, step, m])
        idx = rng.choice(len(prompts), cfg.prompts_per_batch, replace=len(prompts) < cfg.prompts_per_batch)[mine]
        base = m * cfg.prompts_per_batch
        yield teacher, [prompts[i] for i in idx], [step_seed(cfg.seed, step, base + i)
                                                   for i in range(mine.start, mine.stop)]


def gradient_variance(cfg, model, teachers, trainer, prompts_by_task, dist):
    """Per-coordinate gradient variance (summed) of both estimators over R rollouts, same rollouts."""
    grads = {"closed_form": [], "ppo": []}
    steps = trained_steps(cfg)
    for r in tqdm(range(cfg.variance_rollouts), desc="variance", disable=not dist.is_main):
        for est in grads:
            cfg.estimator = est
            for teacher, prompts, seeds in round_batches(cfg, teachers, 10**6 + r, dist, prompts_by_task):
                batch_gradient(cfg, model, teacher, prompts, seeds, steps, 1.0 / len(teachers))
            dist.average_gradients(trainer.params)
            grads[est].append(torch.cat([p.grad.flatten() for p in trainer.params]).cpu())
            trainer.opt.zero_grad(set_to_none=True)
    out = {}
    for est, g in grads.items():
        g = torch.stack(g).double()
        out[est] = {"var": g.var(0).sum().item(), "mean_norm": g.mean(0).norm().item()}
    out["ratio"] = out["ppo"]["var"] / max(out["closed_form"]["var"], 1e-300)
    mean_cf, mean_ppo = (torch.stack(grads[e]).double().mean(0) for e in ("closed_form", "ppo"))
    out["cos_mean_grads"] = torch.nn.functional.cosine_similarity(mean_cf, mean_ppo, dim=0).item()
    return out


def plan_memory(cfg: OPDConfig, dist: Dist, given: set[str], n_teachers: int) -> None:
    """Before anything loads: predict the peak memory of a round for each setting (memory.py), set the
    fastest that fits the budget (chunk sizes and checkpointing the command line did not set), print
    the plan; an error naming the numbers when nothing fits."""
    budget = cfg.max_memory_gb * memory.GiB
    if not budget and dist.device.type == "cuda":
        budget = torch.cuda.get_device_properties(dist.device).total_memory
    if not budget:
        return
    try:
        rule = resolution_rule(cfg.model)
        if rule is None:
            raise FileNotFoundError(f"{cfg.model} has no local configs to plan from")
        height, width = cfg.height or rule[1], cfg.width or rule[1]
        fp = memory.footprint(cfg.model, height, width, weights_dtype(cfg, dist), cfg.lora_rank,
                              memory.text_length(cfg.model))
    except FileNotFoundError as e:
        if cfg.max_memory_gb:
            raise ValueError(f"--max_memory_gb: {e}") from None
        print_main(dist, f"memory plan skipped ({e})")
        return
    prompts = cfg.prompts_per_batch // dist.world
    fixed = {k for k in ("train_chunk", "teacher_chunk", "grad_checkpointing") if k in given}
    chosen, table = memory.plan(fp, budget, prompts, len(trained_steps(cfg)), cfg.num_steps, n_teachers,
                                fixed={k: getattr(cfg, k) for k in fixed})
    for key in ("train_chunk", "teacher_chunk", "grad_checkpointing"):
        setattr(cfg, key, getattr(chosen, key))
    print_main(dist, memory.format_table(table, chosen, budget))


def validate(cfg: OPDConfig, dist: Dist, argv: list[str] | None = ()):
    """Every bad input fails here with a one-line error, before any model loads and before anything
    is written. Applies the recipe (the paper's, or the toy one on the toy base) to cfg."""
    try:
        base, specs = resolve_teachers(cfg)
        cfg.model = cfg.model or base
        changed = apply_recipe(cfg, given_keys(OPDConfig, argv), cfg.model, "opd")
        check_student_config(cfg)
        require_positive(cfg, "prompts_per_batch", "num_steps")
        require(cfg.noise_level >= 0, f"--noise_level must be >= 0, got {cfg.noise_level}")
        require(0 < cfg.timestep_fraction <= 1, f"--timestep_fraction must be in (0, 1], got {cfg.timestep_fraction}")
        require(cfg.teacher_chunk >= 0 and cfg.train_chunk >= 0, "--teacher_chunk/--train_chunk must be >= 0")
        require(cfg.dtype in ("auto", *DTYPES), f"--dtype must be auto, float32 or bfloat16, got {cfg.dtype!r}")
        require(cfg.teacher_dtype in ("float32", "model"), f"--teacher_dtype must be float32 or model, got {cfg.teacher_dtype!r}")
        require(not (cfg.dtype == "bfloat16" and cfg.full_finetune),
                "full fine-tuning trains the transformer's own weights: keep --dtype float32")
        require(cfg.estimator in ("closed_form", "ppo", "sft"),
                f"--estimator must be closed_form, ppo or sft, got {cfg.estimator!r}")
        require(cfg.distance_prompts >= 0 and cfg.distance_every >= 0, "--distance_prompts/--distance_every must be >= 0")
        require(cfg.distance_prompts == 0 or cfg.distance_prompts >= dist.world,
                f"--distance_prompts {cfg.distance_prompts} gives some of the {dist.world} ranks no prompt: use 0 or >= {dist.world}")
        require(not ((cfg.estimator == "ppo" or cfg.variance_rollouts) and cfg.noise_level <= 0),
                "the PPO-style estimator needs a log-density: use --noise_level > 0 (e.g. 0.7)")
        bad = [j for j in cfg.train_steps if not 0 <= j < cfg.num_steps]
        require(not bad, f"--train_steps {bad} outside 0..{cfg.num_steps - 1}")
        check_model_path(cfg.model)
        rule = resolution_rule(cfg.model)
        if rule and (cfg.height or cfg.width):
            check_resolution(cfg.height or rule[1], cfg.width or rule[1], rule[0])
        plan_memory(cfg, dist, given_keys(OPDConfig, argv), len(specs))
        prompts_by_task = {s["task"].name: load_prompts(s["task"].dataset, "train")[0] for s in specs}
        for s in specs:
            load_prompts(s["task"].dataset, "test")
        dist.split(cfg.prompts_per_batch, "prompts_per_batch (every task gets this many prompts per round)")
        run = None if cfg.variance_rollouts else RunDir(cfg.out, cfg, dist, "opd.py", argv)
        rewards = {s["task"].name: make_reward(s["task"].reward, device=dist.device) for s in specs}
        print_main(dist, describe_recipe(cfg, changed))
        return specs, prompts_by_task, rewards, run
    except (ValueError, FileNotFoundError, KeyError) as e:
        fail(e)


def main(argv=None):
    cfg = parse_config(OPDConfig, argv)
    try:
        dist = Dist(cfg.device)
    except ValueError as e:
        fail(e)
    specs, prompts_by_task, rewards, run = validate(cfg, dist, argv)
    try:
        model = FlowModel.load(cfg.model, device=dist.device, dtype=weights_dtype(cfg, dist))
        model.latent_shape(cfg.height or model.default_resolution(), cfg.width or model.default_resolution())
        # the student before the teachers: full fine-tuning moves base and teachers to a frozen copy
        trainer = StudentTrainer(model, cfg, dist, run)
        teachers = load_teachers(model, specs, dist, model.dtype if cfg.teacher_dtype == "model" else torch.float32)
    except (ValueError, FileNotFoundError) as e:
        fail(e)
    if cfg.grad_checkpointing:
        model.transformer.enable_gradient_checkpointing()
    if cfg.compile:
        model.compile_blocks()
    train_steps = trained_steps(cfg)
    if cfg.variance_rollouts:
        res = gradient_variance(cfg, model, teachers, trainer, prompts_by_task, dist)
        if dist.is_main:
            print(json.dumps(res, indent=2))
            print(f"gradient variance ratio ppo / closed_form = {res['ratio']:.1f} "
                  f"over {cfg.variance_rollouts} rollouts (a = {cfg.noise_level})")
        dist.close()
        return res
    start = trainer.begin()  # the run directory is written only now, after every model has loaded
    saved = {"tasks": [t.task.name for t in teachers], "teachers": cfg.teachers, "guidance": cfg.guidance}
    bar = tqdm(range(start, cfg.steps), desc="opd", disable=not dist.is_main, initial=start, total=cfg.steps)
    for step in bar:
        metrics, phases, images = {"step": step}, Phases(dist.device), {}
        # ---- one round: one batch per task, gradients accumulated, then a single optimizer step
        losses = []
        for teacher, prompts, seeds in round_batches(cfg, teachers, step, dist, prompts_by_task):
            loss = batch_gradient(cfg, model, teacher, prompts, seeds, train_steps,
                                  1.0 / len(teachers), phases)
            losses.append(loss)
            metrics[f"loss/{teacher.task.name}"] = dist.all_gather(loss.to(dist.device)).mean().item()
        with phases("optimizer"):
            try:
                metrics["grad_norm"], skipped = trainer.update(step, torch.cat(losses))
            except NonFiniteError as e:
                run.log({**metrics, "skipped_nonfinite": 1})
                fail(e)
        metrics["skipped_nonfinite"] = int(skipped)
        metrics["loss"] = float(np.mean([metrics[f"loss/{t.task.name}"] for t in teachers]))
        metrics.update({f"sec/{k}": v for k, v in phases.sec.items()})
        # ---- evaluate the EMA student on every task with the 40-step ODE; checkpoint
        last = step + 1 == cfg.steps
        if (step + 1) % cfg.eval_every == 0 or last:
            t0 = time.perf_counter()
            with trainer.ema_weights():
                for teacher in teachers:
                    task = teacher.task
                    images[f"samples/{task.name}"] = f"{run.path}/samples/step{step + 1:05d}_{task.name}.png"
                    res = evaluate_task(model, task, rewards[task.name], dist, "student", cfg.eval_prompts,
                                        cfg.eval_steps, cfg.guidance, grid_path=images[f"samples/{task.name}"])
                    metrics.update({f"eval/{task.name}/{k}": v for k, v in res.items()})
            metrics["sec/eval"] = time.perf_counter() - t0
            if dist.is_main:
                rows = [f"| {t.task.name} | " + " | ".join(f"{k}={v:.3f}" for k, v in metrics.items()
                                                           if k.startswith(f"eval/{t.task.name}/")) + " |"
                        for t in teachers]
                tqdm.write(f"step {step + 1} evaluation (EMA student, ODE {cfg.eval_steps} steps):\n" + "\n".join(rows))
        if cfg.distance_prompts and ((step + 1) % (cfg.distance_every or cfg.eval_every) == 0 or last):
            t0 = time.perf_counter()
            with trainer.ema_weights():
                for teacher in teachers:
                    metrics[f"eval/{teacher.task.name}/distance"] = distance_to_teacher(cfg, model, teacher,
                                                                                        teacher.task, dist)
            metrics["sec/eval"] = metrics.get("sec/eval", 0.0) + time.perf_counter() - t0
        run.log(metrics, images)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        if (step + 1) % cfg.save_every == 0 or last:
            trainer.save(step + 1, saved)
    trainer.finish()
    dist.close()


if __name__ == "__main__":
    main()
