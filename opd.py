"""Stage 2: DiffusionOPD, multi-teacher on-policy distillation with the closed-form per-step KL.

Implements paper sections 4-7 (Eqs. 4, 10-12, 15-23 and Algorithm 1). The student (base + fresh
LoRA) samples its own trajectories without gradient; at every visited state x_j the teacher of the
batch's task gives its transition mean, and the student's mean is recomputed with gradient:

    SDE (a > 0):  L = E_x [ sum_j ||mu_S(x_j) - mu_T(x_j)||^2 / (2 sbar_j^2) ]     (Eqs. 10-11)
    ODE (a = 0):  L = E_x [ sum_j 1/2 ||mu_S(x_j) - mu_T(x_j)||^2 ]                   (Eq. 12)

Routing (Algorithm 1, `opd_round`): each round has one sampling batch per task, in round-robin order; the
batch's prompts come from that task's dataset and only that task's teacher supervises it (`supervisors`,
the routing's fork point; a task may have several teachers, the release's teacher axis: the batch's loss
is the sum of its loss against each of them, as the release sums it); the gradients of the whole round
are accumulated and ONE optimizer step is taken, so every rollout is on-policy. The student starts from a
fresh LoRA, or from `--init_lora` (the release's train.lora_path: a PEFT folder, a teacher, a hub reference).

Scale. The logged `loss` is the true L above: summed over latent dims d and trained steps, averaged
over samples. The optimizer sees the release's scale: each step's loss averaged over dims, then over
trained steps, samples and task batches, i.e. L / (d K) with K trained steps; the ODE loss keeps
Eq. 12's factor 1/2 there, as the release does. So lr and grad_clip mean what the paper's mean.

`--estimator ppo` trains with the PPO-style estimator of the same objective (Eqs. 16-23): the loss
rho_j KL_j with rho_j = pi_theta(x_{j+1}|x_j) / pi_old(x_{j+1}|x_j), whose on-policy gradient is
grad KL_j + KL_j grad log pi_theta(x_{j+1}|x_j): the same expectation plus a zero-mean noise term.
Teachers: teachers.py; the run's input checks: opd_inputs.py; the study's instruments (SFT baseline,
held-out distance, gradient variance): study/instruments.py. Defaults: the paper's recipe (section 7).

Departures from the reference code (DiffusionOPD release)
1. The SDE KL divides by the exact transition variance sbar_j^2 = s_j^2 (-Delta_j) of Eq. 10; the
   authors' code (from Flow-GRPO) divides by s_j^2, which reweights step j by (-Delta_j).
2. Teacher targets for all trained steps of a batch are computed in batched forwards
   (`teacher_chunk` rows at a time) instead of one forward per timestep; the student's forward and
   backward likewise take `train_chunk` rows at a time (0: all of a batch's trained steps at once).
3. Half precision is bfloat16 transformer and text-encoder weights (`--dtype auto`: bfloat16 on CUDA,
   float32 on CPU; the VAE in float32) with the LoRA, optimizer and loss in float32 (no loss scaling
   needed), not the release's fp16 mixed precision. `python -m bench.opd_round` measures it and the
   other speed levers; plumbing/memory.py plans the chunks, checkpointing and placement that fit the GPU.
4. A step with a non-finite loss or gradient is skipped, logged, and stops the run after
   `max_skipped_steps` in a row (student.StudentTrainer.update); the release steps regardless.
5. A task with fewer teachers than another has just its own: the release pads every task's teacher
   slots to the same count with zero means, which pulls the student toward a zero mean there.

Run:
    torchrun --standalone --nproc_per_node=2 opd.py --teachers ckpts/*    # CPU, embedded teachers
    python opd.py --teachers ckpts/* --noise_level 0.7 --estimator ppo --out runs/opd-ppo
    torchrun --nproc_per_node=8 opd.py --teachers ckpts/geneval ckpts/ocr ckpts/aesthetic \\
        --teacher_cfg geneval=1.0                      # SD3.5-M, the paper's recipe (512 px, bf16)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import opd_inputs
from evaluate import evaluate_student
from model import FlowModel, TextEmbeds
from sample import gaussian_kl, gaussian_logprob, rollout, trained_steps, transition_mean
from student import (Phases, StudentConfig, StudentTrainer, load_base, no_phase, peak_memory, step_seed,
                     update_or_stop)
from teachers import by_task, fetch_teacher, load_teachers
from plumbing.config import option, parse_config
from plumbing.dist import Dist
from plumbing.stops import fail, one_line_stops



@dataclass
class OPDConfig(StudentConfig):
    """DiffusionOPD: distil several task teachers into one student on its own rollouts.
    Fields shared with the Stage-1 scripts (LoRA, AdamW, EMA, evaluation, checkpoints) are in
    student.StudentConfig."""
    teachers: list[str] = field(default_factory=lambda: sorted(map(str, Path("ckpts").glob("*"))))
    teacher_task: list[str] = option(factory=list, help="i-th entry names teacher i's task")
    teacher_dataset: list[str] = option(factory=list, help="task=DIR overrides")
    teacher_cfg: list[str] = option(factory=list, help="task=W guidance overrides")
    teacher_reward: list[str] = option(factory=list, help="task=SPEC (evaluation) overrides")
    model: str = option("", "base; default: the base the teachers name")
    init_lora: str = option("", "start the student from this LoRA (the release's train.lora_path): a PEFT folder, a "
                                "teacher's run folder or owner/repo[/subfolder]")
    out: str = "runs/opd"
    seed: int = 0
    steps: int = option(60, "rounds of Algorithm 1, one optimizer step each (the release trains until stopped; the "
                            "paper's 11.3 h on 8 GPUs: ~3,440, docs/sd35.md)")
    prompts_per_batch: int = option(24, "a task's prompts per round, all ranks (paper: 3 x 8 GPUs)")
    num_steps: int = option(10, "sampling steps N")
    noise_level: float = option(0.0, "a: 0 = ODE (default), > 0 = SDE")
    guidance: float = option(4.5, "student CFG (rollout and training)")
    cfg_detach_uncond: bool = option(False, "release: both CFG branches get gradient; true (ablation): v = sg(v_u) "
                                            "+ w (v_c - sg(v_u)), Flow-GRPO before 2025-08")
    timestep_fraction: float = option(0.99, "train steps 0 .. int(fraction N) - 1 (paper: 0..8 of 10)")
    train_steps: list[int] = option(factory=list, help="steps j to train; overrides the fraction")
    estimator: str = option("closed_form", 'or "ppo" (Eqs. 16-23; needs noise_level > 0)')
    teacher_chunk: int = option(0, "rows per teacher forward; 0 = all trained steps at once")
    train_chunk: int = option(0, "rows per student forward+backward; 0 = all at once")
    offload_rewards: bool = option(False, "reward models on the host, used only to evaluate (memory plan)")
    teacher_dtype: str = option("float32", "frozen teacher LoRAs: float32, or \"model\" (the backbone's)")
    compile: bool = option(False, "torch.compile the transformer blocks")


# ---------------------------------------------------------------------- the two estimators
def closed_form_loss(mean_s, mean_t, sbar, ode: bool):
    """Per-row loss (R,) of Eqs. 10-12, summed over dims; mean_t is a constant target.

    ODE: 1/2 ||mu_S - mu_T||^2;  SDE: ||mu_S - mu_T||^2 / (2 sbar^2), sbar (R,) Eq. 10's exact std.
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
    return torch.exp(logp - logp.detach()) * kl


