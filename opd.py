"""Stage 2: DiffusionOPD, multi-teacher on-policy distillation with the closed-form per-step KL.

Implements paper sections 4-7 (Eqs. 4, 10-12, 15-23 and Algorithm 1). The student (base + fresh
LoRA) samples its own trajectories without gradient; at every visited state x_j the teacher of the
batch's task gives its transition mean, and the student's mean is recomputed with gradient:

    SDE (a > 0):  L = E_x [ sum_j ||mu_S(x_j) - mu_T(x_j)||^2 / (2 sbar_j^2) ]     (Eqs. 10-11)
    ODE (a = 0):  L = E_x [ sum_j 1/2 ||mu_S(x_j) - mu_T(x_j)||^2 ]                   (Eq. 12)

Reduction: sum over latent dims (a true KL), sum over trained steps j (Eq. 4), mean over samples.
Routing (Algorithm 1): each round has one sampling batch per task, in round-robin order; the batch's
prompts come from that task's dataset and only that task's teacher supervises it; the losses of the
whole round are accumulated and ONE optimizer step is taken, so every rollout is on-policy.

Teachers are frozen LoRA adapters on the student's own backbone (one copy of the base weights), or
full SD3-family checkpoints; each is a local folder or a hub reference owner/repo[/subfolder]. A teacher trained by teacher_rl.py carries its task, dataset and
guidance in run_config.json; `--teacher_task/--teacher_dataset/--teacher_cfg/--teacher_reward`
set or override them (`--teacher_cfg geneval=1.0`).

`--estimator ppo` trains with the PPO-style estimator of the same objective (Eqs. 16-23): the
loss rho_j KL_j with rho_j = pi_theta(x_{j+1}|x_j) / pi_old(x_{j+1}|x_j), whose on-policy gradient
is grad KL_j + KL_j grad log pi_theta(x_{j+1}|x_j): the same expectation plus a zero-mean noise
term. `--variance_rollouts R` measures the gradient variance of both estimators over R rollouts at
fixed parameters and prints their ratio, then exits.

Departures from the reference code (DiffusionOPD release)
1. The SDE KL divides by the exact transition variance sbar_j^2 = s_j^2 (-Delta_j) of Eq. 10; the
   authors' code (from Flow-GRPO) divides by s_j^2, which reweights step j by (-Delta_j).
2. Teacher targets for all trained steps of a batch are computed in batched forwards
   (`teacher_chunk` rows at a time) instead of one forward per timestep.
3. Losses are summed over latent dims (a KL, not a per-dim average); AdamW makes the scale moot.
4. Half precision is `--dtype bfloat16` transformer weights with the LoRA, optimizer and loss in
   float32 (no loss scaling needed), not the release's fp16 mixed precision; the default is float32.
   `python bench.py` measures it and the other speed levers (see bench.py).

Run:
    torchrun --standalone --nproc_per_node=2 opd.py --teachers ckpts/*        # CPU, toy world
    python opd.py --teachers ckpts/* --noise_level 0.7 --estimator ppo --out runs/opd-ppo
    python opd.py --teachers ckpts/* --noise_level 0.7 --variance_rollouts 16
    torchrun --nproc_per_node=8 opd.py --teachers ckpts/* --height 512 --width 512 \\
        --prompts_per_batch 24 --teacher_cfg geneval=1.0 --dtype bfloat16   # SD3.5-M, paper recipe
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data import Task, load_prompts, load_task
from evaluate import EVAL_GUIDANCE, evaluate_task
from harness import Dist, StudentConfig, StudentTrainer, check_same_base, parse_config, step_seed
from model import FlowModel, TextEmbeds
from rewards import make_reward
from sample import gaussian_kl, gaussian_logprob, rollout, sde_step

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # --dtype (bench.py measures both)


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
    prompts_per_batch: int = 16         # prompts of one task per round, over all ranks
    num_steps: int = 10                 # sampling steps N
    noise_level: float = 0.0            # a: 0 = ODE (default), > 0 = SDE
    guidance: float = 4.5               # student CFG (rollout and training)
    train_steps: list[int] = field(default_factory=list)  # which steps j to train; default all
    estimator: str = "closed_form"      # or "ppo" (Eqs. 16-23; needs noise_level > 0)
    teacher_chunk: int = 0              # rows per teacher forward; 0 = all trained steps at once
    train_chunk: int = 0                # rows per student forward+backward; 0 = all at once
    dtype: str = "float32"              # transformer weights: float32, bfloat16 (LoRA trains in float32)
    compile: bool = False               # torch.compile the transformer blocks (FlowModel.compile_blocks)
    variance_rollouts: int = 0          # > 0: measure gradient variance of both estimators, then exit
    lr: float = 1e-3                    # toy recipe (paper: 3e-4 on SD3.5-M)


@dataclass
class Teacher:
    task: Task
    adapter: str | None                 # adapter name on the student's backbone, or None
    model: FlowModel | None = None      # a separate full checkpoint, when not an adapter


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
    if len(parts) < 2 or Path(ref).is_absolute() or ref.startswith("."):
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
            base = saved.get("base_model") or json.loads((p / "adapter_config.json").read_text()).get(
                "base_model_name_or_path", "")
            bases.add(base)
            fingerprints.add(saved.get("base_fingerprint"))
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
            raise ValueError(f"teachers name bases {sorted(bases) or 'none'}: pass --model")
        base = bases.pop()
    return base, specs


def load_teachers(model: FlowModel, specs, dist) -> list[Teacher]:
    teachers = []
    for s in specs:
        if s["kind"] == "lora":
            check_same_base(s["path"], model)
            name = f"teacher_{s['task'].name}"
            model.load_lora(s["path"], name)
            teachers.append(Teacher(s["task"], name))
        else:
            teachers.append(Teacher(s["task"], None, FlowModel.load(s["path"], device=dist.device,
                                                                   dtype=model.dtype)))
    return teachers


# ---------------------------------------------------------------------- one task batch
def clock(device: torch.device) -> float:
    """time.perf_counter() once the device's queued work is done: exact phase timers on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
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
            out.append(sde_step(x[sl], v, t[sl], t_next[sl], noise_level, t_guard, torch.zeros_like(v))[1])
    return torch.cat(out)


