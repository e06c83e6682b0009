"""The prompt set of the paper's joint multi-task baselines (Table 1: multi-task GRPO-Guard and NFT):
several tasks' prompts in one Flow-GRPO-layout folder, each prompt judged by its own task's reward.

`write_mixed_dataset` interleaves the tasks' prompts (train: the shorter lists cycled, so every task
has an equal share; test: each prompt once) and tags every metadata with its "task" and the "rewards"
that judge it; task.json holds the sum of the tasks' rewards, which rewards.ComposedReward routes per
prompt by those tags, and the tasks' reward modules. `teacher_rl.py --task mixed --dataset DIR` and
`nft.py` then train the joint baseline on it.

Departures from the paper: none in the data; the tasks take equal shares (the paper does not say).

Run (CPU, seconds):
    python -m study.mixed --tasks data/toy/geneval data/toy/ocr data/toy/aesthetic --out data/toy/mixed
"""
from __future__ import annotations

import argparse
from pathlib import Path

from data import Task, load_prompts, load_task, write_prompt_set
from rewards import parse_spec
from plumbing.jsonfiles import read_json
from plumbing.model_files import repo_path


def write_mixed_dataset(tasks: list[Task], folder: Path) -> Task:
    """The joint baseline's prompt set of `tasks` in `folder` (module docstring); returns it as a task."""
    splits = {}
    for split in ("train", "test"):
        lists = [load_prompts(t.dataset, split) for t in tasks]
        lines = []
        for i in range(max(len(prompts) for prompts, _ in lists)):
            for task, (prompts, metas) in zip(tasks, lists):
                if i < len(prompts) or split == "train":
                    j = i % len(prompts)
                    lines.append({**metas[j], "prompt": prompts[j], "task": task.name,
                                  "rewards": sorted(parse_spec(task.reward))})
        splits[split] = lines
    modules = []
    for task in tasks:
        own = Path(repo_path(task.dataset)) / "task.json"
        module = read_json(own, "task file").get("reward_module", []) if own.is_file() else []
        modules += [m for m in ([module] if isinstance(module, str) else module) if m not in modules]
    spec = {"reward": ",".join(t.reward for t in tasks), "guidance": tasks[0].guidance, "eval_key": "",
            **({"reward_module": modules} if modules else {})}
    write_prompt_set(folder, splits["train"], splits["test"], spec)
    return load_task("mixed", str(folder))


def main(argv=None) -> Task:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", required=True, metavar="DIR", help="the tasks' prompt folders "
                    "(each with its task.json; the task is named after its folder)")
    ap.add_argument("--out", required=True, help="folder to write the mixed prompt set into")
    args = ap.parse_args(argv)
    try:
        tasks = [load_task(Path(d).name, d) for d in args.tasks]
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    mixed = write_mixed_dataset(tasks, Path(args.out))
    print(f"wrote {args.out}: {len(load_prompts(mixed.dataset, 'train')[0])} train and "
          f"{len(load_prompts(mixed.dataset, 'test')[0])} test prompts of {[t.name for t in tasks]}")
    return mixed


if __name__ == "__main__":
    main()