# ---------------------------------------------------------------------- teacher targets
def teacher_means(teacher, model: FlowModel, prompts, embeds: TextEmbeds, x, t, t_next,
                  noise_level: float, t_guard: float, chunk: int):
    """mu_T(x_j) at the student's states: rows (x_j, t_j) of all trained steps batched together,
    `chunk` rows per forward (0: all). A full-checkpoint teacher encodes the prompts itself."""
    net = teacher.model or model
    emb = net.encode_prompts(prompts) if teacher.model is not None else embeds
    out, chunk = [], chunk or x.shape[0]
    with torch.no_grad(), net.adapter(teacher.adapter):
        for lo in range(0, x.shape[0], chunk):
            sl = slice(lo, lo + chunk)
            v = net.velocity(x[sl], t[sl], emb[sl], teacher.task.guidance)
            out.append(transition_mean(x[sl], v, t[sl], t_next[sl], noise_level, t_guard))
    return torch.cat(out)


# ---------------------------------------------------------------------- one task batch
def batch_gradient(cfg: OPDConfig, model: FlowModel, teachers, prompts, seeds, trained: list[int],
                   scale: float, phase=no_phase):
    """One task batch of Algorithm 1: roll out the student, get its supervisors' targets at its states, and
    add to .grad the gradient of `scale` x the batch's loss at the release's scale (module docstring), the
    loss the weighted sum over `teachers` [(weight, teacher)] (`supervisors`: the task's one or several
    teachers, weight 1). Returns the true loss per sample, summed over the trained sampling steps `trained`
    and the weighted teachers (B,)."""
    with phase("rollout"):
        embeds = model.encode_prompts(prompts)
        traj = rollout(model, embeds, seeds, cfg.num_steps, cfg.guidance, cfg.noise_level,
                       cfg.height or None, cfg.width or None, adapter="student", decode=False)
    with phase("teacher"):
        B, K, js = len(seeds), len(trained), torch.tensor(trained)
        # rows ordered (step k, sample b): x (K*B, C, h, w), the student's own states
        x = traj.latents[:, js].transpose(0, 1).flatten(0, 1).to(model.device)
        x_next = traj.latents[:, js + 1].transpose(0, 1).flatten(0, 1).to(model.device)
        t = traj.t[js].repeat_interleave(B).to(model.device)
        t_next = traj.t[js + 1].repeat_interleave(B).to(model.device)
        sbar = traj.sbar[js].repeat_interleave(B).to(model.device)
        rows_embeds = TextEmbeds(embeds.seq.repeat(K, 1, 1), embeds.pooled.repeat(K, 1))
        # Eq. 5's s_j divides by 1 - t_j, 0 at t_0 = 1: there the sampler uses 1 - t_1 (its t_guard)
        t_guard = traj.t[1].item()
        means_t = [(w, teacher_means(teacher, model, list(prompts) * K, rows_embeds, x, t, t_next, cfg.noise_level,
                                     t_guard, cfg.teacher_chunk)) for w, teacher in teachers]
    with phase("train"):
        d, chunk, per_row = x[0].numel(), cfg.train_chunk or x.shape[0], []
        for lo in range(0, x.shape[0], chunk):
            sl = slice(lo, lo + chunk)
            v = model.velocity(x[sl], t[sl], rows_embeds[sl], cfg.guidance, cfg.cfg_detach_uncond)
            mean_s = transition_mean(x[sl], v, t[sl], t_next[sl], cfg.noise_level, t_guard)
            # the release's teacher axis: the per-step loss summed over the batch's (weighted) teachers
            if cfg.estimator == "ppo":
                loss = sum(w * ppo_style_loss(mean_s, mean_t[sl], sbar[sl], x_next[sl]) for w, mean_t in means_t)
            else:
                loss = sum(w * closed_form_loss(mean_s, mean_t[sl], sbar[sl], cfg.noise_level == 0)
                           for w, mean_t in means_t)
            # the release's scale: the mean over dims d, trained steps K and samples B
            ((loss / d).sum() * scale / (K * B)).backward()
            per_row.append(loss.detach())
    return torch.cat(per_row).view(K, B).sum(0)