def batch_loss(cfg: OPDConfig, model: FlowModel, teacher: Teacher, prompts, seeds, train_steps, backward_scale):
    """Roll out the student, get teacher targets, backpropagate the loss of one task batch.

    Returns per-sample loss summed over trained steps (B,) and seconds per phase.
    """
    timer = {}
    t0 = clock(model.device)
    embeds = model.encode_prompts(prompts)
    traj = rollout(model, embeds, seeds, cfg.num_steps, cfg.guidance, cfg.noise_level,
                   cfg.height or None, cfg.width or None, adapter="student", decode=False)
    timer["rollout"] = clock(model.device) - t0

    t0 = clock(model.device)
    B, K = len(seeds), len(train_steps)
    js = torch.tensor(train_steps)
    # rows ordered (step k, sample b): x (K*B, C, h, w)
    x = traj.latents[:, js].transpose(0, 1).flatten(0, 1).to(model.device)
    x_next = traj.latents[:, js + 1].transpose(0, 1).flatten(0, 1).to(model.device)
    t = traj.t[js].repeat_interleave(B).to(model.device)
    t_next = traj.t[js + 1].repeat_interleave(B).to(model.device)
    sbar = traj.std[js].repeat_interleave(B).to(model.device)
    rows_embeds = TextEmbeds(embeds.seq.repeat(K, 1, 1), embeds.pooled.repeat(K, 1))
    rows_prompts = list(prompts) * K
    t_guard = traj.t[1].item()
    mean_t = teacher_means(teacher, model, rows_prompts, rows_embeds, x, t, t_next, cfg.noise_level, t_guard,
                           cfg.teacher_chunk)
    timer["teacher"] = clock(model.device) - t0

    t0 = clock(model.device)
    ode = cfg.noise_level == 0
    chunk = cfg.train_chunk or x.shape[0]
    per_row = []
    for lo in range(0, x.shape[0], chunk):
        sl = slice(lo, lo + chunk)
        v = model.velocity(x[sl], t[sl], rows_embeds[sl], cfg.guidance)
        mean_s = sde_step(x[sl], v, t[sl], t_next[sl], cfg.noise_level, t_guard, torch.zeros_like(v))[1]
        if cfg.estimator == "ppo":
            loss = ppo_style_loss(mean_s, mean_t[sl], sbar[sl], x_next[sl])
        else:
            loss = closed_form_loss(mean_s, mean_t[sl], sbar[sl], ode)
        # L = (1/B) sum_b sum_j loss_{j,b}; backward_scale spreads the mean over ranks and tasks
        (loss.sum() * backward_scale / B).backward()
        per_row.append(loss.detach())
    timer["train"] = clock(model.device) - t0
    return torch.cat(per_row).view(K, B).sum(0), timer


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
    steps = cfg.train_steps or list(range(cfg.num_steps))
    for r in tqdm(range(cfg.variance_rollouts), desc="variance", disable=not dist.is_main):
        for est in grads:
            cfg.estimator = est
            for teacher, prompts, seeds in round_batches(cfg, teachers, 10**6 + r, dist, prompts_by_task):
                batch_loss(cfg, model, teacher, prompts, seeds, steps, 1.0 / (dist.world * len(teachers)))
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


