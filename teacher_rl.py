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

`--ratio_norm` trains GRPO-Guard (section 8b) with its recipe (GUARD_RECIPE: its configs'
per-prompt std, clip range 2e-6, lr 1e-4, no KL) for every key the command line does not set.

The defaults are Flow-GRPO's SD3.5-M recipe (section 8a; its config/grpo.py geneval_sd3): a = 0.7,
10 steps, 48 prompts x 24 images per step in two optimizer steps, global std, int(0.99 x 10) = 9
trained steps, beta 0.04, clip 1e-4, lr 3e-4, EMA 0.9 every 8, 512 px. On the embedded toy model the
toy recipe (toy/recipe.py) changes a few values, printed at start and saved in config.json.

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
   `max_skipped_steps` in a row (harness.StudentTrainer.update).
6. GRPO-Guard's bias term b_j is computed per sample, as the paper's formula writes it (section 8b).
   The public GRPO-Guard script (train_sd3_GRPO_Guard.py, read at zhtmike/flow_grpo 2e2f712) takes
   `.mean(dim=())` of a per-sample tensor, which averages over the whole micro-batch: one b for all
   samples. Both give rho = 1 exactly on-policy (b = 0); off-policy the two ratios differ by a few
   percent of rho - 1 (0.5-5% per step after one lr-1e-4 update of the toy base), i.e. by about the
   clip range. Its sbar_j is likewise the batch mean of per-sample values; here every sample of a
   step has the same sbar_j, so those agree.

Run:
    python teacher_rl.py --task geneval --lr 1e-3 --steps 90 --out runs/teacher-geneval  # CPU, toy world
    make teachers        # the three shipped toy teachers
    torchrun --standalone --nproc_per_node=2 teacher_rl.py --task ocr --out runs/ocr
    torchrun --nproc_per_node=8 teacher_rl.py --model stabilityai/stable-diffusion-3.5-medium \\
        --task ocr --dataset dataset/ocr --reward ocr=1 --out runs/ocr        # SD3.5-M, Flow-GRPO's recipe
    python teacher_rl.py --task mixed --out runs/joint     # joint multi-task baseline (data/toy/mixed)
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from data import load_prompts, load_task
from evaluate import evaluate_task
from harness import (Dist, NonFiniteError, RunDir, StudentConfig, StudentTrainer, apply_recipe, apply_values,
                     check_student_config, config_dict, describe_recipe, fail, given_keys, parse_config,
                     print_main, require, require_positive, step_seed)
from model import TOY_MODEL, FlowModel, check_lora_folder, check_model_path, check_resolution, resolution_rule
from rewards import make_reward
from sample import gaussian_kl, gaussian_logprob, rollout, transition_mean


@dataclass
class Stage1Config(StudentConfig):
    """Fields every Stage-1 script shares (teacher_rl.py, nft.py); LoRA, AdamW, EMA, evaluation and
    checkpoints are in harness.StudentConfig. Defaults: Flow-GRPO's and NVlabs' SD3.5-M recipes."""
    model: str = TOY_MODEL              # base pipeline folder or hub id
    task: str = "geneval"               # task name; dataset defaults to data/toy/<task>
    dataset: str = ""                   # Flow-GRPO prompt folder (train.txt, test.txt, metadata)
    reward: str = ""                    # "name=w,name=w"; default: the dataset's task.json
    out: str = ""                       # run directory; default runs/<script>-<task>
    init_lora: str = ""                 # start from this adapter (cascade baseline)
    seed: int = 0
    steps: int = 60                     # rollout steps (x updates_per_rollout optimizer steps)
    batch: int = 1152                   # images per step over all ranks = prompts x group_size (48 x 24)
    group_size: int = 24                # G images per prompt
    updates_per_rollout: int = 2        # optimizer steps per rollout batch
    rollout_batch: int = 9              # images per forward pass during rollouts (per rank)
    train_batch: int = 9                # images per forward/backward during training (per rank)
    num_steps: int = 10                 # sampling steps N
    guidance: float = 4.5               # CFG during rollouts and training
    timestep_fraction: float = 0.99     # train K = int(fraction * N) steps
    per_group_std: bool = False         # False: divide by the std over the whole batch (global_std)
    adv_clip: float = 5.0               # advantages clipped to +-adv_clip


