"""Which half of classifier-free guidance carries the difference between two models on one task.

CFG (paper section 2) adds two velocities of one network: v = v_u + w (v_c - v_u), the unconditional
v_u (empty prompt, one field shared by every prompt and every task) and the conditional v_c (the
prompt's). Two LoRAs A and B on the same base give four samplers, v = v_u^X + w (v_c^Y - v_u^X) for
X, Y in {A, B}; each is evaluated with the protocol of evaluate.py (40-step ODE, CFG 4.5, prompt i
seeded seed + i), so the four share every seed. If swapping in B's v_c turns A's score into B's,
the difference lives in the conditional branch, i.e. in how the model reads the task's prompts;
if swapping v_u does, it lives in the shared unconditional field.

Why a student would need it: OPD trains the student's guided velocity, both halves. A CFG-free
teacher (guidance 1) and CFG-4.5 teachers supervise one shared v_u, so one task could reach another
through it; or the tasks' prompts could be too alike for the student's v_c to tell apart.
The toy study of 2026-11-30 used it to tell the two apart on the first toy world, v1 (docs/stage1.md
at commit 6f80e1b).

Departures: none from the paper's protocol; the mixed sampler is an instrument, not a method.

Run (CPU, about 1 min per sampler and 100 prompts):
    python -m study.branches --model models/toy-sd3 --a runs/opd --b runs/opd-no-aesthetic --task geneval
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from data import load_task, task_dataset
from evaluate import EVAL_GUIDANCE, EVAL_STEPS, evaluate_task, interval
from model import FlowModel
from rewards import make_reward
from student import check_same_base
from study.table import resolve_adapter
from plumbing.config import base_recipe, option, parse_config
from plumbing.dist import Dist
from plumbing.model_files import check_model_path


class SplitGuidance:
    """A FlowModel whose guided velocity takes its unconditional half from adapter `uncond` and its
    conditional half from adapter `cond` (None: the base). Everything else is the wrapped model's."""

    def __init__(self, model: FlowModel, uncond: str | None, cond: str | None):
        self.model, self.uncond, self.cond = model, uncond, cond

    def __getattr__(self, name):
        return getattr(self.model, name)

    def velocity(self, x, t, embeds, guidance: float) -> torch.Tensor:
        # v = v_u^X + w (v_c^Y - v_u^X)
        with self.model.adapter(self.uncond):
            v_u = self.model.velocity(x, t, self.model.negative(len(embeds)), 1.0)
        with self.model.adapter(self.cond):
            v_c = self.model.velocity(x, t, embeds, 1.0)
        return v_u + guidance * (v_c - v_u)


@dataclass
class BranchesConfig:
    """Sample one task with each half of CFG taken from adapter A or B (four samplers, shared seeds) and
    report the task's metric, its interval, and each sampler's paired difference from A."""
    model: str = option("models/toy-sd3", "the base both adapters were trained on")
    a: str = option("", "LoRA folder or run directory (its checkpoint/)")
    b: str = option("", "the other one")
    task: str = option("geneval", "a task of the base's recipe (the toy world's), or any name with --dataset")
    dataset: str = option("", "a prompt folder with test.txt and task.json (data.load_task)")
    prompts: int = option(192, "first N test prompts")
    steps: int = EVAL_STEPS
    guidance: float = EVAL_GUIDANCE
    seed: int = 0
    batch: int = 32
    out: str = option("", "optional JSON of the four results and their per-prompt values")


def main(argv=None) -> dict:
    cfg = parse_config(BranchesConfig, argv)
    try:
        if not cfg.a or not cfg.b:
            raise ValueError("--a and --b must each name a LoRA folder or a run directory")
        adapters = {"A": resolve_adapter(cfg.a), "B": resolve_adapter(cfg.b)}
        task = load_task(cfg.task, task_dataset(cfg.task, cfg.dataset, base_recipe(cfg.model)))
        check_model_path(cfg.model)
        model = FlowModel.load(cfg.model)
        for name, folder in adapters.items():
            check_same_base(folder, model)
            model.load_lora(folder, name)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    dist = Dist("cpu")
    reward = make_reward(task.reward)
    key = task.eval_key or "reward"
    results = {}
    for u, c in (("A", "A"), ("B", "A"), ("A", "B"), ("B", "B")):
        per_prompt = {}
        res = evaluate_task(SplitGuidance(model, u, c), task, reward, dist, None, cfg.prompts, cfg.steps,
                            cfg.guidance, cfg.seed, cfg.batch, per_prompt=per_prompt)
        lo, hi = interval(per_prompt[key], per_prompt["tags"])
        results[f"u={u},c={c}"] = {"result": res, "interval": [lo, hi], "per_prompt": per_prompt}
        tags = {k.split("/", 1)[1]: v for k, v in res.items() if k.startswith(key + "/")}
        print(f"v_u from {u}, v_c from {c}: {key} {res[key]:.3f} [{lo:.3f}, {hi:.3f}]"
              + ("  " + " ".join(f"{t} {v:.2f}" for t, v in tags.items()) if tags else ""), flush=True)
    base = results["u=A,c=A"]["per_prompt"]
    for name in ("u=B,c=A", "u=A,c=B", "u=B,c=B"):
        lo, hi = interval(results[name]["per_prompt"][key], base["tags"], other=base[key])
        results[name]["minus_A"] = [lo, hi]
        print(f"{name} minus A: [{lo:+.3f}, {hi:+.3f}] (paired over prompts)")
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps({"a": adapters["A"], "b": adapters["B"], "task": task.name,
                                             "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
