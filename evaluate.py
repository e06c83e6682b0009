"""The evaluation protocol of paper section 7, shared by teacher_rl.py, nft.py, opd.py and the study.

The deterministic ODE sampler (noise level 0), EVAL_STEPS = 40 steps, CFG EVAL_GUIDANCE = 4.5, one
image per prompt, prompt i of a task's test file always seeded with `seed + i` (whatever the batch or
number of ranks), so every model starts from the same noise. Where the metadata tag prompts (GenEval),
the eval key is GenEval's overall score: the mean over tags of each tag's mean (also reported per tag,
as "strict/<tag>"), so a tag with many prompts does not dominate.

Departures from the paper
1. A mixed multi-task prompt set (metadata with a "task" entry, the multi-task baselines) also
   reports each sub-task's mean reward over its own prompts as "<task>/reward".

Run: a library; `python -m study.table --help` evaluates models from the command line (Table 1).
"""
from __future__ import annotations

import torch

from data import Task, load_prompts
from sample import rollout, save_grid

EVAL_STEPS = 40        # ODE steps at evaluation (paper section 7)
EVAL_GUIDANCE = 4.5    # CFG at evaluation (paper section 7), for every model, teachers included


# ---------------------------------------------------------------------- the protocol
def eval_images(model, prompts: list[str], idx: list[int], steps: int, guidance: float, seed: int, adapter,
                height: int | None = None, width: int | None = None):
    """(len(idx), 3, H, W) images of test prompts idx: the ODE from seed `seed + i` for prompt i, at
    height x width px (None: the model's default resolution)."""
    traj = rollout(model, model.encode_prompts([prompts[i] for i in idx]), [seed + i for i in idx],
                   steps, guidance, 0.0, height, width, adapter=adapter)
    return traj.images


def _info_key(info: dict, key: str) -> str:
    """`key` itself, or the composed reward's prefixed "<reward>/<key>"."""
    found = [k for k in info if k == key or k.endswith("/" + key)]
    if len(found) != 1:
        raise ValueError(f"reward info has no unique {key!r} entry: {sorted(info)}")
    return found[0]


@torch.no_grad()
def evaluate_task(model, task: Task, reward_fn, dist, adapter=None, n_prompts: int = 64,
                  steps: int = EVAL_STEPS, guidance: float = EVAL_GUIDANCE, seed: int = 0, batch: int = 32,
                  grid_path: str | None = None, per_prompt: dict | None = None, height: int | None = None,
                  width: int | None = None) -> dict:
    """Mean reward (and the task's eval key, e.g. GenEval strict accuracy) over the first
    `n_prompts` test prompts at height x width px, every one of them whatever the number of ranks (each
    rank takes a contiguous share; the last ranks pad theirs with the last prompt, whose extra copies are
    dropped), `batch` images per forward; rank 0 optionally writes a PNG grid.
    Also the mean of every other per-image term the reward reports (its `info`), under its own name.
    On a mixed prompt set (every metadata names its "task") also "<task>/reward" per sub-task.
    `per_prompt`, if given, receives each prompt's values ("reward", the eval key) and "tags", from
    which `reported` recomputes the reported numbers and `interval` their bootstrap intervals."""
    return evaluate_tasks(model, [task], [reward_fn], dist, adapter, n_prompts, steps, guidance, seed, batch,
                          grid_path, [per_prompt], height, width)[0]


