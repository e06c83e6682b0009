"""Stage 1: train a teacher with Flow-GRPO (paper sections 3, 4 and 8a).

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

Loss of one sample at one trained step j (minimised):
    L = max(-A rho_j, -A clip(rho_j, 1 - eps, 1 + eps)) + beta KL_j / d
    KL_j = ||mu_theta(x_j) - mu_ref(x_j)||^2 / (2 sbar_j^2)          (Eqs. 10-11, exact sbar_j^2)
averaged over the trained steps and over the samples whose advantage is not 0 (Flow-GRPO drops the
others before it averages: `kept_rows`). The training forward's CFG is attached, v = v_u + w (v_c - v_u),
gradient (1 - w) grad v_u + w grad v_c, as today's Flow-GRPO, GRPO-Guard and the DiffusionOPD release
(section 8a); `--cfg_detach_uncond` is the ablation v = sg(v_u) + w (v_c - sg(v_u)) of Flow-GRPO up to
its commit ac4c86e (2025-07), gradient w grad v_c.

`--ratio_norm` trains GRPO-Guard (section 8b) with its recipe (recipes/grpo_guard.json: its configs'
per-prompt std, clip range 2e-6, lr 1e-4, no KL) for every key the command line does not set.

The defaults are Flow-GRPO's SD3.5-M recipe (section 8a; its config/grpo.py geneval_sd3): a = 0.7,
10 steps, 48 prompts x 24 images per step in two optimizer steps, global std, int(0.99 x 10) = 9
trained steps, beta 0.04, clip 1e-4, lr 3e-4, 512 px, and Flow-GRPO's EMA: decay min((1 + s) / (10 + s), 0.9)
at optimizer step s, updated when (s + 1) % 8 == 0, called 8 times per optimizer step as Flow-GRPO
calls it (once per training micro-batch: FLOW_GRPO_EMA_CALLS). A base model folder may carry
its own recipe (recipe.json; the embedded base's holds its CPU-scale values): the values it changes are
printed at start and saved in config.json. What Stage 1's scripts share is in stage1.py.

Departures from Flow-GRPO
1. `ratio_logp = "mean_per_dim"` (default) builds the PPO ratio from the per-dim mean log-density,
   exactly as Flow-GRPO does, so its tuned clip range (1e-4) keeps its meaning; "sum" uses the true
   log-density. The name says which one is in use; both are logged.
2. The KL to the reference uses the exact transition variance sbar_j^2 = s_j^2 (-Delta_j); Flow-GRPO
   divides by s_j^2. It is divided by the number of latent dims d, so beta keeps Flow-GRPO's scale.
3. Every rollout of a step is made by the current weights; `updates_per_rollout` splits the step's
   images into that many optimizer steps (then rho != 1 after the first). `ratio_dev` logs max
   |rho - 1| of the first update, a sanity metric. Flow-GRPO samples its minibatches in shuffled order
   per GPU; here update u trains the step's global images [u B/U, (u+1) B/U) on any number of ranks
   (`update_layout`), so 1 and N ranks make the same updates.
4. Samples with advantage exactly 0 (every image of a group whose rewards are all equal) are left
   out of the loss and of its mean, as in Flow-GRPO (train_sd3.py: `advantages.abs().sum(1) != 0`);
   the mean runs over the kept samples of the whole update on all ranks, so 1 and N ranks agree.
   Flow-GRPO then re-admits random dropped samples until the kept count divides its minibatches;
   here no sample is re-admitted (minibatches need not be equal), and an update with no kept sample
   takes no optimizer step. Both fractions are logged (`zero_std_groups`, `kept_fraction`).
   Flow-GRPO's PerPromptStatTracker groups by prompt text over the whole epoch; here a group is the
   G images of one sampled prompt.
5. A step with a non-finite loss or gradient is skipped, logged, and stops the run after
   `max_skipped_steps` in a row (student.StudentTrainer.update).
6. GRPO-Guard's bias term b_j is computed per sample, as the paper's formula writes it (section 8b).
   The public GRPO-Guard script (train_sd3_GRPO_Guard.py, read at zhtmike/flow_grpo 2e2f712) takes
   `.mean(dim=())` of a per-sample tensor, which averages over the whole micro-batch: one b for all
   samples. Both give rho = 1 exactly on-policy (b = 0); off-policy the two ratios differ by a few
   percent of rho - 1 (0.5-5% per step after one lr-1e-4 update of the toy base), i.e. by about the
   clip range. Its sbar_j is likewise the batch mean of per-sample values; here every sample of a
   step has the same sbar_j, so those agree.

Run:
    python teacher_rl.py --model models/toy-sd3 --task geneval --lr 1e-3 --steps 90   # CPU, the embedded base
    make teachers        # the three shipped toy teachers
    torchrun --standalone --nproc_per_node=2 teacher_rl.py --model models/toy-sd3 --task ocr --out runs/ocr
    torchrun --nproc_per_node=8 teacher_rl.py --task ocr --dataset dataset/ocr --reward ocr=1 \\
        --ratio_norm --out runs/ocr                               # SD3.5-M, GRPO-Guard's recipe (the paper's)
    python teacher_rl.py --model models/toy-sd3 --task mixed --out runs/joint   # joint multi-task baseline
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

import stage1
from data import load_prompts
from model import FlowModel
from sample import Trajectory, gaussian_kl, gaussian_logprob, rollout, trained_steps, transition_mean
from stage1 import Stage1Config
from student import Phases, update_or_stop
from plumbing.config import option, parse_config, require, require_positive
from plumbing.stops import one_line_stops


@dataclass
class TeacherConfig(Stage1Config):
    """Flow-GRPO / GRPO-Guard teacher training (one task, or several weighted rewards for the joint
    baseline)."""
    noise_level: float = option(0.7, "a in Eq. 5")
    cfg_detach_uncond: bool = option(False, "ablation: v = sg(v_u) + w (v_c - sg(v_u)) in the training forward "
                                            "(Flow-GRPO up to ac4c86e); default: attached, as Flow-GRPO today")
    clip_range: float = 1e-4
    ratio_logp: str = option("mean_per_dim", 'or "sum" (see departure 1)')
    kl_beta: float = option(0.04, "KL to the base model, per latent dim")
    ratio_norm: bool = option(False, "GRPO-Guard (section 8b): normalised ratio, 1/(-Delta) weights, and "
                                     "recipes/grpo_guard.json for the keys not given (clip 2e-6, lr 1e-4, ...)")


# Flow-GRPO calls its EMA once per training micro-batch (scripts/train_sd3.py at ac4c86e, line 954), with the
# optimizer-step count: its SD3.5-M configs (config/grpo.py) train 48 x 24 images per step on 8 GPUs in
# micro-batches of 9, two optimizer steps per step, so 1152 / (8 x 9 x 2) = 8 calls per optimizer step
# (student.EMA). A constant here, so that 1 and N ranks (and any --train_batch) make the same EMA.
FLOW_GRPO_EMA_CALLS = 8

# GRPO-Guard's own values (its config/grpo_guard.py, *_rationorm), a recipe file that --ratio_norm applies to
# every key the command line does not set (after the base's recipe.json)
GUARD_RECIPE = "recipes/grpo_guard.json"


def ppo_clip_loss(logp_new, logp_old, adv, clip_range):
    """Per-sample max(-A rho, -A clip(rho, 1-eps, 1+eps)) with rho = exp(logp_new - logp_old)."""
    ratio = torch.exp(logp_new - logp_old)
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range)), ratio


def grpo_loss(mean, sbar, x_next, logp_old_sum, adv, cfg: TeacherConfig, mean_ref=None, mean_old=None,
              dt=None):
    """Per-sample loss of one trained step (module docstring): PPO-clip on the ratio of the rollout's
    log-density (per-dim mean or sum, `ratio_logp`), or GRPO-Guard's normalised ratio (`ratio_norm`,
    needs the rollout's mean_old and Delta_j), plus beta KL_j / d against the reference mean (None: no
    KL term). Returns (loss (b,), ratio (b,), KL_j (b,) or None)."""
    d = x_next[0].numel()
    if cfg.ratio_norm:
        loss, ratio = guard_loss(mean, mean_old, sbar, x_next, logp_old_sum, adv, dt, cfg.clip_range)
    else:
        logp_sum, logp_mean = gaussian_logprob(x_next, mean, sbar)
        new, old = (logp_sum, logp_old_sum) if cfg.ratio_logp == "sum" else (logp_mean, logp_old_sum / d)
        loss, ratio = ppo_clip_loss(new, old, adv, cfg.clip_range)
    if mean_ref is None:
        return loss, ratio, None
    kl = gaussian_kl(mean, mean_ref, sbar**2)  # (b,), the true KL summed over dims
    return loss + cfg.kl_beta * kl / d, ratio, kl


def guard_loss(mean, mean_old, sbar, x_next, logp_old_sum, adv, dt, clip_range):
    """Per-sample GRPO-Guard loss of one trained step (paper section 8b, RatioNorm), from per-dim-mean
    log-densities, with mean_old the rollout's own transition mean and dt = Delta_j < 0:
        b_j   = mean_dims (mu_theta - mu_old)^2 / (2 sbar_j^2)        removes the ratio's negative bias
        rho_j = exp((logp_theta - logp_old + b_j) sbar_j)              equalises its spread across steps
        L_j   = max(-A rho_j, -A clip(rho_j, 1 - eps, 1 + eps)) / (-Delta_j)
    On-policy (mu_theta = mu_old) rho_j = 1 exactly. Returns (loss (b,), rho (b,))."""
    d = x_next[0].numel()
    _, logp_mean = gaussian_logprob(x_next, mean, sbar)
    sbar_col = sbar.reshape(-1, *[1] * (mean.dim() - 1))
    bias = ((mean - mean_old) ** 2 / (2 * sbar_col**2)).flatten(1).mean(1)
    ratio = torch.exp((logp_mean - logp_old_sum / d + bias) * sbar)
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range))
    return loss / -torch.as_tensor(dt, dtype=loss.dtype, device=loss.device), ratio


def _grpo_checks(cfg: TeacherConfig) -> None:
    require_positive(cfg, "noise_level", "clip_range")
    require(cfg.kl_beta >= 0, f"--kl_beta must be >= 0, got {cfg.kl_beta}")
    require(cfg.ratio_logp in ("mean_per_dim", "sum"),
            f"--ratio_logp must be mean_per_dim or sum, got {cfg.ratio_logp!r}")
    require(not (cfg.ratio_norm and cfg.ratio_logp != "mean_per_dim"),
            "--ratio_norm (GRPO-Guard) normalises the per-dim-mean log-density ratio: "
            "keep --ratio_logp mean_per_dim")


def kept_rows(adv_all: torch.Tensor, u: int, per_update: int, mine: list[int]) -> tuple[list[int], int]:
    """Flow-GRPO's filter (departure 4) for optimizer step u: this rank's rows (positions in `mine`) of
    the update's global images [u per_update, (u+1) per_update) whose advantage is not 0, and the number
    of such images over all ranks, the denominator of the update's mean loss."""
    lo, hi = u * per_update, (u + 1) * per_update
    rows = [r for r, i in enumerate(mine) if lo <= i < hi and adv_all[i] != 0]
    return rows, int((adv_all[lo:hi] != 0).sum())