@dataclass
class TeacherConfig(Stage1Config):
    """Flow-GRPO / GRPO-Guard teacher training (one task, or several weighted rewards for the joint
    baseline)."""
    noise_level: float = 0.7            # a in Eq. 5
    cfg_detach_uncond: bool = False     # ablation: v = sg(v_u) + w (v_c - sg(v_u)) in the training forward
                                        # (Flow-GRPO up to ac4c86e); default: attached, as Flow-GRPO today
    clip_range: float = 1e-4
    ratio_logp: str = "mean_per_dim"    # or "sum" (see departure 1)
    kl_beta: float = 0.04               # KL to the base model, per latent dim
    ratio_norm: bool = False            # GRPO-Guard (section 8b): normalised ratio, 1/(-Delta) weights, and
                                        # GUARD_RECIPE for the keys not given (clip 2e-6, lr 1e-4, ...)


# GRPO-Guard's own values (its config/grpo_guard.py, *_rationorm), applied with --ratio_norm to every
# key the command line does not set: {key: (value, reason)}
GUARD_RECIPE = {
    "per_group_std": (True, "GRPO-Guard normalises advantages by the per-prompt std (global_std False)"),
    "clip_range": (2e-6, "GRPO-Guard's clip range on its normalised ratio (OCR, GenEval; PickScore: 4e-6)"),
    "lr": (1e-4, "GRPO-Guard's learning rate"),
    "kl_beta": (0.0, "GRPO-Guard trains without the KL to the base"),
}


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


def grpo_loss(mean, sbar, x_next, logp_old_sum, adv, cfg: TeacherConfig, mean_ref=None, mean_old=None, dt=None):
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


def update_layout(batch: int, updates: int, dist: Dist) -> tuple[list[int], list[int]]:
    """Which of the step's `batch` images (global index, grouped by prompt) each rank holds, so that
    optimizer step u trains on global images [u batch/U, (u+1) batch/U) whatever the world size: the
    run is the same on 1 or N ranks. Returns (order: the global index of each row of an all_gather,
    mine: this rank's global indices, in its row order)."""
    per_update = batch // updates
    share = per_update // dist.world   # this rank's rows of one update
    order = [u * per_update + r * share + i for r in range(dist.world) for u in range(updates) for i in range(share)]
    per_rank = batch // dist.world
    return order, order[dist.rank * per_rank:(dist.rank + 1) * per_rank]


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


def trained_steps(cfg: TeacherConfig) -> int:
    """Flow-GRPO's int(N x timestep_fraction): the first steps j = 0 .. K - 1 are trained."""
    return max(1, int(cfg.timestep_fraction * cfg.num_steps))


def validate_stage1(cfg, dist: Dist, argv, script: str, recipe: str, checks, own_recipe=None) -> tuple:
    """The checks every Stage-1 script shares (recipe, LoRA/AdamW/EMA fields, the batch of groups and its
    split into updates and ranks, model, resolution, init adapter, task and prompts), then `checks(cfg)`
    (the algorithm's own), then the run directory and the reward. `own_recipe(cfg)` ({key: (value,
    reason)}, e.g. GUARD_RECIPE) is applied first, to the keys the command line does not set. Every bad input fails
    here with a one-line error, before any model loads or anything is written. Returns (task, reward_fn, run)."""
    try:
        given = given_keys(type(cfg), argv)
        own = apply_values(cfg, given, own_recipe(cfg) if own_recipe else {})
        changed = apply_recipe(cfg, given, cfg.model, recipe)
        check_student_config(cfg)
        require_positive(cfg, "batch", "group_size", "rollout_batch", "train_batch", "num_steps", "adv_clip",
                         "updates_per_rollout")
        require(cfg.group_size >= 2, f"--group_size must be >= 2 (advantages compare images of one prompt), "
                                     f"got {cfg.group_size}")
        require(0 < cfg.timestep_fraction <= 1, f"--timestep_fraction must be in (0, 1], got {cfg.timestep_fraction}")
        require(cfg.batch % cfg.group_size == 0, f"--group_size {cfg.group_size} does not divide the global --batch {cfg.batch}")
        require(cfg.batch % (cfg.updates_per_rollout * dist.world) == 0,
                f"--batch {cfg.batch} does not split into {cfg.updates_per_rollout} updates (--updates_per_rollout) "
                f"of equal shares over {dist.world} ranks")
        checks(cfg)
        check_model_path(cfg.model)
        rule = resolution_rule(cfg.model)
        if rule and (cfg.height or cfg.width):
            check_resolution(cfg.height or rule[1], cfg.width or rule[1], rule[0])
        if cfg.init_lora:
            check_lora_folder(cfg.init_lora)
        task = load_task(cfg.task, cfg.dataset, cfg.reward, cfg.guidance)
        load_prompts(task.dataset, "train"), load_prompts(task.dataset, "test")
        run = RunDir(cfg.out, cfg, dist, script, argv)
        reward_fn = None if cfg.dry_run else make_reward(task.reward, device=dist.device)
        print_main(dist, describe_recipe(cfg, changed))
        if own:
            print_main(dist, f"{len(own)} values of the algorithm's own recipe:", *(
                f"  {key} = {value!r} (default {default!r}): {reason}" for key, (default, value, reason) in own.items()))
        return task, reward_fn, run
    except (ValueError, FileNotFoundError, KeyError) as e:
        fail(e)