@torch.no_grad()
def evaluate_tasks(model, tasks: list[Task], reward_fns: list, dist, adapter=None, n_prompts: int = 64,
                   steps: int = EVAL_STEPS, guidance: float = EVAL_GUIDANCE, seed: int = 0, batch: int = 32,
                   grid_path: str | None = None, per_prompt: list | None = None, height: int | None = None,
                   width: int | None = None, export: str | None = None) -> list[dict]:
    """evaluate_task for several tasks of one prompt set: each batch of images is generated once and
    scored by every task's reward (Table 1's PickScore, CLIPScore, HPSv2.1 and aesthetic columns come from
    one set of images). `per_prompt`: one dict (or None) per task. `export`: also write every image in
    the official GenEval evaluator's layout, export/<index:05d>/{metadata.jsonl, samples/0000.png}."""
    if len({t.dataset for t in tasks}) != 1:
        raise ValueError(f"evaluate_tasks scores one prompt set; got {sorted({t.dataset for t in tasks})}")
    prompts, metas = load_prompts(tasks[0].dataset, "test")
    n = min(n_prompts, len(prompts))
    per_rank = -(-n // dist.world)  # ceil: equal shares for the all_gather, padded past the last prompt
    mine = [min(i, n - 1) for i in range(dist.rank * per_rank, (dist.rank + 1) * per_rank)]
    scored, images = [{"scores": [], "keyed": [], "terms": {}} for _ in tasks], []
    for lo in range(0, per_rank, batch):
        idx = mine[lo:lo + batch]
        imgs = eval_images(model, prompts, idx, steps, guidance, seed, adapter, height, width)
        for task, reward_fn, acc in zip(tasks, reward_fns, scored):
            s, info = reward_fn(imgs, [prompts[i] for i in idx], [metas[i] for i in idx])
            key = _info_key(info, task.eval_key) if task.eval_key else None
            acc["scores"].append(s)
            acc["keyed"].append(info[key] if key else s)
            for k, v in info.items():  # the reward's other per-image terms (e.g. a judge's sub-scores)
                if k != key:
                    acc["terms"].setdefault(k, []).append(v.float())
        images.append(imgs.cpu())
        if export:
            _export_geneval(export, imgs, [i for i in range(dist.rank * per_rank + lo, dist.rank * per_rank + lo +
                                                            len(idx)) if i < n], metas)
    if grid_path and dist.is_main:
        save_grid(torch.cat(images)[:16], grid_path, scale=4)
    return [_reported(task, acc, metas, n, dist, (per_prompt or [None] * len(tasks))[k])
            for k, (task, acc) in enumerate(zip(tasks, scored))]


def _reported(task: Task, acc: dict, metas: list[dict], n: int, dist, per_prompt: dict | None) -> dict:
    """One task's numbers from this rank's scores (evaluate_tasks), gathered over the ranks."""
    # ranks hold contiguous slices in rank order: all_scores[i] is prompt i's score (the padding dropped)
    def gather(values):
        return dist.all_gather(torch.cat(values).to(dist.device)).cpu()[:n]
    all_scores = gather(acc["scores"])
    result = {"reward": all_scores.mean().item()}
    for k, v in acc["terms"].items():  # mean of each term; a term that is the score itself is not repeated
        v = gather(v)
        if not torch.equal(v, all_scores.to(v.dtype)):
            result[k] = v.mean().item()
    if task.eval_key:
        all_keyed = gather(acc["keyed"])
        tags = [m.get("tag") for m in metas[:n]]
        if all(tags):  # GenEval: the overall score is the mean of the per-tag means
            per_tag = {tag: all_keyed[[i for i, g in enumerate(tags) if g == tag]].mean().item()
                       for tag in dict.fromkeys(tags)}
            result[task.eval_key] = sum(per_tag.values()) / len(per_tag)
            result.update({f"{task.eval_key}/{tag}": v for tag, v in per_tag.items()})
        else:
            result[task.eval_key] = all_keyed.mean().item()
        if per_prompt is not None:
            per_prompt[task.eval_key] = all_keyed.tolist()
    subtasks = [m.get("task") for m in metas[:n]]
    if all(subtasks):
        for sub in sorted(set(subtasks)):
            rows = [i for i, s in enumerate(subtasks) if s == sub]
            result[f"{sub}/reward"] = all_scores[rows].mean().item()
    if per_prompt is not None:
        per_prompt["reward"] = all_scores.tolist()
        tags = [m.get("tag") for m in metas[:n]]
        per_prompt["tags"] = tags if all(tags) else None
    return result


def _export_geneval(folder: str, images: torch.Tensor, indices: list[int], metas: list[dict]) -> None:
    """Images of test prompts `indices` in the layout of GenEval's evaluate_images.py (one sample each):
    folder/<index:05d>/metadata.jsonl (the prompt's metadata line) and folder/<index:05d>/samples/0000.png."""
    import json
    from pathlib import Path

    import numpy as np
    from PIL import Image
    for img, i in zip(images, indices):
        sample = Path(folder) / f"{i:05d}"
        (sample / "samples").mkdir(parents=True, exist_ok=True)
        (sample / "metadata.jsonl").write_text(json.dumps(metas[i]) + "\n")
        arr = (img.float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(sample / "samples" / "0000.png")


def evaluate_student(trainer, tasks: list[Task], rewards: dict, dist, cfg, step: int, guidance: float,
                     per_task_keys: bool) -> tuple[dict, dict]:
    """The EMA student of a training run (`trainer`: student.StudentTrainer) on every task, with the
    protocol above at `guidance` (the CFG the model samples with), cfg.eval_prompts test prompts,
    cfg.eval_steps steps, the run's resolution (cfg.height x cfg.width) and cfg.eval_batch; a PNG grid per
    task in the run's samples/. Returns (metrics, images):
    {"eval/<task>/<key>" (per_task_keys) or "eval/<key>": value, "sec/eval": seconds} and {tag: png path}."""
    import time

    from tqdm import tqdm
    t0, metrics, images = time.perf_counter(), {}, {}
    with trainer.ema_weights():
        for task in tasks:
            suffix = f"_{task.name}" if per_task_keys else ""
            tag = f"samples/{task.name}" if per_task_keys else "samples"
            images[tag] = f"{trainer.run.path}/samples/step{step + 1:05d}{suffix}.png"
            res = evaluate_task(trainer.model, task, rewards[task.name], dist, "student", cfg.eval_prompts,
                                cfg.eval_steps, guidance, batch=cfg.eval_batch, grid_path=images[tag],
                                height=cfg.height or None, width=cfg.width or None)
            prefix = f"eval/{task.name}/" if per_task_keys else "eval/"
            metrics.update({prefix + k: v for k, v in res.items()})
            if dist.is_main:
                tqdm.write(f"step {step + 1} evaluation of {task.name} (EMA student, ODE "
                           f"{cfg.eval_steps} steps): " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()))
    metrics["sec/eval"] = time.perf_counter() - t0
    return metrics, images


# ---------------------------------------------------------------------- uncertainty
def reported(values, tags=None) -> float:
    """The reported number of per-prompt values: their mean, or with GenEval's tags the mean over tags
    of each tag's mean (GenEval's overall score)."""
    import numpy as np
    values = np.asarray(values, dtype=np.float64)
    if tags is None:
        return float(values.mean())
    tags = np.asarray(tags)
    return float(np.mean([values[tags == tag].mean() for tag in dict.fromkeys(tags.tolist())]))


def bootstrap_picks(rng, groups: list, n_boot: int) -> list:
    """For each group (an index array), the positions within it that n_boot bootstrap draws resample:
    [(n_boot, len(group)) int arrays]. One call of rng, in the order n_boot successive draws of
    `rng.integers(0, n_g, n_g)` per group would take them (numpy's stream is the same either way)."""
    import numpy as np
    sizes = np.concatenate([np.full(len(g), len(g)) for g in groups])
    draws = rng.integers(0, np.tile(sizes, n_boot)).reshape(n_boot, -1)
    bounds = np.cumsum([0] + [len(g) for g in groups])
    return [draws[:, lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]


def interval(values, tags=None, other=None, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of `reported(values)` over prompts (resampled within each tag
    when there are tags); with `other` (the same prompts and seeds for another model), the interval of
    the paired difference reported(values) - reported(other)."""
    import numpy as np
    values = np.asarray(values, dtype=np.float64)
    rows = values[None] if other is None else np.stack([values, np.asarray(other, dtype=np.float64)])
    rng = np.random.default_rng(seed)
    groups = [np.arange(len(values))] if tags is None else \
        [np.flatnonzero(np.asarray(tags) == tag) for tag in dict.fromkeys(list(tags))]
    means = [rows[:, g[picks]].mean(-1) for g, picks in zip(groups, bootstrap_picks(rng, groups, n_boot))]
    both = np.mean(means, axis=0)                     # (rows, n_boot): each draw's reported number
    stats = both[0] - both[1] if other is not None else both[0]
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return float(lo), float(hi)
