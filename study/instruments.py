"""The study's instruments around DiffusionOPD (paper sections 5 and 9): what the paper compares OPD
against, and what it measures, built on opd.py's functions and loop (nothing of its algorithm copied).

- The SFT baseline (`--baseline sft`; the paper's "SFT on teacher images"): off-policy distillation.
  The teacher samples x0 with its own ODE and guidance from each batch's seeds, and the student's
  conditional velocity is fitted by flow matching at the grid times OPD trains, with fresh noise per
  (sample, step):  x_t = (1 - t) x0 + t eps,  L = ||v_S(x_t, t) - (eps - x0)||^2.  Same prompts,
  seeds, rounds, optimizer and loss scale (mean over dims, steps, samples) as OPD (`sft_gradient`).
  It fits the conditional branch only; `--sft_caption_dropout p` fits a share p of the samples with
  the empty prompt instead (the unconditional branch, which CFG extrapolates from, learns the
  teachers' samples too), the control of the deployed-sampler explanation (docs/toy-world.md, G4).
- The held-out distance to the teachers (`--distance_prompts P`, every `--distance_every` rounds and
  at evaluations): a low-noise progress measure for Fig. 6, of the trained weights (not the EMA,
  which moves only every --ema_every rounds). The student's ODE rollouts of the first P
  test prompts (prompt i seeded i) and at every state the release-scale mean-matching loss
  mean_dims 1/2 (mu_S - mu_T)^2 of the ODE step, averaged over steps, prompts and ranks
  (`distance_to_teacher`), logged as eval/<task>/distance.
- The gradient variance of both estimators (`--variance_rollouts R`): the per-coordinate variance,
  summed, of the closed-form and the PPO-style gradients over the same R rollouts at fixed weights
  (the paper reports none; section 5), printed with their ratio; no training, nothing written.

Departures: none from the paper's definitions; the distance and the variance are this project's
measurements (the paper shows reward curves only).

Run (CPU, the embedded teachers):
    python -m study.instruments --teachers ckpts/* --baseline sft --out runs/sft
    python -m study.instruments --teachers ckpts/* --distance_prompts 12 --distance_every 2 --out runs/opd-d
    python -m study.instruments --teachers ckpts/* --noise_level 0.7 --variance_rollouts 8
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import opd
import opd_inputs
from data import load_prompts
from model import FlowModel, TextEmbeds
from sample import rollout, time_grid, trained_steps
from student import StudentTrainer, load_base, no_phase
from teachers import by_task, load_teachers
from plumbing.config import option, parse_config
from plumbing.dist import Dist, print_main
from plumbing.stops import fail, one_line_stops

# prime offsets of a sample's seed: the SFT noise and the variance rollouts draw from other streams than
# the rollouts of training (whose seeds are student.step_seed(seed, round, index) for rounds < 10**6)
SFT_NOISE_STREAM = 104729
SFT_DROPOUT_STREAM = 130363
VARIANCE_ROUNDS = 10**6


@dataclass
class InstrumentsConfig(opd.OPDConfig):
    """DiffusionOPD with the study's instruments: the SFT baseline, the held-out distance, the
    gradient variance (module docstring). Every other field is opd.py's."""
    baseline: str = option("", "\"sft\": the off-policy baseline instead of OPD's gradient")
    sft_caption_dropout: float = option(0.0, "SFT: share of samples fitted with the empty prompt (trains the "
                                             "unconditional branch too, as pretraining's 0.1 did)")
    distance_prompts: int = option(16, "test prompts per task of the held-out distance (0: none)")
    distance_every: int = option(0, "also log the distance every this many rounds (0: with evaluations)")
    variance_rollouts: int = option(0, "> 0: measure both estimators' gradient variance, then exit")