# ---------------------------------------------------------------------- one round: Algorithm 1
def supervisors(routes, m: int) -> list[tuple[float, object]]:
    """Who supervises task batch m, with which weight: Algorithm 1's routing, task m's own teachers
    (routes[m], teachers.by_task), each with weight 1 (a task's several teachers are summed, as the release
    sums its teacher axis). The routing's one fork point: soft routing, every batch supervised by a
    weighted mix of all teachers, returns e.g. [(w[m][k], t) for k, route in enumerate(routes) for t in route]
    (README, "Fork it")."""
    return [(1.0, teacher) for teacher in routes[m]]


@dataclass
class Batch:
    """One task batch of a round: its task, its weighted teachers (`supervisors`), this rank's prompts of
    it and their seeds (one per global sample: regenerable)."""
    task: object
    teachers: list[tuple[float, object]]
    prompts: list[str]
    seeds: list[int]


def round_batches(cfg: OPDConfig, routes, step: int, dist: Dist, prompts_by_task):
    """Batch m of round `step` belongs to task m (routes[m]: its teachers, teachers.by_task): its prompts are
    this rank's share of a draw from that task's prompt set, its supervision `supervisors(routes, m)`."""
    mine = dist.split(cfg.prompts_per_batch, "prompts_per_batch", "--prompts_per_batch")
    for m, teachers in enumerate(routes):
        task = teachers[0].task
        prompts = prompts_by_task[task.name]
        n = cfg.prompts_per_batch  # drawn by its own generator of (seed, round, task)
        idx = np.random.default_rng([cfg.seed, step, m]).choice(len(prompts), n, replace=len(prompts) < n)[mine]
        first = m * n  # global index of the batch's first sample
        yield Batch(task, supervisors(routes, m), [prompts[i] for i in idx],
                    [step_seed(cfg.seed, step, first + i) for i in range(mine.start, mine.stop)])


