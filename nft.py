"""Stage 1 with DiffusionNFT: negative-aware fine-tuning on the forward process (paper section 8c).

The paper's GenEval teacher is a DiffusionNFT model (CFG-free, hence its guidance 1.0). Per step:
the "old" policy v_old (a second, frozen LoRA on the same backbone) samples G images per prompt with
the deterministic sampler and no CFG; only each image's clean latent x0 is kept. Rewards give
group-normalised advantages A, clipped to +-A_max, and the optimality probability
    r = clamp(A / A_max / 2 + 1/2, 0, 1).
Each image is trained at K = int(N x 0.99) of the rollout grid's timesteps t_j, in random order, with
fresh noise: x_t = (1 - t) x0 + t eps. With the trained velocity v_theta and the implicit policies
    v+ = beta v_theta + (1 - beta) sg(v_old),      v- = (1 + beta) sg(v_old) - beta v_theta,
their x0-predictions x0(v) = x_t - t v and the detached adaptive weights w = mean_dims |x0(v) - x0|:
    L = A_max [ r ||x0(v+) - x0||^2 / w+  +  (1 - r) ||x0(v-) - x0||^2 / w- ] / beta
        + beta_ref ||v_theta - v_ref||^2                                   (each ||.||^2 a mean over dims)
v_ref is the base (adapters disabled). After each step the old policy moves toward the trained one,
    old <- d old + (1 - d) theta,   d = 0 for the first `old_decay_flat` optimizer steps, then
    min(old_decay_rate (k - flat), old_decay_max) at optimizer step k
(GenEval/PickScore: flat 0, rate 0.001, max 0.5; OCR: flat 75, rate 0.0075, max 0.999).

Notation (paper -> code)
    beta, beta_ref      beta, ref_beta      implicit-policy strength; velocity penalty to the base
    A_max               adv_clip            advantage clip (5)
    r                   optimality          per-image optimality probability
    w+, w-              weight_pos, weight_neg

The defaults are the NVlabs recipe for SD3.5-M GenEval (config/nft.py sd3_geneval): 48 prompts x 24
images per step, one optimizer step, global std, beta 1.0, beta_ref 1e-4, lr 3e-4, guidance 1.0, 10
steps, an EMA for evaluation (Flow-GRPO's wrapper: decay min((1 + s) / (10 + s), 0.9) at optimizer
step s, called once after every optimizer step: train_nft_sd3.py line 1029), 512 px; OCR: --beta 0.1
--updates_per_rollout 2 --old_decay_flat 75 --old_decay_rate 0.0075 --old_decay_max 0.999. A base model folder's recipe.json
(the embedded base's holds its CPU-scale values) changes a few values, printed at start and saved in
config.json. What Stage 1's scripts share is in stage1.py.

Departures from the reference code (NVlabs/DiffusionNFT, scripts/train_nft_sd3.py)
1. Rollouts use the Euler ODE step (sample.rollout with a = 0), not the 2nd-order DPM solver; the
   paper notes allow any deterministic sampler.
2. The timestep order and the training noise of image i at step k are drawn from its own seeded
   generator (seed, step, global index), so the run is the same on 1 or N ranks and resumes exactly;
   the reference draws them from the process's global RNG.
3. The old policy is updated after every rollout step from the count of optimizer steps so far, as
   in the reference; it is saved with the checkpoint (old_weights.safetensors) so --resume is exact.
4. Evaluation uses the shared protocol (evaluate.py: 40-step ODE, first test prompts, seed per
   prompt) at the guidance the model samples with, --guidance (1.0): a teacher is judged as the
   student will query it (the study evaluates every model at the CFG it samples with).
5. A step with a non-finite loss or gradient is skipped, logged, and stops the run after
   `max_skipped_steps` in a row (student.StudentTrainer.update).

Run:
    python nft.py --model models/toy-sd3 --task geneval --out runs/nft-geneval     # CPU, the embedded base
    torchrun --nproc_per_node=8 nft.py --task geneval --dataset dataset/geneval --out runs/nft  # SD3.5-M
    python nft.py --model models/toy-sd3 --task mixed --out runs/multitask-nft     # multi-task NFT baseline
    python nft.py --model models/toy-sd3 --task ocr --init_lora runs/nft-geneval/checkpoint \\
        --out runs/cascade-2-ocr                                                   # cascade NFT, second stage
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

import stage1
from data import load_prompts
from sample import Trajectory, rollout, trained_steps
from stage1 import Stage1Config
from student import Phases, step_seed, update_or_stop
from plumbing.config import option, parse_config, require, require_positive
from plumbing.stops import one_line_stops

OLD = "old"  # the old policy's adapter name


@dataclass
class NFTConfig(Stage1Config):
    """DiffusionNFT teacher training (one task, or several rewards on a mixed prompt set).
    Fields shared with teacher_rl.py are in stage1.Stage1Config."""
    updates_per_rollout: int = option(1, "optimizer steps per rollout batch (NVlabs OCR: 2)")
    guidance: float = option(1.0, "CFG of the rollouts and the training forwards (CFG-free)")
    beta: float = option(1.0, "implicit-policy strength (NVlabs: 1.0 GenEval/PickScore, 0.1 OCR)")
    ref_beta: float = option(1e-4, "weight of the velocity penalty ||v_theta - v_ref||^2")
    old_decay_flat: int = option(0, "old-policy decay schedule (module docstring)")
    old_decay_rate: float = 0.001
    old_decay_max: float = 0.5
    ema_every: int = option(1, "NVlabs: its EMA (0.9 after the warm-up) updates at every optimizer step")


def optimality(adv: torch.Tensor, adv_clip: float) -> torch.Tensor:
    """r = clamp(A / A_max / 2 + 1/2, 0, 1) for advantages already clipped to +-A_max."""
    return (adv / adv_clip / 2 + 0.5).clamp(0, 1)


def nft_loss(v, v_old, v_ref, x_t, x0, t, r, cfg: NFTConfig):
    """Per-sample NFT loss (module docstring). v: the trained velocity (with grad); v_old, v_ref:
    constants (v_ref None: no penalty); x_t, x0: (b, C, h, w); t, r: (b,). Returns (loss (b,), terms)."""
    dims = tuple(range(1, x0.dim()))
    t = t.reshape(-1, *[1] * (x0.dim() - 1))
    v_old = v_old.detach()
    # v+ = beta v + (1 - beta) sg(v_old);  v- = (1 + beta) sg(v_old) - beta v
    v_pos = cfg.beta * v + (1 - cfg.beta) * v_old
    v_neg = (1 + cfg.beta) * v_old - cfg.beta * v
    # x0(v) = x_t - t v;  w = sg(mean_dims |x0(v) - x0|)
    err_pos, err_neg = x_t - t * v_pos - x0, x_t - t * v_neg - x0
    weight_pos = err_pos.detach().abs().mean(dims, keepdim=True).clamp(min=1e-5)
    weight_neg = err_neg.detach().abs().mean(dims, keepdim=True).clamp(min=1e-5)
    loss_pos = (err_pos**2 / weight_pos).mean(dims)
    loss_neg = (err_neg**2 / weight_neg).mean(dims)
    # L = A_max [r L+ + (1 - r) L-] / beta  (+ beta_ref mean ||v - v_ref||^2)
    policy = cfg.adv_clip * (r * loss_pos + (1 - r) * loss_neg) / cfg.beta
    ref = (v - v_ref).square().mean(dims) if v_ref is not None else torch.zeros_like(policy)
    return policy + cfg.ref_beta * ref, {"policy_loss": policy.detach(), "ref_dev": ref.detach()}


def old_decay(cfg: NFTConfig, optimizer_steps: int) -> float:
    """d of the old-policy update after `optimizer_steps` optimizer steps (module docstring)."""
    if optimizer_steps < cfg.old_decay_flat:
        return 0.0
    return min(cfg.old_decay_rate * (optimizer_steps - cfg.old_decay_flat), cfg.old_decay_max)


@torch.no_grad()
def update_old(old: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """old <- decay old + (1 - decay) theta."""
    for o, p in zip(old, params):
        o.mul_(decay).add_(p.detach(), alpha=1 - decay)


# a prime offset of the image's seed: its training points draw from another stream than its rollout
POINTS_STREAM = 7919


def training_points(seed: int, step: int, index: int, grid: torch.Tensor, k: int, shape):
    """Image `index`'s K training times (a random order of the grid's t_0..t_{N-1}, the first K) and
    its noise at each, from its own generator (departure 2). Returns (t (K,), eps (K, *shape))."""
    g = torch.Generator().manual_seed(step_seed(seed, step, index) + POINTS_STREAM)
    order = torch.randperm(len(grid) - 1, generator=g)[:k]
    return grid[order], torch.randn((k, *shape), generator=g)


def _nft_checks(cfg: NFTConfig) -> None:
    require_positive(cfg, "beta", "old_decay_rate")
    require(cfg.ref_beta >= 0, f"--ref_beta must be >= 0, got {cfg.ref_beta}")
    require(0 <= cfg.old_decay_max < 1 and cfg.old_decay_flat >= 0,
            "--old_decay_max must be in [0, 1) and --old_decay_flat >= 0")
    require(not cfg.full_finetune,
            "NFT keeps its old policy as a second LoRA adapter: --full_finetune is not supported")


@one_line_stops
def main(argv=None):
    cfg = parse_config(NFTConfig, argv)
    cfg.out = cfg.out or f"runs/nft-{cfg.task}"
    s = stage1.start(cfg, argv, "nft.py", "nft", _nft_checks)
    if s is None:
        return cfg
    dist, task, reward_fn, model, trainer = s.dist, s.task, s.reward_fn, s.model, s.trainer
    old = model.add_frozen_copy(OLD)   # the old policy starts as a copy of the trained weights
    trainer.tensors[OLD] = old         # saved with every checkpoint, restored on --resume
    start = trainer.begin()
    train_prompts, train_metas = load_prompts(task.dataset, "train")
    order, mine = stage1.update_layout(cfg.batch, cfg.updates_per_rollout, dist)
    n_train = len(trained_steps(cfg))  # K training points per image (random grid times, not steps 0..K-1)
    saved = {"task": task.name, "dataset": task.dataset, "reward": task.reward, "guidance": task.guidance,
             "eval_key": task.eval_key, "algorithm": "nft"}

    bar = tqdm(range(start, cfg.steps), desc=f"nft {task.name}", disable=not dist.is_main, initial=start,
               total=cfg.steps)
    for step in bar:
        phase = Phases(dist.device)
        # ---- rollout with the old policy: deterministic sampler, CFG cfg.guidance; keep the clean x0
        with phase("rollout"):
            prompts, metas, seeds = stage1.step_prompts(cfg, step, mine, train_prompts, train_metas)
            embeds = model.encode_prompts(prompts)
            traj = Trajectory.cat([rollout(model, embeds[b:b + cfg.rollout_batch], seeds[b:b + cfg.rollout_batch],
                                           cfg.num_steps, cfg.guidance, 0.0, cfg.height or None, cfg.width or None,
                                           adapter=OLD)
                                   for b in range(0, len(seeds), cfg.rollout_batch)])
            x0, grid = traj.latents[:, -1].contiguous(), traj.t  # (B, C, h, w), (N+1,)

        # ---- reward, gathered over ranks; advantages and optimality probabilities
        with phase("reward"):
            scored = stage1.score(reward_fn, traj.images, prompts, metas, order, cfg, dist)
            r_all = optimality(scored.advantages[mine], cfg.adv_clip)

        # ---- loss at K forward-process points per image
        with phase("train"):
            points = [training_points(cfg.seed, step, i, grid, n_train, x0.shape[1:]) for i in mine]
            t_all = torch.stack([p[0] for p in points])      # (B, K)
            eps_all = torch.stack([p[1] for p in points])    # (B, K, C, h, w)
            per_update = len(seeds) // cfg.updates_per_rollout
            stats = {"policy_loss": 0.0, "ref_dev": 0.0}
            skipped_any = False
            for u in range(cfg.updates_per_rollout):
                losses = []
                for b in range(u * per_update, (u + 1) * per_update, cfg.train_batch):
                    sl = slice(b, min(b + cfg.train_batch, (u + 1) * per_update))
                    x0_b, r_b = x0[sl].to(model.device), r_all[sl].to(model.device)
                    for k in range(n_train):
                        t, eps = t_all[sl, k].to(model.device), eps_all[sl, k].to(model.device)
                        tt = t.reshape(-1, 1, 1, 1)
                        # x_t = (1 - t) x0 + t eps
                        x_t = (1 - tt) * x0_b + tt * eps
                        with torch.no_grad():
                            with model.adapter(OLD):
                                v_old = model.velocity(x_t, t, embeds[sl], cfg.guidance)
                            v_ref = None
                            if cfg.ref_beta > 0:
                                with model.adapter(None):
                                    v_ref = model.velocity(x_t, t, embeds[sl], cfg.guidance)
                        v = model.velocity(x_t, t, embeds[sl], cfg.guidance)
                        loss, terms = nft_loss(v, v_old, v_ref, x_t, x0_b, t, r_b, cfg)
                        (loss.sum() / (per_update * n_train)).backward()
                        losses.append(loss.detach())
                        for key, value in terms.items():
                            stats[key] += value.sum().item() / (len(seeds) * n_train)
                grad_norm, skipped = update_or_stop(trainer, step, losses)
                skipped_any |= skipped
            # ---- the old policy follows the trained one
            decay = old_decay(cfg, (step + 1) * cfg.updates_per_rollout)
            update_old(old, trainer.params, decay)

        # ---- log, evaluate the EMA weights, checkpoint
        own = {"grad_norm": grad_norm, "skipped_nonfinite": int(skipped_any), "old_decay": decay,
               **trainer.mean_over_ranks(stats)}
        stage1.finish_step(cfg, step, s, scored, own, phase, saved, bar)
    trainer.finish()
    dist.close()


if __name__ == "__main__":
    main()
