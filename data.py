"""Tasks and their prompt datasets, in Flow-GRPO's layout (paper section 10, "Data formats").

A task is a prompt folder plus the reward that judges it:
    <dataset>/train.txt, test.txt                one prompt per line
    <dataset>/train_metadata.jsonl, test_...     optional, one JSON object per prompt (GenEval needs it)
    <dataset>/task.json                          optional: {"reward", "guidance", "eval_key"}
task.json is this project's addition; it lets `--task geneval` pick the dataset's reward and the
teacher's guidance scale without flags. Real Flow-GRPO datasets work without it (pass --reward).
The embedded toy tasks live in data/toy/<task>/ (written by `python -m toy.world --write-datasets`).
A dataset path inside the repository is stored relative to it (model.portable_path), so saved runs
and teachers work in any clone.

Run: a library.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from model import REPO, portable_path, repo_path

TOY_DATA = "data/toy"  # the embedded toy tasks, inside the repository


@dataclass
class Task:
    name: str
    dataset: str        # folder in Flow-GRPO layout
    reward: str         # rewards.make_reward spec, e.g. "toy_geneval=1" or "pickscore=1,clipscore=1"
    guidance: float     # CFG scale of this task's teacher (paper section 7: GenEval 1.0, others 4.5)
    eval_key: str = ""  # an info key of the reward to report at evaluation ("strict" for GenEval); "" = score


def load_task(name: str, dataset: str = "", reward: str = "", guidance: float | None = None) -> Task:
    """Resolve a task: its dataset (default data/toy/<name>), reward and guidance (default task.json).
    Task.dataset holds the folder as it is stored (model.portable_path); load_prompts resolves it."""
    dataset = dataset or f"{TOY_DATA}/{name}"
    folder = Path(repo_path(dataset))
    if not folder.is_dir():
        toy = REPO / TOY_DATA
        known = sorted(p.name for p in toy.iterdir() if p.is_dir()) if toy.is_dir() else []
        raise FileNotFoundError(f"task {name!r}: dataset folder {dataset} does not exist "
                                f"(pass --dataset DIR; embedded toy tasks: {known})")
    spec = json.loads((folder / "task.json").read_text()) if (folder / "task.json").is_file() else {}
    if reward and reward != spec.get("reward"):
        spec.pop("eval_key", None)  # the task.json's eval key belongs to its own reward
    reward = reward or spec.get("reward", "")
    if not reward:
        raise ValueError(f"task {name!r}: no reward given and {folder}/task.json names none (pass --reward)")
    return Task(name, portable_path(dataset), reward, spec.get("guidance", 4.5) if guidance is None else guidance,
                spec.get("eval_key", ""))


def load_prompts(folder, split):
    """(prompts, metadatas) from <folder>/<split>.txt and, if present, <split>_metadata.jsonl
    (Flow-GRPO layout); without a metadata file every metadata is {}. `folder` may be stored form."""
    folder = Path(repo_path(str(folder)))
    if not folder.is_dir():
        raise FileNotFoundError(f"prompt folder {folder} does not exist")
    path = folder / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected {split}.txt with one prompt per line)")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} has no prompts")
    meta_path = folder / f"{split}_metadata.jsonl"
    if not meta_path.is_file():
        return prompts, [{} for _ in prompts]
    metadatas = [json.loads(line) for line in meta_path.read_text().splitlines() if line.strip()]
    if len(metadatas) != len(prompts):
        raise ValueError(f"{meta_path} has {len(metadatas)} lines but {path} has {len(prompts)} prompts")
    mismatch = [i for i, (p, m) in enumerate(zip(prompts, metadatas)) if m.get("prompt", p) != p]
    if mismatch:
        raise ValueError(f"{meta_path} line {mismatch[0] + 1} is for prompt {metadatas[mismatch[0]]['prompt']!r}, "
                         f"not {prompts[mismatch[0]]!r}")
    return prompts, metadatas


def write_mixed_dataset(tasks: list[Task], folder: Path) -> Task:
    """The joint baseline's prompt set in Flow-GRPO layout: the tasks' prompts interleaved (train: the
    shorter lists cycled, so every task has an equal share; test: each prompt once), every metadata
    tagged with its "task" and the "rewards" that judge it; task.json: the sum of the tasks' rewards."""
    from rewards import parse_spec
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        lists = [load_prompts(t.dataset, split) for t in tasks]
        lines = []
        for i in range(max(len(prompts) for prompts, _ in lists)):
            for task, (prompts, metas) in zip(tasks, lists):
                if i < len(prompts) or split == "train":
                    j = i % len(prompts)
                    lines.append({**metas[j], "prompt": prompts[j], "task": task.name,
                                  "rewards": sorted(parse_spec(task.reward))})
        (folder / f"{split}.txt").write_text("".join(m["prompt"] + "\n" for m in lines))
        (folder / f"{split}_metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    spec = {"reward": ",".join(t.reward for t in tasks), "guidance": tasks[0].guidance, "eval_key": ""}
    (folder / "task.json").write_text(json.dumps(spec))
    return load_task("mixed", str(folder))
