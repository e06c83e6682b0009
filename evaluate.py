"""Evaluation: a model (base + optional adapter) on a task's held-out prompts (paper section 7).

The protocol of the paper: the deterministic ODE sampler (noise level 0), 40 steps, CFG 4.5, one
image per prompt with a fixed seed per prompt (prompt i of the test file always uses seed
`seed + i`, whatever the batch or number of ranks), so every model sees the same starting noise.

Run: a library for now (teacher_rl.py and opd.py evaluate with it).
"""
from __future__ import annotations

import torch

from data import Task, load_prompts
from sample import rollout, save_grid


def _info_key(info: dict, key: str) -> str:
    """`key` itself, or the composed reward's prefixed "<reward>/<key>"."""
    found = [k for k in info if k == key or k.endswith("/" + key)]
    assert len(found) == 1, f"reward info has no unique {key!r} entry: {sorted(info)}"
    return found[0]


@torch.no_grad()
def evaluate_task(model, task: Task, reward_fn, dist, adapter=None, n_prompts: int = 64, steps: int = 40,
                  guidance: float = 4.5, seed: int = 0, batch: int = 32, grid_path: str | None = None) -> dict:
    """Mean reward (and the task's eval key, e.g. GenEval strict accuracy) over the first
    `n_prompts` test prompts, split across ranks; rank 0 optionally writes a PNG grid."""
    prompts, metas = load_prompts(task.dataset, "test")
    n = min(n_prompts, len(prompts))
    n -= n % dist.world  # every rank evaluates the same number of prompts
    assert n > 0, f"{task.name}: fewer test prompts than ranks"
    mine = range(*dist.split(n, "evaluation prompts").indices(n))
    scores, keyed, images = [], [], []
    for lo in range(mine.start, mine.stop, batch):
        idx = list(range(lo, min(lo + batch, mine.stop)))
        traj = rollout(model, model.encode_prompts([prompts[i] for i in idx]), [seed + i for i in idx],
                       steps, guidance, 0.0, adapter=adapter)
        s, info = reward_fn(traj.images, [prompts[i] for i in idx], [metas[i] for i in idx])
        scores.append(s)
        keyed.append(info[_info_key(info, task.eval_key)] if task.eval_key else s)
        images.append(traj.images.cpu())
    result = {"reward": dist.all_gather(torch.cat(scores).to(dist.device)).mean().item()}
    if task.eval_key:
        result[task.eval_key] = dist.all_gather(torch.cat(keyed).to(dist.device)).mean().item()
    if grid_path and dist.is_main:
        save_grid(torch.cat(images)[:16], grid_path, scale=4)
    return result