def sft_gradient(cfg, model: FlowModel, teachers, prompts, seeds, trained: list[int], scale: float,
                 phase=no_phase):
    """opd.batch_gradient's stand-in for the SFT baseline (module docstring), for a batch supervised by one
    teacher (`teachers`: [(weight, teacher)], opd.supervisors; the weight scales the loss). Returns the loss
    per sample summed over the trained steps (B,)."""
    if len(teachers) != 1:
        raise ValueError(f"the SFT baseline fits one teacher's samples per batch; this batch has {len(teachers)} "
                         "supervising teachers")
    (weight, teacher), = teachers
    net = teacher.model or model
    with phase("teacher"):
        emb_t = net.encode_prompts(prompts)
        x0 = rollout(net, emb_t, seeds, cfg.num_steps, teacher.task.guidance, 0.0, cfg.height or None,
                     cfg.width or None, adapter=teacher.adapter, decode=False).latents[:, -1].to(model.device)
    with phase("train"):
        embeds = model.encode_prompts(prompts)
        if cfg.sft_caption_dropout > 0:  # caption dropout: sample i fits the empty prompt, a draw of its seed
            drop = torch.tensor([torch.rand((), generator=torch.Generator().manual_seed(int(s) + SFT_DROPOUT_STREAM))
                                 .item() < cfg.sft_caption_dropout for s in seeds], device=model.device)
            if drop.any():
                empty = model.encode_prompts([""] * len(prompts))
                embeds = TextEmbeds(torch.where(drop.view(-1, 1, 1), empty.seq, embeds.seq),
                                    torch.where(drop.view(-1, 1), empty.pooled, embeds.pooled))
        grid = time_grid(model.pipe.scheduler, cfg.num_steps)
        B, K, d = len(seeds), len(trained), x0[0].numel()
        eps = torch.stack([torch.randn((K, *x0.shape[1:]),
                                       generator=torch.Generator().manual_seed(int(s) + SFT_NOISE_STREAM))
                           for s in seeds]).to(model.device)     # (B, K, C, h, w)
        per_step = []
        for k, j in enumerate(trained):
            t = grid[j].to(model.device).expand(B)
            tt = t.view(-1, 1, 1, 1)
            # x_t = (1 - t) x0 + t eps;  target v = eps - x0
            x_t = (1 - tt) * x0 + tt * eps[:, k]
            v = model.velocity(x_t, t, embeds, 1.0)
            loss = weight * (v - (eps[:, k] - x0)).square().flatten(1).sum(1)
            # OPD's scale: the mean over dims, trained steps and samples
            ((loss / d).sum() * scale / (K * B)).backward()
            per_step.append(loss.detach())
    return torch.stack(per_step).sum(0)


@torch.no_grad()
def distance_to_teacher(cfg, model: FlowModel, teacher, dist: Dist) -> float:
    """The held-out distance of the student (its current weights) to `teacher` on its task's first
    cfg.distance_prompts test prompts (module docstring). For the ODE mu_S(x_j) is the rollout's x_{j+1}."""
    prompts = load_prompts(teacher.task.dataset, "test")[0]
    n = min(cfg.distance_prompts, len(prompts)) // dist.world * dist.world
    mine = list(range(*dist.split(n, "distance prompts").indices(n)))
    embeds = model.encode_prompts([prompts[i] for i in mine])
    traj = rollout(model, embeds, mine, cfg.num_steps, cfg.guidance, 0.0, cfg.height or None, cfg.width or None,
                   adapter="student", decode=False)
    N, B = cfg.num_steps, len(mine)
    x = traj.latents[:, :N].transpose(0, 1).flatten(0, 1)            # (N*B, C, h, w), rows (step, prompt)
    t, t_next = traj.t[:N].repeat_interleave(B), traj.t[1:].repeat_interleave(B)
    rows_embeds = TextEmbeds(embeds.seq.repeat(N, 1, 1), embeds.pooled.repeat(N, 1))
    mean_t = opd.teacher_means(teacher, model, [prompts[i] for i in mine] * N, rows_embeds, x.to(model.device),
                               t.to(model.device), t_next.to(model.device), 0.0, traj.t[1].item(), cfg.teacher_chunk)
    mean_s = traj.latents[:, 1:].transpose(0, 1).flatten(0, 1).to(model.device)
    local = 0.5 * (mean_s - mean_t).square().flatten(1).mean(1)       # (N*B,)
    return (dist.sum(local.sum().reshape(1)) / (N * n)).item()