def policy_gradient(cfg: TeacherConfig, model: FlowModel, rows: list[int], n_kept: int, traj: Trajectory,
                    embeds, adv, steps: list[int], stats: dict, world: int = 1) -> list[torch.Tensor]:
    """Accumulate into .grad this rank's share of the gradient of one update's loss (module docstring):
    the GRPO loss of its kept `rows` at each trained step j in `steps`, divided by n_kept x K, the update's
    kept images on all `world` ranks times its trained steps (x world, because the update then averages
    the ranks' gradients: Dist.average_gradients). traj: the rollout (sample.Trajectory) of the policy
    before the update: its latents, logp_sum (the old log-densities), means (GRPO-Guard's) or None, t,
    sbar. Adds each term's share of that mean to `stats` (and the max |rho - 1| as ratio_dev). Returns the
    per-row losses (for the guard)."""
    losses, t_guard = [], traj.t[1].item()
    # L = sum over kept images i (all ranks) and trained steps j of L_ij / (n_kept K): the mean of
    # what is kept
    scale = world / (n_kept * len(steps))
    for b in range(0, len(rows), cfg.train_batch):
        sl = torch.tensor(rows[b:b + cfg.train_batch])
        for j in steps:
            x, x_next = traj.latents[sl, j].to(model.device), traj.latents[sl, j + 1].to(model.device)
            t, t_next = traj.t[j].item(), traj.t[j + 1].item()
            v = model.velocity(x, t, embeds[sl], cfg.guidance, detach_uncond=cfg.cfg_detach_uncond)
            mean = transition_mean(x, v, t, t_next, cfg.noise_level, t_guard)
            sbar = traj.sbar[j].expand(len(x)).to(model.device)
            mean_ref = None
            if cfg.kl_beta > 0:
                with torch.no_grad(), model.adapter(None):
                    v_ref = model.velocity(x, t, embeds[sl], cfg.guidance)
                    mean_ref = transition_mean(x, v_ref, t, t_next, cfg.noise_level, t_guard)
            mean_old = traj.means[sl, j].to(model.device) if traj.means is not None else None
            loss, ratio, kl = grpo_loss(mean, sbar, x_next, traj.logp_sum[sl, j].to(model.device),
                                        adv[sl].to(model.device), cfg, mean_ref, mean_old, t_next - t)
            (loss.sum() * scale).backward()
            losses.append(loss.detach())
            stats["policy_loss"] += loss.sum().item() * scale
            stats["clipfrac"] += ((ratio - 1).abs() > cfg.clip_range).float().sum().item() * scale
            if kl is not None:
                stats["kl"] += kl.sum().item() * scale
            stats["ratio_dev"] = max(stats["ratio_dev"], (ratio - 1).abs().max().item())
    return losses