def validate(cfg: OPDConfig, dist: Dist):
    """Every bad input fails here with a one-line error, before any compute."""
    try:
        base, specs = resolve_teachers(cfg)
        prompts_by_task = {s["task"].name: load_prompts(s["task"].dataset, "train")[0] for s in specs}
        for s in specs:
            load_prompts(s["task"].dataset, "test")
        dist.split(cfg.prompts_per_batch, "prompts_per_batch (every task gets this many prompts per round)")
        if cfg.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
        if cfg.dtype != "float32" and cfg.full_finetune:
            raise ValueError("full fine-tuning trains the transformer's own weights: keep --dtype float32")
        if cfg.estimator not in ("closed_form", "ppo"):
            raise ValueError(f"estimator must be closed_form or ppo, got {cfg.estimator!r}")
        if (cfg.estimator == "ppo" or cfg.variance_rollouts) and cfg.noise_level <= 0:
            raise ValueError("the PPO-style estimator needs a log-density: use --noise_level > 0 (e.g. 0.7)")
        bad = [j for j in cfg.train_steps if not 0 <= j < cfg.num_steps]
        if bad:
            raise ValueError(f"train_steps {bad} outside 0..{cfg.num_steps - 1}")
        rewards = {s["task"].name: make_reward(s["task"].reward, device=dist.device) for s in specs}
        return base, specs, prompts_by_task, rewards
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise SystemExit(f"error: {e}") from None


def main(argv=None):
    cfg = parse_config(OPDConfig, argv)
    dist = Dist(cfg.device)
    base, specs, prompts_by_task, rewards = validate(cfg, dist)
    cfg.model = base
    try:
        model = FlowModel.load(base, device=dist.device, dtype=DTYPES[cfg.dtype])
        trainer = StudentTrainer(model, cfg, dist)  # before the teachers: full FT moves them to a frozen copy
        teachers = load_teachers(model, specs, dist)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if cfg.compile:
        model.compile_blocks()
    train_steps = cfg.train_steps or list(range(cfg.num_steps))
    if cfg.variance_rollouts:
        res = gradient_variance(cfg, model, teachers, trainer, prompts_by_task, dist)
        if dist.is_main:
            print(json.dumps(res, indent=2))
            print(f"gradient variance ratio ppo / closed_form = {res['ratio']:.1f} "
                  f"over {cfg.variance_rollouts} rollouts (a = {cfg.noise_level})")
        dist.close()
        return res
    run = trainer.run
    saved = {"tasks": [t.task.name for t in teachers], "teachers": cfg.teachers, "guidance": cfg.guidance}
    bar = tqdm(range(trainer.start, cfg.steps), desc="opd", disable=not dist.is_main,
               initial=trainer.start, total=cfg.steps)
    for step in bar:
        metrics, timer = {"step": step}, {"rollout": 0.0, "teacher": 0.0, "train": 0.0}
        # ---- one round: one batch per task, losses accumulated, then a single optimizer step
        for teacher, prompts, seeds in round_batches(cfg, teachers, step, dist, prompts_by_task):
            loss, t = batch_loss(cfg, model, teacher, prompts, seeds, train_steps,
                                 1.0 / (dist.world * len(teachers)))
            metrics[f"loss/{teacher.task.name}"] = dist.all_gather(loss.to(dist.device)).mean().item()
            timer = {k: timer[k] + t[k] for k in timer}
        t0 = clock(dist.device)
        metrics["grad_norm"] = trainer.update(step)
        timer["optimizer"] = clock(dist.device) - t0
        metrics["loss"] = float(np.mean([metrics[f"loss/{t.task.name}"] for t in teachers]))
        metrics.update({f"sec/{k}": v for k, v in timer.items()})
        # ---- evaluate the EMA student on every task with the 40-step ODE; checkpoint
        last = step + 1 == cfg.steps
        if (step + 1) % cfg.eval_every == 0 or last:
            t0 = time.perf_counter()
            with trainer.ema_weights():
                for teacher in teachers:
                    task = teacher.task
                    res = evaluate_task(model, task, rewards[task.name], dist, "student", cfg.eval_prompts,
                                        cfg.eval_steps, EVAL_GUIDANCE,
                                        grid_path=f"{run.path}/samples/step{step + 1:05d}_{task.name}.png")
                    metrics.update({f"eval/{task.name}/{k}": v for k, v in res.items()})
            metrics["sec/eval"] = time.perf_counter() - t0
            if dist.is_main:
                rows = [f"| {t.task.name} | " + " | ".join(f"{k}={v:.3f}" for k, v in metrics.items()
                                                           if k.startswith(f"eval/{t.task.name}/")) + " |"
                        for t in teachers]
                tqdm.write(f"step {step + 1} evaluation (EMA student, ODE {cfg.eval_steps} steps):\n" + "\n".join(rows))
        run.log(metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        if (step + 1) % cfg.save_every == 0 or last:
            trainer.save(step + 1, saved)
    dist.close()


if __name__ == "__main__":
    main()