def _grpo_checks(cfg: TeacherConfig) -> None:
    require_positive(cfg, "noise_level", "clip_range")
    require(cfg.kl_beta >= 0, f"--kl_beta must be >= 0, got {cfg.kl_beta}")
    require(cfg.ratio_logp in ("mean_per_dim", "sum"), f"--ratio_logp must be mean_per_dim or sum, got {cfg.ratio_logp!r}")
    require(not (cfg.ratio_norm and cfg.ratio_logp != "mean_per_dim"),
            "--ratio_norm (GRPO-Guard) normalises the per-dim-mean log-density ratio: keep --ratio_logp mean_per_dim")


def start_stage1(cfg, argv, script: str, recipe: str, checks, own_recipe=None):
    """Parse-time to first step of a Stage-1 script: devices, the checks, the model and its trainable
    student (fresh LoRA or --init_lora). Returns (dist, task, reward_fn, run, model, trainer), or None
    after printing the resolved config with --dry_run (nothing loaded, nothing written)."""
    try:
        dist = Dist(cfg.device)
    except ValueError as e:
        fail(e)
    task, reward_fn, run = validate_stage1(cfg, dist, argv, script, recipe, checks, own_recipe)
    if cfg.dry_run:
        print_main(dist, "dry run: every input checked; the resolved config:", json.dumps(config_dict(cfg), indent=2))
        return None
    try:
        model = FlowModel.load(cfg.model, device=dist.device)
        model.latent_shape(cfg.height or model.default_resolution(), cfg.width or model.default_resolution())
        trainer = StudentTrainer(model, cfg, dist, run)  # LoRA/full FT, --init_lora, AdamW, EMA, resume
    except (ValueError, FileNotFoundError) as e:
        fail(e)
    return dist, task, reward_fn, run, model, trainer


def step_prompts(cfg, step: int, mine: list[int], train_prompts, train_metas):
    """The step's P prompts x G images of this rank: (prompts, metadatas, seeds); image i of the step
    (global index) is seeded step_seed(seed, step, i), so any rollout can be regenerated."""
    rng = np.random.default_rng([cfg.seed, step])
    n_prompts = cfg.batch // cfg.group_size
    chosen = rng.choice(len(train_prompts), n_prompts, replace=len(train_prompts) < n_prompts)
    idx = np.repeat(chosen, cfg.group_size)[mine]  # groups are contiguous; they may span ranks
    return ([train_prompts[i] for i in idx], [train_metas[i] for i in idx],
            [step_seed(cfg.seed, step, i) for i in mine])


def score(reward_fn, images, prompts, metas, order, cfg, dist):
    """Rewards of this rank's images, gathered into global image order; group advantages.
    Returns (all rewards (batch,), advantages (batch,), fraction of all-equal groups, reward info)."""
    scores, info = reward_fn(images, prompts, metas)
    all_scores = torch.empty(cfg.batch)
    all_scores[order] = dist.all_gather(scores.to(dist.device)).cpu()
    adv_all, zero_std = group_advantages(all_scores, cfg.group_size, cfg.per_group_std, cfg.adv_clip)
    return all_scores, adv_all, zero_std, info


def finish_step(cfg, step: int, metrics: dict, trainer, model, task, reward_fn, dist, saved: dict, bar) -> None:
    """The end of a Stage-1 step: evaluate the EMA weights on the task's test prompts (evaluate.py, at
    the guidance the model samples with) every eval_every steps and at the end, log, checkpoint."""
    run = trainer.run
    last, images = step + 1 == cfg.steps, {}
    if (step + 1) % cfg.eval_every == 0 or last:
        t0 = time.perf_counter()
        images["samples"] = f"{run.path}/samples/step{step + 1:05d}.png"
        with trainer.ema_weights():
            res = evaluate_task(model, task, reward_fn, dist, "student", cfg.eval_prompts, cfg.eval_steps,
                                cfg.guidance, grid_path=images["samples"])
        metrics.update({f"eval/{k}": v for k, v in res.items()}, **{"sec/eval": time.perf_counter() - t0})
    run.log(metrics, images)
    bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}")
    if (step + 1) % cfg.save_every == 0 or last:
        trainer.save(step + 1, saved)


