"""The framing instrument of the candidate toy world (toy/framed.py): which camera framing (ZOOMS) a
model draws for each task's test prompts, and what each task's reward pays at each framing.

That world's tasks conflict through one property of the image, the framing (zoom about the
centre; docs/toy-world.md, "The third design"): GenEval's multi-object prompts and OCR want the wide framing, the
aesthetic judge a close-up. This module samples a model with evaluate.py's protocol (40-step ODE,
prompt i seeded i, the first --prompts test prompts of each task, at each --guidance) and reads the
framing of every image with framed.estimate_zoom (the ZOOMS render of the prompt whose foreground
overlaps the image's most). It prints and writes (--out, JSON):
  share[task][zoom]         the share of the task's images at each framing (the pretraining renders:
                            1/3 each, on every task);
  reward[task][zoom]        the task's mean reported metric (GenEval strict, else the reward) over the
                            images at that framing;
  render[task][zoom]        the same metric on the prompt's pretraining render at that framing (the
                            ceiling: a sample is as good as its render or worse);
  per_image[task]           (zoom, IoU, metric) of every image, for paired comparisons.

Run (CPU, ~1 min a model and CFG for 60 prompts a task; --renders: seconds):
  python -m toy.framing --renders 300        # the metric of each task at each framing, on renders
  python -m toy.framing --compare runs/framing/aesthetic.json runs/framing/base.json@1.0   # paired, per task
  python -m toy.framing --model runs/toy3-sd3 --guidance 4.5 1.0 --out runs/framing/base.json
  python -m toy.framing --model runs/toy3-sd3 --adapter runs/toy3-aesthetic --guidance 1.0 \\
      --out runs/framing/aesthetic.json
(runs/toy3-sd3: the candidate's base, docs/toy-world.md; runs/toy3-aesthetic: a teacher trained on it)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from data import load_prompts, load_task
from evaluate import EVAL_STEPS, _info_key, eval_images
from rewards import make_reward
from toy import framed


def task_metric(task, images, prompts, metas, reward_fn) -> list[float]:
    """Per-image reported metric of `task` (its eval_key, e.g. GenEval strict, else the reward)."""
    scores, info = reward_fn(images, prompts, metas)
    return (info[_info_key(info, task.eval_key)] if task.eval_key else scores).tolist()


@torch.no_grad()
def measure(model, adapter, tasks: list[str], n_prompts: int, guidance: float, steps: int = EVAL_STEPS,
            seed: int = 0, batch: int = 32) -> dict:
    """{"share", "reward", "render", "per_image"} (module docstring) of one model at one CFG."""
    result = {"share": {}, "reward": {}, "render": {}, "per_image": {}}
    for name in tasks:
        task = load_task(name, f"{framed.DATA}/{name}")
        reward_fn = make_reward(task.reward)
        prompts, metas = load_prompts(task.dataset, "test")
        n = min(n_prompts, len(prompts))
        rows = []
        for lo in range(0, n, batch):
            idx = list(range(lo, min(n, lo + batch)))
            images = eval_images(model, prompts, idx, steps, guidance, seed, adapter)
            metric = task_metric(task, images, [prompts[i] for i in idx], [metas[i] for i in idx], reward_fn)
            for k, i in enumerate(idx):
                zoom, iou = framed.estimate_zoom(images[k], name, metas[i])
                rows.append((zoom, iou, metric[k]))
        renders = {}
        for zoom in framed.ZOOMS:  # the ceiling: each prompt's pretraining render at this framing
            rng = np.random.default_rng(seed)
            drawn = torch.from_numpy(np.stack([framed.render(name, metas[i], rng, zoom) for i in range(n)]))
            drawn = drawn.permute(0, 3, 1, 2).float() / 255
            renders[zoom] = float(np.mean(task_metric(task, drawn, prompts[:n], metas[:n], reward_fn)))
        result["share"][name] = {str(z): float(np.mean([r[0] == z for r in rows])) for z in framed.ZOOMS}
        result["reward"][name] = {str(z): (float(np.mean([r[2] for r in rows if r[0] == z]))
                                           if any(r[0] == z for r in rows) else None) for z in framed.ZOOMS}
        result["render"][name] = {str(z): v for z, v in renders.items()}
        result["per_image"][name] = rows
    return result


def render_table(n: int = 300, seed: int = 0) -> str:
    """Markdown: each task's reported metric on `n` pretraining renders at each framing of ZOOMS (GenEval
    also per tag): the conflict the world is built on (docs/toy-world.md, "The third design")."""
    rng = np.random.default_rng(seed)
    lines = ["| reported metric on renders | " + " | ".join(f"zoom {z}" for z in framed.ZOOMS) + " |",
             "|---|" + "---:|" * len(framed.ZOOMS)]
    for name in framed.TASKS:
        task = load_task(name, f"{framed.DATA}/{name}")
        reward_fn = make_reward(task.reward)
        cells, tags = [], {}
        for zoom in framed.ZOOMS:
            scenes = [framed.sample_scene(name, rng) for _ in range(n)]
            drawn = torch.from_numpy(np.stack([framed.render(name, m, rng, zoom) for _, m in scenes]))
            metric = task_metric(task, drawn.permute(0, 3, 1, 2).float() / 255, [p for p, _ in scenes],
                                 [m for _, m in scenes], reward_fn)
            cells.append(float(np.mean(metric)))
            for (_, meta), value in zip(scenes, metric):
                if "tag" in meta:
                    tags.setdefault(meta["tag"], {}).setdefault(zoom, []).append(value)
        lines.append(f"| {name} {task.eval_key or 'reward'} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
        for tag, by_zoom in tags.items():
            lines.append(f"| - {tag} | " + " | ".join(f"{np.mean(by_zoom[z]):.2f}" for z in framed.ZOOMS) + " |")
    return "\n".join(lines) + "\n"


def paired_differences(a: dict, b: dict, n_boot: int = 2000, seed: int = 0) -> dict:
    """{task: (mean metric of a - of b, 95% paired bootstrap interval over prompts)} of two measurements
    (measure's results) of the same prompts and seeds."""
    rng = np.random.default_rng(seed)
    out = {}
    for task in a["per_image"]:
        x = np.array([r[2] for r in a["per_image"][task]]) - np.array([r[2] for r in b["per_image"][task]])
        draws = x[rng.integers(0, len(x), (n_boot, len(x)))].mean(1)
        out[task] = (float(x.mean()), tuple(float(v) for v in np.percentile(draws, [2.5, 97.5])))
    return out


def format_result(label: str, result: dict) -> str:
    """Lines: per task, the share of each framing and the metric there (render's in brackets)."""
    lines = [f"{label}:"]
    for task, share in result["share"].items():
        cells = [f"zoom {z}: {share[z]:.2f} of images, metric "
                 + (f"{result['reward'][task][z]:.2f}" if result["reward"][task][z] is not None else "-")
                 + f" (render {result['render'][task][z]:.2f})" for z in share]
        lines.append(f"  {task:>9}  " + "; ".join(cells))
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="", help="a base pipeline folder pretrained on toy/framed.py's world")
    parser.add_argument("--adapter", default="", help="a PEFT LoRA folder or a run directory (its checkpoint/)")
    parser.add_argument("--tasks", nargs="+", default=list(framed.TASKS))
    parser.add_argument("--guidance", type=float, nargs="+", default=[4.5], help="CFG scales, one measurement each")
    parser.add_argument("--prompts", type=int, default=60, help="first test prompts of each task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="write the measurements as JSON here")
    parser.add_argument("--renders", type=int, default=0, metavar="N",
                        help="instead: the metric table of N pretraining renders per task and framing")
    parser.add_argument("--compare", nargs=2, metavar=("A.json[@CFG]", "B.json[@CFG]"),
                        help="instead: A's metric minus B's per task, paired over prompts (two --out files)")
    args = parser.parse_args(argv)
    if args.compare:
        found = []
        for item in args.compare:
            path, _, g = item.partition("@")
            saved = json.loads(Path(path).read_text())["by_guidance"]
            found.append(saved[g] if g else next(iter(saved.values())))
        for task, (value, (lo, hi)) in paired_differences(*found).items():
            print(f"{task}: {value:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        return {}
    if args.renders:
        print(render_table(args.renders, args.seed), end="")
        return {}
    unknown = sorted(set(args.tasks) - set(framed.TASKS))
    if unknown:
        parser.error(f"--tasks {unknown}: the toy world's tasks are {list(framed.TASKS)}")
    if not args.renders and not (Path(args.model) / "model_index.json").is_file():
        parser.error(f"--model {args.model}: not a pipeline folder (no model_index.json)")
    from model import FlowModel
    from study.table import resolve_adapter
    adapter_dir = resolve_adapter(args.adapter) if args.adapter else None
    torch.set_num_threads(2)
    model = FlowModel.load(args.model)
    adapter = None
    if adapter_dir:
        model.load_lora(adapter_dir, "measured")
        adapter = "measured"
    found = {}
    for g in args.guidance:
        found[str(g)] = measure(model, adapter, args.tasks, args.prompts, g, seed=args.seed)
        print(format_result(f"{args.model}{'+' + args.adapter if args.adapter else ''} at CFG {g}", found[str(g)]),
              flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"model": args.model, "adapter": args.adapter, "prompts": args.prompts,
                                              "by_guidance": found}, indent=1))
    return found


if __name__ == "__main__":
    main()
