"""What the Stage-1 teacher scripts share (paper section 8): teacher_rl.py (Flow-GRPO, GRPO-Guard)
and nft.py (DiffusionNFT) differ in their losses only; everything around the loss is here.

- `Stage1Config`: the fields both read (task, prompt batch of P prompts x G images, sampling steps,
  CFG, advantage normalisation), with Flow-GRPO's and NVlabs' SD3.5-M values as defaults.
- `start`: parse-time to first step: the checks of every input before any model loads (`validate`),
  the model and the trainable student (student.StudentTrainer).
- One step's data: `step_prompts` (P prompts, each G times, seeded per global image), `update_layout`
  (which global images each rank holds, so that 1 and N ranks make the same updates), `score`
  (rewards gathered over ranks, then `group_advantages`).
- `finish_step`: evaluation of the EMA weights (evaluate.evaluate_student), the metrics line, the
  checkpoint.

Advantages (section 8a): A_i = (r_i - mean_group) / (std + 1e-4), clipped to +-adv_clip, the std over
the image's group (`per_group_std`, GRPO-Guard) or over the whole batch (Flow-GRPO's global_std, NFT).

Departures: each script's docstring lists its own; the ones made here are teacher_rl.py's 3-4
(rank layout, groups) and student.py's 2 (seeds).

Run: a library; `python teacher_rl.py --help`, `python nft.py --help`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import torch

from data import check_prompts, load_prompts, load_task
from evaluate import evaluate_student
from model import LORA_TARGETS
from rewards import check_spec, make_reward, reward_bytes
from sample import trained_steps
from student import (StudentConfig, StudentTrainer, check_same_base, check_student_config, load_base, peak_memory,
                     step_seed)
from plumbing.config import apply_recipe, config_dict, describe_recipe, given_keys, option, require, require_positive
from plumbing.dist import Dist, print_main
from plumbing.memory import plan_run
from plumbing.stops import fail
from plumbing.rundir import RunDir
from plumbing.model_files import (SD35_MEDIUM, check_lora_folder, check_model_path, check_model_resolution,
                                  portable_path, resolve_dtype)


@dataclass
class Stage1Config(StudentConfig):
    """Fields every Stage-1 script shares (teacher_rl.py, nft.py); LoRA, AdamW, EMA, evaluation and
    checkpoints are in student.StudentConfig. Defaults: Flow-GRPO's and NVlabs' SD3.5-M recipes."""
    model: str = option(SD35_MEDIUM, "base pipeline folder or hub id")
    task: str = option("geneval", "task name; its prompts: --dataset, else dataset/<task>")
    dataset: str = option("", "Flow-GRPO prompt folder (train.txt, test.txt, metadata)")
    reward: str = option("", "\"name=w,name=w\"; default: the dataset's task.json")
    out: str = option("", "run directory; default runs/<script>-<task>")
    init_lora: str = option("", "start from this adapter (cascade baseline)")
    seed: int = 0
    steps: int = option(60, "rollout steps of --batch images, each --updates_per_rollout optimizer steps (the "
                            "paper's teachers: 1,120-2,900 on 8 GPUs, docs/sd35.md)")
    batch: int = option(1152, "images per step over all ranks = prompts x group_size (48 x 24)")
    group_size: int = option(24, "G images per prompt")
    updates_per_rollout: int = option(2, "optimizer steps per rollout batch")
    rollout_batch: int = option(9, "images per forward pass during rollouts (per rank)")
    train_batch: int = option(9, "images per forward/backward during training (per rank)")
    num_steps: int = option(10, "sampling steps N")
    guidance: float = option(4.5, "CFG during rollouts and training")
    timestep_fraction: float = option(0.99, "train K = int(fraction * N) steps")
    per_group_std: bool = option(False, "False: divide by the std over the whole batch (global_std)")
    adv_clip: float = option(5.0, "advantages clipped to +-adv_clip")


def group_advantages(rewards: torch.Tensor, group_size: int, per_group_std: bool, clip: float):
    """A = (r - mean_group) / (std + 1e-4), std per group or over the batch; rewards (P*G,) grouped
    contiguously. Returns (A (P*G,), fraction of groups whose rewards are all equal)."""
    r = rewards.view(-1, group_size).double()
    mean = r.mean(1, keepdim=True)
    std = r.std(1, keepdim=True, unbiased=False) if per_group_std else r.std(unbiased=False).expand_as(mean)
    adv = ((r - mean) / (std + 1e-4)).clamp(-clip, clip)
    zero = (r.max(1).values == r.min(1).values).float().mean().item()
    return adv.flatten().float(), zero


def update_layout(batch: int, updates: int, dist: Dist) -> tuple[list[int], list[int]]:
    """Which of the step's `batch` images (global index, grouped by prompt) each rank holds, so that
    optimizer step u trains on global images [u batch/U, (u+1) batch/U) whatever the world size: the
    run is the same on 1 or N ranks. Returns (order: the global index of each row of an all_gather,
    mine: this rank's global indices, in its row order)."""
    per_update = batch // updates
    share = per_update // dist.world   # this rank's rows of one update
    order = [u * per_update + r * share + i
             for r in range(dist.world) for u in range(updates) for i in range(share)]
    per_rank = batch // dist.world
    return order, order[dist.rank * per_rank:(dist.rank + 1) * per_rank]


def validate(cfg, dist: Dist, argv, script: str, recipe: str, checks, own_recipe=None) -> tuple:
    """The checks every Stage-1 script shares (recipe, LoRA/AdamW/EMA fields, the batch of groups and its
    split into updates and ranks, model, resolution, init adapter, task and prompts), then `checks(cfg)`
    (the algorithm's own), the memory plan (plumbing.memory.plan_run, applied to cfg), then the run directory and
    the reward. `own_recipe(cfg)` (recipe files, e.g. [teacher_rl.GUARD_RECIPE]) is applied after the base's
    recipe, to the keys the command line does not set. Every bad input fails here with a one-line error, before
    any model loads or anything is written. Returns (task, reward_fn, run); reward_fn is None with
    --dry_run."""
    try:
        given = given_keys(type(cfg), argv)
        cfg.model = portable_path(cfg.model)  # inside the repository: stored relative to it, as datasets are
        cfg.init_lora = portable_path(cfg.init_lora) if cfg.init_lora else ""
        changed = apply_recipe(cfg, given, cfg.model, recipe, own_recipe(cfg) if own_recipe else [])
        cfg.dtype = resolve_dtype(cfg.dtype, dist.device, cfg.full_finetune)
        check_student_config(cfg)
        require_positive(cfg, "batch", "group_size", "rollout_batch", "train_batch", "num_steps", "adv_clip",
                         "updates_per_rollout")
        require(cfg.group_size >= 2, f"--group_size must be >= 2 (advantages compare images of one prompt), "
                                     f"got {cfg.group_size}")
        require(0 < cfg.timestep_fraction <= 1,
                f"--timestep_fraction must be in (0, 1], got {cfg.timestep_fraction}")
        require(cfg.batch % cfg.group_size == 0,
                f"--group_size {cfg.group_size} does not divide the global --batch {cfg.batch}")
        require(cfg.batch % (cfg.updates_per_rollout * dist.world) == 0, batch_error(cfg, dist.world))
        checks(cfg)
        check_model_path(cfg.model)
        check_model_resolution(cfg.model, cfg.height, cfg.width)
        if cfg.init_lora:
            check_lora_folder(cfg.init_lora)
        task = load_task(cfg.task, cfg.dataset, cfg.reward, cfg.guidance)
        load_prompts(task.dataset, "train"), load_prompts(task.dataset, "test")
        check_prompts(task)  # what the reward reads of every prompt (OCR: its quoted target)
        kind = {"teacher_rl": "grpo", "nft": "nft"}[recipe]
        plan = plan_run(kind, cfg, dist, given | set(changed), reward_bytes([task.reward]),
                        trained=len(trained_steps(cfg)), lora_targets=LORA_TARGETS,
                        adapters=1 if kind == "nft" else 0)  # NFT's old policy: a second LoRA
        run = RunDir(cfg.out, cfg, dist, script, argv)
        for adapter in filter(None, [cfg.init_lora, run.resume_from and str(run.resume_from)]):
            check_same_base(adapter, cfg.model)  # its recorded base against this base's stored weights
        needs = check_spec(task.reward, build=True) if cfg.dry_run else []   # built on the CPU, not kept
        with dist.local_first():
            reward_fn = None if cfg.dry_run else make_reward(task.reward, device=dist.device)
        print_main(dist, *filter(None, [plan, describe_recipe(cfg, changed, given)]), *needs)
        return task, reward_fn, run
    except (ValueError, FileNotFoundError, KeyError, ImportError) as e:
        fail(e)


def batch_error(cfg, world: int) -> str:
    """The one-line error of a --batch that does not split into equal shares: the nearest batches that do
    (multiples of the group size and of updates x ranks) and the images per GPU each gives."""
    step = math.lcm(cfg.group_size, cfg.updates_per_rollout * world)
    lo, hi = cfg.batch // step * step, (cfg.batch // step + 1) * step
    use = " or ".join(f"--batch {n} ({n // world} images per GPU)" for n in (lo, hi) if n)
    return (f"--batch {cfg.batch} does not split into {cfg.updates_per_rollout} updates (--updates_per_rollout) "
            f"of equal shares over {world} ranks: use {use}")


@dataclass
class Started:
    """What a Stage-1 script trains with once every input is checked and the model loaded (`start`)."""
    dist: Dist
    task: object                # data.Task
    reward_fn: object           # fn(images, prompts, metadata) -> (scores, info)
    model: object               # model.FlowModel
    trainer: StudentTrainer     # its run folder: trainer.run


def start(cfg, argv, script: str, recipe: str, checks, own_recipe=None, ema_calls: int = 1):
    """Parse-time to first step of a Stage-1 script: devices, the checks, the model and its trainable
    student (fresh LoRA or --init_lora; its EMA called `ema_calls` times per optimizer step, the
    reference's pattern: student.EMA). Returns a Started, or None after printing the resolved config
    with --dry_run (nothing loaded, nothing written)."""
    try:
        dist = Dist(cfg.device, plan_only=cfg.dry_run, timeout_s=cfg.collective_timeout_s)
    except ValueError as e:
        fail(e)
    task, reward_fn, run = validate(cfg, dist, argv, script, recipe, checks, own_recipe)
    if cfg.dry_run:
        print_main(dist, "dry run: every input checked; the resolved config:",
                   json.dumps(config_dict(cfg), indent=2))
        return None
    try:
        model = load_base(cfg, dist)  # --dtype, the plan's placement
        trainer = StudentTrainer(model, cfg, dist, run, ema_calls)  # LoRA/full FT, --init_lora, AdamW, EMA, resume
    except (ValueError, FileNotFoundError) as e:
        fail(e)
    return Started(dist, task, reward_fn, model, trainer)


def step_prompts(cfg, step: int, mine: list[int], train_prompts, train_metas):
    """The step's P prompts x G images of this rank: (prompts, metadatas, seeds); image i of the step
    (global index) is seeded step_seed(seed, step, i), so any rollout can be regenerated."""
    rng = np.random.default_rng([cfg.seed, step])
    n_prompts = cfg.batch // cfg.group_size
    chosen = rng.choice(len(train_prompts), n_prompts, replace=len(train_prompts) < n_prompts)
    idx = np.repeat(chosen, cfg.group_size)[mine]  # groups are contiguous; they may span ranks
    return ([train_prompts[i] for i in idx], [train_metas[i] for i in idx],
            [step_seed(cfg.seed, step, i) for i in mine])


@dataclass
class Scored:
    """A step's rewards over all ranks (`score`)."""
    scores: torch.Tensor        # (batch,) every image's reward, in global image order
    advantages: torch.Tensor    # (batch,) group advantages
    zero_std: float             # the fraction of groups whose rewards are all equal
    info: dict                  # this rank's per-image terms of the reward


def score(reward_fn, images, prompts, metas, order, cfg, dist) -> Scored:
    """Rewards of this rank's images, gathered into global image order; group advantages."""
    scores, info = reward_fn(images, prompts, metas)
    all_scores = torch.empty(cfg.batch)
    all_scores[order] = dist.all_gather(scores.to(dist.device)).cpu()
    adv_all, zero_std = group_advantages(all_scores, cfg.group_size, cfg.per_group_std, cfg.adv_clip)
    return Scored(all_scores, adv_all, zero_std, info)


def gathered_means(values: dict, prefix: str, dist) -> dict:
    """{prefix + key: the mean over every rank's values} of per-image tensors (a reward's info)."""
    return {f"{prefix}{k}": dist.all_gather(v.to(dist.device)).mean().item() for k, v in values.items()}


def finish_step(cfg, step: int, s: Started, scored: Scored, own: dict, phase, saved: dict, bar) -> None:
    """The end of a Stage-1 step: its metrics (the rewards, their terms and the seconds per phase every
    Stage-1 script logs, with the algorithm's `own`), the EMA weights evaluated on the task's test prompts
    (evaluate.py, at the guidance the model samples with) every eval_every steps and at the end, the log
    line, the checkpoint."""
    trainer, dist = s.trainer, s.dist
    metrics = {"step": step, "reward_mean": scored.scores.mean().item(), "reward_std": scored.scores.std().item(),
               "zero_std_groups": scored.zero_std, **own, **gathered_means(scored.info, "reward/", dist),
               **{f"sec/{k}": v for k, v in phase.sec.items()}}
    last, images = step + 1 == cfg.steps, {}
    metrics["images"] = (step + 1) * cfg.batch  # training images so far (the x axis of study.plots' curves)
    if (step + 1) % cfg.eval_every == 0 or last:
        evaluated, images = evaluate_student(trainer, [s.task], {s.task.name: s.reward_fn}, dist, cfg, step,
                                             cfg.guidance, per_task_keys=False)
        metrics.update(evaluated)
    metrics.update(peak_memory(dist.device))
    trainer.run.log(metrics, images)
    bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}")
    if (step + 1) % cfg.save_every == 0 or last:
        trainer.save(step + 1, saved)
    trainer.stop_if_terminated(step, saved)  # SIGTERM: this step saved, then one line and exit 143