def update(trainer, step: int, losses: list[torch.Tensor]) -> tuple[float, bool]:
    """trainer.update, or the one-line stop after too many non-finite steps (logged first)."""
    try:
        return trainer.update(step, torch.cat(losses))
    except NonFiniteError as e:
        trainer.run.log({"step": step, "skipped_nonfinite": 1})
        fail(e)


def kept_rows(adv_all: torch.Tensor, u: int, per_update: int, mine: list[int]) -> tuple[list[int], int]:
    """Flow-GRPO's filter (departure 4) for optimizer step u: this rank's rows (positions in `mine`) of
    the update's global images [u per_update, (u+1) per_update) whose advantage is not 0, and the number
    of such images over all ranks, the denominator of the update's mean loss."""
    lo, hi = u * per_update, (u + 1) * per_update
    rows = [r for r, i in enumerate(mine) if lo <= i < hi and adv_all[i] != 0]
    return rows, int((adv_all[lo:hi] != 0).sum())


def policy_gradient(cfg: TeacherConfig, model: FlowModel, rows: list[int], n_kept: int, traj: dict, embeds, adv,
                    n_train: int, stats: dict, world: int = 1) -> list[torch.Tensor]:
    """Accumulate into .grad this rank's share of the gradient of one update's loss (module docstring):
    the GRPO loss of its kept `rows` at each trained step j, divided by n_kept x n_train, the update's
    kept images on all `world` ranks times its trained steps (x world, because the update then averages
    the ranks' gradients: Dist.average_gradients). traj: the rollout's latents (B, N+1, C, h, w), logp_old
    (B, N), means_old (B, N, C, h, w) or None, grid t (N+1,), sbar (N,). Adds each term's share of that
    mean to `stats` (and the max |rho - 1| as ratio_dev). Returns the per-row losses (for the guard)."""
    losses, t_guard = [], traj["t"][1].item()
    # L = sum over kept images i (all ranks) and steps j of L_ij / (n_kept K): the mean over what is kept
    scale = world / (n_kept * n_train)
    for b in range(0, len(rows), cfg.train_batch):
        sl = torch.tensor(rows[b:b + cfg.train_batch])
        for j in range(n_train):
            x, x_next = traj["latents"][sl, j].to(model.device), traj["latents"][sl, j + 1].to(model.device)
            t, t_next = traj["t"][j].item(), traj["t"][j + 1].item()
            v = model.velocity(x, t, embeds[sl], cfg.guidance, detach_uncond=cfg.cfg_detach_uncond)
            mean = transition_mean(x, v, t, t_next, cfg.noise_level, t_guard)
            sbar = traj["sbar"][j].expand(len(x)).to(model.device)
            mean_ref = None
            if cfg.kl_beta > 0:
                with torch.no_grad(), model.adapter(None):
                    v_ref = model.velocity(x, t, embeds[sl], cfg.guidance)
                    mean_ref = transition_mean(x, v_ref, t, t_next, cfg.noise_level, t_guard)
            mean_old = traj["means_old"][sl, j].to(model.device) if traj["means_old"] is not None else None
            loss, ratio, kl = grpo_loss(mean, sbar, x_next, traj["logp_old"][sl, j].to(model.device),
                                        adv[sl].to(model.device), cfg, mean_ref, mean_old, t_next - t)
            (loss.sum() * scale).backward()
            losses.append(loss.detach())
            stats["policy_loss"] += loss.sum().item() * scale
            stats["clipfrac"] += ((ratio - 1).abs() > cfg.clip_range).float().sum().item() * scale
            if kl is not None:
                stats["kl"] += kl.sum().item() * scale
            stats["ratio_dev"] = max(stats["ratio_dev"], (ratio - 1).abs().max().item())
    return losses


