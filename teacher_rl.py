"""Stage 1: train a teacher with Flow-GRPO (paper sections 3, 4 and 8).

Per step: the student LoRA samples G images per prompt with the SDE sampler (noise level a), the
rewards are gathered over all ranks, advantages are normalised within each prompt's group, and the
policy is updated with PPO-clip on the per-step Gaussian log-density ratio, optionally with the
closed-form KL to the base model (adapters disabled). With several weighted rewards the same script
trains the joint multi-task baseline; `--init_lora` chains runs into the cascade baseline.

Notation (paper -> code)
    G                   group_size          images per prompt
    r_i, A_i            rewards, adv        A_i = (r_i - mean_group) / (std + 1e-4), clipped to +-adv_clip
    log pi(x_{j+1}|x_j) logp                per-step Gaussian log-density, see `ratio_logp`
    rho_j               ratio               exp(logp_new - logp_old)
    eps                 clip_range          PPO clip range (~1e-4)
    beta                kl_beta             weight of KL(p_theta || p_ref) per latent dim

Loss of one sample at one trained step j (minimised; averaged over samples and steps):
    L = max(-A rho_j, -A clip(rho_j, 1 - eps, 1 + eps)) + beta KL_j / d
    KL_j = ||mu_theta(x_j) - mu_ref(x_j)||^2 / (2 sbar_j^2)          (Eqs. 10-11, exact sbar_j^2)

Departures from Flow-GRPO
1. `ratio_logp = "mean_per_dim"` (default) builds the PPO ratio from the per-dim mean log-density,
   exactly as Flow-GRPO does, so its tuned clip range (1e-4) keeps its meaning; "sum" uses the true
   log-density. The name says which one is in use; both are logged.
2. The KL to the reference uses the exact transition variance sbar_j^2 = s_j^2 (-Delta_j); Flow-GRPO
   divides by s_j^2. It is divided by the number of latent dims d, so beta keeps Flow-GRPO's scale.
3. Every rollout of a step is made by the current weights and each step takes one optimizer step,
   so the ratio is exactly 1 on the first pass (`ratio_dev` logs max |rho - 1|, a sanity metric);
   `updates_per_rollout` > 1 splits the batch into several optimizer steps (then rho != 1).
4. Groups whose rewards are all equal get zero advantage and contribute nothing; their fraction is
   logged (`zero_std_groups`) rather than padded away.

Run:
    python teacher_rl.py --task geneval --lr 1e-3 --steps 90 --out runs/teacher-geneval  # CPU, toy world
    make teachers        # the three shipped toy teachers, their flags and times: README, Results
    torchrun --standalone --nproc_per_node=2 teacher_rl.py --task ocr --out runs/ocr
    torchrun --nproc_per_node=8 teacher_rl.py --model stabilityai/stable-diffusion-3.5-medium \\
        --task ocr --dataset dataset/ocr --reward ocr=1 --height 512 --width 512 --out runs/ocr
    python teacher_rl.py --task geneval --reward toy_geneval=1,toy_ocr=1,toy_aesthetic=1 ...  # joint
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from data import load_prompts, load_task
from evaluate import EVAL_GUIDANCE, evaluate_task
from harness import Dist, StudentConfig, StudentTrainer, parse_config, step_seed
from model import FlowModel, default_model_path
from rewards import make_reward
from sample import gaussian_kl, gaussian_logprob, rollout, sde_step


@dataclass
class TeacherConfig(StudentConfig):
    """Flow-GRPO teacher training (one task, or several weighted rewards for the joint baseline).
    Fields shared with opd.py (LoRA, AdamW, EMA, evaluation, checkpoints) are in harness.StudentConfig."""
    model: str = default_model_path()   # base pipeline folder or hub id
    task: str = "geneval"               # task name; dataset defaults to data/toy/<task>
    dataset: str = ""                   # Flow-GRPO prompt folder (train.txt, test.txt, metadata)
    reward: str = ""                    # "name=w,name=w"; default: the dataset's task.json
    out: str = ""                       # run directory; default runs/teacher-<task>
    init_lora: str = ""                 # start from this adapter (cascade baseline)
    seed: int = 0
    steps: int = 60                     # optimizer steps
    batch: int = 32                     # images per step over all ranks = prompts x group_size
    group_size: int = 8                 # G images per prompt
    rollout_batch: int = 32             # images per forward pass during rollouts (per rank)
    train_batch: int = 32               # images per forward/backward during training (per rank)
    num_steps: int = 10                 # sampling steps N
    noise_level: float = 0.7            # a in Eq. 5
    guidance: float = 4.5               # CFG during rollouts and training
    timestep_fraction: float = 0.6      # train the first round(fraction * N) steps
    per_group_std: bool = True          # False: divide by the std over the whole batch
    adv_clip: float = 5.0
    clip_range: float = 1e-4
    ratio_logp: str = "mean_per_dim"    # or "sum" (see departure 1)
    kl_beta: float = 0.0                # KL to the base model, per latent dim
    updates_per_rollout: int = 1
    eval_every: int = 20
    save_every: int = 20


def group_advantages(rewards: torch.Tensor, group_size: int, per_group_std: bool, clip: float):
    """A = (r - mean_group) / (std + 1e-4), std per group or over the batch; rewards (P*G,) grouped
    contiguously. Returns (A (P*G,), fraction of groups whose rewards are all equal)."""
    r = rewards.view(-1, group_size).double()
    mean = r.mean(1, keepdim=True)
    std = r.std(1, keepdim=True, unbiased=False) if per_group_std else r.std(unbiased=False).expand_as(mean)
    adv = ((r - mean) / (std + 1e-4)).clamp(-clip, clip)
    zero = (r.max(1).values == r.min(1).values).float().mean().item()
    return adv.flatten().float(), zero


def ppo_clip_loss(logp_new, logp_old, adv, clip_range):
    """Per-sample max(-A rho, -A clip(rho, 1-eps, 1+eps)) with rho = exp(logp_new - logp_old)."""
    ratio = torch.exp(logp_new - logp_old)
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range)), ratio


def validate(cfg: TeacherConfig, dist: Dist):
    """Every bad input fails here with a one-line error, before any rollout."""
    try:
        return _validate(cfg, dist)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise SystemExit(f"error: {e}") from None


def _validate(cfg: TeacherConfig, dist: Dist):
    task = load_task(cfg.task, cfg.dataset, cfg.reward, cfg.guidance)
    load_prompts(task.dataset, "train"), load_prompts(task.dataset, "test")
    reward_fn = make_reward(task.reward, device=dist.device)
    if cfg.batch % cfg.group_size:
        raise ValueError(f"group_size {cfg.group_size} does not divide the global batch {cfg.batch}")
    dist.split(cfg.batch, "batch")
    per_rank = cfg.batch // dist.world
    if per_rank % cfg.updates_per_rollout:
        raise ValueError(f"{per_rank} samples per rank do not split into {cfg.updates_per_rollout} updates")
    if cfg.ratio_logp not in ("mean_per_dim", "sum"):
        raise ValueError(f"ratio_logp must be 'mean_per_dim' or 'sum', got {cfg.ratio_logp!r}")
    if cfg.noise_level <= 0:
        raise ValueError("GRPO needs a stochastic sampler: noise_level must be > 0")
    return task, reward_fn


def main(argv=None):
    cfg = parse_config(TeacherConfig, argv)
    cfg.out = cfg.out or f"runs/teacher-{cfg.task}"
    dist = Dist(cfg.device)
    task, reward_fn = validate(cfg, dist)
    try:
        model = FlowModel.load(cfg.model, device=dist.device)
        trainer = StudentTrainer(model, cfg, dist)  # LoRA/full FT, --init_lora, AdamW, EMA, run dir, resume
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    run = trainer.run
    train_prompts, train_metas = load_prompts(task.dataset, "train")
    mine = dist.split(cfg.batch, "batch")
    n_prompts = cfg.batch // cfg.group_size
    n_train = max(1, round(cfg.timestep_fraction * cfg.num_steps))
    saved = {"task": task.name, "dataset": task.dataset, "reward": task.reward, "guidance": task.guidance,
             "eval_key": task.eval_key}

    bar = tqdm(range(trainer.start, cfg.steps), desc=f"grpo {task.name}", disable=not dist.is_main,
               initial=trainer.start, total=cfg.steps)
    for step in bar:
        timer = {}
        # ---- rollout: P prompts x G images; sample i of the step uses seed step_seed(seed, step, i)
        t0 = time.perf_counter()
        rng = np.random.default_rng([cfg.seed, step])
        chosen = rng.choice(len(train_prompts), n_prompts, replace=len(train_prompts) < n_prompts)
        idx = np.repeat(chosen, cfg.group_size)[mine]  # groups are contiguous; they may span ranks
        prompts, metas = [train_prompts[i] for i in idx], [train_metas[i] for i in idx]
        seeds = [step_seed(cfg.seed, step, i) for i in range(mine.start, mine.stop)]
        embeds = model.encode_prompts(prompts)
        trajs = [rollout(model, embeds[b:b + cfg.rollout_batch], seeds[b:b + cfg.rollout_batch], cfg.num_steps,
                         cfg.guidance, cfg.noise_level, cfg.height or None, cfg.width or None, adapter="student")
                 for b in range(0, len(seeds), cfg.rollout_batch)]
        latents = torch.cat([t.latents for t in trajs])  # (B, N+1, C, h, w)
        logp_old = torch.cat([t.logp_sum for t in trajs])  # (B, N) summed over dims
        images = torch.cat([t.images for t in trajs])
        grid_t, std = trajs[0].t, trajs[0].std
        timer["rollout"] = time.perf_counter() - t0

        # ---- reward, gathered over ranks; advantages within each group
        t0 = time.perf_counter()
        scores, info = reward_fn(images, prompts, metas)
        all_scores = dist.all_gather(scores.to(dist.device)).cpu()
        adv_all, zero_std = group_advantages(all_scores, cfg.group_size, cfg.per_group_std, cfg.adv_clip)
        adv = adv_all[mine]
        timer["reward"] = time.perf_counter() - t0

        # ---- loss: PPO-clip on each trained step j, recomputing the mean with gradient
        t0 = time.perf_counter()
        d = latents[0, 0].numel()
        per_update = len(seeds) // cfg.updates_per_rollout
        stats = {"ratio_dev": 0.0, "clipfrac": 0.0, "kl": 0.0, "policy_loss": 0.0}
        for u in range(cfg.updates_per_rollout):
            rows = range(u * per_update, (u + 1) * per_update)
            for b in range(rows.start, rows.stop, cfg.train_batch):
                sl = slice(b, min(b + cfg.train_batch, rows.stop))
                for j in range(n_train):
                    x, x_next = latents[sl, j].to(model.device), latents[sl, j + 1].to(model.device)
                    v = model.velocity(x, grid_t[j], embeds[sl], cfg.guidance)
                    _, mean, sbar = sde_step(x, v, grid_t[j].item(), grid_t[j + 1].item(), cfg.noise_level,
                                             grid_t[1].item(), torch.zeros_like(x))
                    logp_sum, logp_mean = gaussian_logprob(x_next, mean, sbar)
                    if cfg.ratio_logp == "sum":
                        new, old = logp_sum, logp_old[sl, j].to(model.device)
                    else:
                        new, old = logp_mean, logp_old[sl, j].to(model.device) / d
                    loss, ratio = ppo_clip_loss(new, old, adv[sl].to(model.device), cfg.clip_range)
                    if cfg.kl_beta > 0:
                        with torch.no_grad(), model.adapter(None):
                            v_ref = model.velocity(x, grid_t[j], embeds[sl], cfg.guidance)
                            mean_ref = sde_step(x, v_ref, grid_t[j].item(), grid_t[j + 1].item(),
                                                cfg.noise_level, grid_t[1].item(), torch.zeros_like(x))[1]
                        kl = gaussian_kl(mean, mean_ref, sbar**2)  # (b,), true KL summed over dims
                        loss = loss + cfg.kl_beta * kl / d
                        stats["kl"] += kl.sum().item() / (len(seeds) * n_train)
                    (loss.sum() / (per_update * n_train)).backward()
                    stats["policy_loss"] += loss.sum().item() / (len(seeds) * n_train)
                    stats["clipfrac"] += ((ratio - 1).abs() > cfg.clip_range).float().sum().item() / (len(seeds) * n_train)
                    if u == 0:
                        stats["ratio_dev"] = max(stats["ratio_dev"], (ratio - 1).abs().max().item())
            grad_norm = trainer.update(step)
        timer["train"] = time.perf_counter() - t0

        # ---- log, evaluate the EMA weights with the ODE, checkpoint
        metrics = {"step": step, "reward_mean": all_scores.mean().item(), "reward_std": all_scores.std().item(),
                   "zero_std_groups": zero_std, "grad_norm": grad_norm, **trainer.mean_over_ranks(stats),
                   **{f"reward/{k}": dist.all_gather(v.to(dist.device)).mean().item() for k, v in info.items()},
                   **{f"sec/{k}": v for k, v in timer.items()}}
        last = step + 1 == cfg.steps
        if (step + 1) % cfg.eval_every == 0 or last:
            t0 = time.perf_counter()
            with trainer.ema_weights():
                res = evaluate_task(model, task, reward_fn, dist, "student", cfg.eval_prompts, cfg.eval_steps,
                                    EVAL_GUIDANCE, grid_path=f"{run.path}/samples/step{step + 1:05d}.png")
            metrics.update({f"eval/{k}": v for k, v in res.items()}, **{"sec/eval": time.perf_counter() - t0})
        run.log(metrics)
        bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}")
        if (step + 1) % cfg.save_every == 0 or last:
            trainer.save(step + 1, saved)
    dist.close()


if __name__ == "__main__":
    main()