def opd_round(cfg: OPDConfig, model, routes, trainer, step: int, dist: Dist, prompts_by_task,
              phase, gradient=batch_gradient) -> dict:
    """Algorithm 1, one round: for each task m in turn, the student's rollouts of its prompts and
    the gradient of their loss against task m's teachers only, accumulated; then ONE optimizer step,
    so every rollout of the round came from the current weights. `gradient` may stand in for
    batch_gradient (the study's SFT baseline). Returns the round's metrics."""
    metrics, losses, trained = {"step": step}, [], trained_steps(cfg)
    for batch in round_batches(cfg, routes, step, dist, prompts_by_task):
        # the round's loss is the mean over its M task batches: each enters with 1 / M
        loss = gradient(cfg, model, batch.teachers, batch.prompts, batch.seeds, trained, 1.0 / len(routes), phase)
        losses.append(loss)
        metrics[f"loss/{batch.task.name}"] = dist.all_gather(loss.to(dist.device)).mean().item()
    with phase("optimizer"):
        metrics["grad_norm"], skipped = update_or_stop(trainer, step, losses, metrics)
    metrics["skipped_nonfinite"] = int(skipped)
    metrics["loss"] = float(np.mean([metrics[f"loss/{r[0].task.name}"] for r in routes]))
    return metrics


# ---------------------------------------------------------------------- main
def train(cfg: OPDConfig, argv=None, gradient=batch_gradient, after_round=None, script="opd.py"):
    """The run: load, then rounds of Algorithm 1 with evaluation and checkpoints. `gradient` and
    `after_round(step, last, metrics, model, teachers, trainer, dist)` (adds metrics) are the
    study's hooks (study/instruments.py). With --dry_run: the resolved config printed, nothing loaded
    or written."""
    inputs = opd_inputs.start(cfg, argv, script)  # the ranks and every input, before any model loads
    if inputs is None:  # --dry_run
        return
    dist, specs, prompts_by_task, run = inputs.dist, inputs.specs, inputs.prompts_by_task, inputs.run
    try:
        model = load_base(cfg, dist)  # --dtype, the memory plan's placement
        # the student before the teachers: full fine-tuning moves base and teachers to a frozen copy; its
        # EMA is called once per task batch, as the release calls it (student.EMA)
        n_tasks = len({s["task"].name for s in specs})
        trainer = StudentTrainer(model, cfg, dist, run, ema_calls=n_tasks,
                                 init_lora=fetch_teacher(cfg.init_lora) if cfg.init_lora else "")
        lora_dtype = model.dtype if cfg.teacher_dtype == "model" else torch.float32
        teachers = load_teachers(model, specs, dist, lora_dtype)
        routes = by_task(teachers)
    except (ValueError, FileNotFoundError) as e:
        fail(e)
    if cfg.compile:
        model.compile_blocks()
    start = trainer.begin()  # the run directory is written only now, after every model has loaded
    tasks = [r[0].task for r in routes]
    saved = {"tasks": [t.name for t in tasks], "teachers": cfg.teachers, "guidance": cfg.guidance}
    bar = tqdm(range(start, cfg.steps), desc="opd", disable=not dist.is_main, initial=start,
               total=cfg.steps)
    for step in bar:
        phase, last, images = Phases(dist.device), step + 1 == cfg.steps, {}
        # ---- rollout -> teacher targets -> loss -> one update: a round of Algorithm 1
        metrics = opd_round(cfg, model, routes, trainer, step, dist, prompts_by_task, phase, gradient)
        metrics.update({f"sec/{k}": v for k, v in phase.sec.items()})
        metrics["images"] = (step + 1) * cfg.prompts_per_batch * len(routes)  # student rollouts so far
        # ---- evaluate the EMA student on every task with the 40-step ODE
        if (step + 1) % cfg.eval_every == 0 or last:
            evaluated, images = evaluate_student(trainer, tasks, inputs.rewards, dist, cfg, step,
                                                 cfg.guidance, per_task_keys=True)
            metrics.update(evaluated)
        metrics.update(peak_memory(dist.device))
        if after_round is not None:
            after_round(step, last, metrics, model, teachers, trainer, dist)
        # ---- log, checkpoint
        run.log(metrics, images)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        if (step + 1) % cfg.save_every == 0 or last:
            trainer.save(step + 1, saved)
        trainer.stop_if_terminated(step, saved)  # SIGTERM: this step saved, then one line and exit 143
    trainer.finish()
    dist.close()


@one_line_stops
def main(argv=None):
    train(parse_config(OPDConfig, argv), argv)


if __name__ == "__main__":
    main()