def main(argv=None):
    cfg = parse_config(TeacherConfig, argv)
    cfg.out = cfg.out or f"runs/teacher-{cfg.task}"
    started = start_stage1(cfg, argv, "teacher_rl.py", "teacher_rl", _grpo_checks,
                           lambda c: GUARD_RECIPE if c.ratio_norm else {})
    if started is None:
        return cfg
    dist, task, reward_fn, run, model, trainer = started
    start = trainer.begin()  # the run directory is written only now, after the model has loaded
    train_prompts, train_metas = load_prompts(task.dataset, "train")
    order, mine = update_layout(cfg.batch, cfg.updates_per_rollout, dist)
    n_train = trained_steps(cfg)
    saved = {"task": task.name, "dataset": task.dataset, "reward": task.reward, "guidance": task.guidance,
             "eval_key": task.eval_key, "algorithm": "grpo-guard" if cfg.ratio_norm else "flow-grpo"}

    bar = tqdm(range(start, cfg.steps), desc=f"grpo {task.name}", disable=not dist.is_main,
               initial=start, total=cfg.steps)
    for step in bar:
        timer = {}
        # ---- rollout: P prompts x G images with the SDE sampler
        t0 = time.perf_counter()
        prompts, metas, seeds = step_prompts(cfg, step, mine, train_prompts, train_metas)
        embeds = model.encode_prompts(prompts)
        trajs = [rollout(model, embeds[b:b + cfg.rollout_batch], seeds[b:b + cfg.rollout_batch], cfg.num_steps,
                         cfg.guidance, cfg.noise_level, cfg.height or None, cfg.width or None, adapter="student",
                         keep_means=cfg.ratio_norm)
                 for b in range(0, len(seeds), cfg.rollout_batch)]
        traj = {"latents": torch.cat([t.latents for t in trajs]),      # (B, N+1, C, h, w)
                "logp_old": torch.cat([t.logp_sum for t in trajs]),    # (B, N) summed over dims
                "means_old": torch.cat([t.means for t in trajs]) if cfg.ratio_norm else None,  # (B, N, C, h, w)
                "t": trajs[0].t, "sbar": trajs[0].sbar}
        timer["rollout"] = time.perf_counter() - t0

        # ---- reward, gathered over ranks; advantages within each group
        t0 = time.perf_counter()
        all_scores, adv_all, zero_std, info = score(reward_fn, torch.cat([t.images for t in trajs]), prompts, metas,
                                                    order, cfg, dist)
        adv = adv_all[mine]
        timer["reward"] = time.perf_counter() - t0

        # ---- loss: the GRPO loss of the kept images at each trained step j, the mean recomputed with gradient
        t0 = time.perf_counter()
        per_update = cfg.batch // cfg.updates_per_rollout
        runs = []  # the stats of each update that ran
        skipped_any, grad_norm, n_kept_all = False, 0.0, 0
        for u in range(cfg.updates_per_rollout):
            rows, n_kept = kept_rows(adv_all, u, per_update, mine)
            n_kept_all += n_kept
            if n_kept == 0:  # every advantage of this update is 0: nothing to learn, no optimizer step
                continue
            runs.append({"clipfrac": 0.0, "kl": 0.0, "policy_loss": 0.0, "ratio_dev": 0.0})
            losses = policy_gradient(cfg, model, rows, n_kept, traj, embeds, adv, n_train, runs[-1], dist.world)
            grad_norm, skipped = update(trainer, step, losses or [torch.zeros(1)])
            skipped_any |= skipped
        # each term's mean over updates; ratio_dev of the first update (the on-policy one when it is u = 0)
        stats = {k: sum(r[k] for r in runs) / max(1, len(runs)) for k in ("clipfrac", "kl", "policy_loss")}
        stats["ratio_dev"] = runs[0]["ratio_dev"] if runs else 0.0
        timer["train"] = time.perf_counter() - t0

        # ---- log, evaluate the EMA weights with the ODE, checkpoint
        metrics = {"step": step, "reward_mean": all_scores.mean().item(), "reward_std": all_scores.std().item(),
                   "zero_std_groups": zero_std, "kept_fraction": n_kept_all / cfg.batch, "grad_norm": grad_norm,
                   "skipped_nonfinite": int(skipped_any),
                   **trainer.mean_over_ranks(stats),
                   **{f"reward/{k}": dist.all_gather(v.to(dist.device)).mean().item() for k, v in info.items()},
                   **{f"sec/{k}": v for k, v in timer.items()}}
        finish_step(cfg, step, metrics, trainer, model, task, reward_fn, dist, saved, bar)
    trainer.finish()
    dist.close()


if __name__ == "__main__":
    main()