def log_distances(cfg):
    """opd.train's after_round hook: the held-out distance to every teacher every cfg.distance_every
    rounds (0: at the evaluations) and at the last round, under the trained weights: the EMA moves
    only every ema_every optimizer steps (the paper's 8), so a 16-round curve under it would have two
    steps, whatever the estimator."""
    def after_round(step, last, metrics, model, teachers, trainer, dist):
        every = cfg.distance_every or cfg.eval_every
        if not cfg.distance_prompts or not ((step + 1) % every == 0 or last):
            return
        t0 = time.perf_counter()
        for teachers_of_task in by_task(teachers):
            for k, teacher in enumerate(teachers_of_task):  # a task's second teacher and on: /1, /2...
                key = f"eval/{teacher.task.name}/distance" + (f"/{k}" if k else "")
                metrics[key] = distance_to_teacher(cfg, model, teacher, dist)
        metrics["sec/eval"] = metrics.get("sec/eval", 0.0) + time.perf_counter() - t0
    return after_round


def gradient_variance(cfg, argv=None) -> dict:
    """Per-coordinate gradient variance (summed) of the closed-form and PPO-style estimators over
    cfg.variance_rollouts rollouts at the student's initial weights, the same rollouts for both, and
    their ratio (module docstring). Loads what opd.train loads; trains and writes nothing."""
    try:
        dist = Dist(cfg.device)
    except ValueError as e:
        fail(e)
    with tempfile.TemporaryDirectory() as scratch:  # check_inputs checks a run folder; none is written
        out, cfg.out = cfg.out, f"{scratch}/run"
        inputs = opd_inputs.check_inputs(cfg, dist, argv, "study/instruments.py")
        cfg.out = out
    model = load_base(cfg, dist)
    trainer = StudentTrainer(model, cfg, dist, None)
    routes = by_task(load_teachers(model, inputs.specs, dist))
    grads, steps = {"closed_form": [], "ppo": []}, trained_steps(cfg)
    for r in tqdm(range(cfg.variance_rollouts), desc="variance", disable=not dist.is_main):
        for est in grads:
            one = dataclasses.replace(cfg, estimator=est)
            batches = opd.round_batches(one, routes, VARIANCE_ROUNDS + r, dist, inputs.prompts_by_task)
            for b in batches:
                opd.batch_gradient(one, model, b.teachers, b.prompts, b.seeds, steps, 1.0 / len(routes))
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
    print_main(dist, json.dumps(out, indent=2), f"gradient variance ratio ppo / closed_form = {out['ratio']:.1f} "
               f"over {cfg.variance_rollouts} rollouts (a = {cfg.noise_level})")
    dist.close()
    return out


@one_line_stops
def main(argv=None):
    cfg = parse_config(InstrumentsConfig, argv)
    checks = [(cfg.baseline in ("", "sft"), f"--baseline must be sft or empty, got {cfg.baseline!r}"),
              (cfg.distance_prompts >= 0 and cfg.distance_every >= 0, "--distance_prompts/--distance_every must be >= 0"),
              (0 <= cfg.sft_caption_dropout < 1, f"--sft_caption_dropout must be in [0, 1), got {cfg.sft_caption_dropout}"),
              (cfg.baseline == "sft" or not cfg.sft_caption_dropout, "--sft_caption_dropout needs --baseline sft"),
              (cfg.variance_rollouts >= 0, "--variance_rollouts must be >= 0"),
              (not (cfg.variance_rollouts and cfg.noise_level <= 0),
               "the PPO-style estimator needs a log-density: use --noise_level > 0 (e.g. 0.7) with --variance_rollouts")]
    world = int(os.environ.get("WORLD_SIZE", 1))
    checks.append((cfg.distance_prompts == 0 or cfg.distance_prompts >= world,
                   f"--distance_prompts {cfg.distance_prompts} gives some of the {world} ranks no prompt: "
                   f"use 0 or >= {world}"))
    bad = [message for ok, message in checks if not ok]
    if bad:
        fail(ValueError(bad[0]))
    if cfg.variance_rollouts:
        return gradient_variance(cfg, argv)
    opd.train(cfg, argv, sft_gradient if cfg.baseline == "sft" else opd.batch_gradient, log_distances(cfg),
              script="study/instruments.py")


if __name__ == "__main__":
    main()