@one_line_stops
def main(argv=None):
    cfg = parse_config(TeacherConfig, argv)
    cfg.out = cfg.out or f"runs/teacher-{cfg.task}"
    s = stage1.start(cfg, argv, "teacher_rl.py", "teacher_rl", _grpo_checks,
                     lambda c: [GUARD_RECIPE] if c.ratio_norm else [], ema_calls=FLOW_GRPO_EMA_CALLS)
    if s is None:
        return cfg
    dist, task, reward_fn, model, trainer = s.dist, s.task, s.reward_fn, s.model, s.trainer
    start = trainer.begin()  # the run directory is written only now, after the model has loaded
    train_prompts, train_metas = load_prompts(task.dataset, "train")
    order, mine = stage1.update_layout(cfg.batch, cfg.updates_per_rollout, dist)
    steps = trained_steps(cfg)
    saved = {"task": task.name, "dataset": task.dataset, "reward": task.reward, "guidance": task.guidance,
             "eval_key": task.eval_key, "algorithm": "grpo-guard" if cfg.ratio_norm else "flow-grpo"}

    bar = tqdm(range(start, cfg.steps), desc=f"grpo {task.name}", disable=not dist.is_main,
               initial=start, total=cfg.steps)
    for step in bar:
        phase = Phases(dist.device)
        # ---- rollout: P prompts x G images with the SDE sampler
        with phase("rollout"):
            prompts, metas, seeds = stage1.step_prompts(cfg, step, mine, train_prompts, train_metas)
            embeds = model.encode_prompts(prompts)
            trajs = [rollout(model, embeds[b:b + cfg.rollout_batch], seeds[b:b + cfg.rollout_batch],
                             cfg.num_steps, cfg.guidance, cfg.noise_level, cfg.height or None,
                             cfg.width or None, adapter="student", keep_means=cfg.ratio_norm)
                     for b in range(0, len(seeds), cfg.rollout_batch)]
            traj = Trajectory.cat(trajs)  # the old policy's: its log-densities, (GRPO-Guard) its means

        # ---- reward, gathered over ranks; advantages within each group
        with phase("reward"):
            scored = stage1.score(reward_fn, traj.images, prompts, metas, order, cfg, dist)
            adv = scored.advantages[mine]

        # ---- loss: the GRPO loss of the kept images at each trained step j (the mean recomputed with grad)
        with phase("train"):
            per_update = cfg.batch // cfg.updates_per_rollout
            runs = []  # the stats of each update that ran
            skipped_any, grad_norm, n_kept_all = False, 0.0, 0
            for u in range(cfg.updates_per_rollout):
                rows, n_kept = kept_rows(scored.advantages, u, per_update, mine)
                n_kept_all += n_kept
                if n_kept == 0:  # every advantage of this update is 0: nothing to learn, no optimizer step
                    continue
                runs.append({"clipfrac": 0.0, "kl": 0.0, "policy_loss": 0.0, "ratio_dev": 0.0})
                losses = policy_gradient(cfg, model, rows, n_kept, traj, embeds, adv, steps, runs[-1],
                                         dist.world)
                grad_norm, skipped = update_or_stop(trainer, step, losses or [torch.zeros(1)])
                skipped_any |= skipped
            # each term's mean over updates; ratio_dev of the first update (on-policy when it is u = 0)
            stats = {k: sum(r[k] for r in runs) / max(1, len(runs))
                     for k in ("clipfrac", "kl", "policy_loss")}
            stats["ratio_dev"] = runs[0]["ratio_dev"] if runs else 0.0

        # ---- log, evaluate the EMA weights with the ODE, checkpoint
        own = {"kept_fraction": n_kept_all / cfg.batch, "grad_norm": grad_norm, "skipped_nonfinite": int(skipped_any),
               **trainer.mean_over_ranks(stats)}
        stage1.finish_step(cfg, step, s, scored, own, phase, saved, bar)
    trainer.finish()
    dist.close()


if __name__ == "__main__":
    main()
