"""Tasks and their prompt datasets, in Flow-GRPO's layout (paper section 10, "Data formats").

A task is a prompt folder plus the reward that judges it:
    <dataset>/train.txt, test.txt                one prompt per line
    <dataset>/train_metadata.jsonl, test_...     optional, one JSON object per prompt (GenEval needs it)
    <dataset>/task.json                          optional: {"reward", "guidance", "eval_key",
                                                 "reward_module"}
task.json is this project's addition: it lets `--task geneval` pick the dataset's reward, the teacher's
guidance and the metric to report without flags, and names the Python module that registers the
reward when it is not one of rewards.py's ("reward_module", imported before the reward is built).
Real Flow-GRPO datasets work without it (pass --reward). A task's dataset defaults to dataset/<task>,
where Flow-GRPO's own prompt sets land (`python -m data fetch flowgrpo --out dataset`). A dataset
path inside the repository is stored relative to it (model.portable_path), so saved runs and
teachers work in any clone.

Every metadata line a GenEval reward reads is type-checked when its file is loaded
(rules.check_geneval_metadata), so a bad field fails here, before any model loads.

Run: a library.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from jsonfiles import read_json, read_jsonl
from model import portable_path, repo_path
from rules import check_geneval_metadata

DATASETS = "dataset"  # where a task's prompt folder is looked for by default: dataset/<task>


@dataclass
class Task:
    name: str
    dataset: str        # folder in Flow-GRPO layout
    reward: str         # rewards.make_reward spec, e.g. "geneval=1" or "pickscore=1,clipscore=1"
    guidance: float     # CFG scale of this task's teacher (paper section 7: GenEval 1.0, others 4.5)
    eval_key: str = ""  # an info key of the reward to report at evaluation ("strict" for GenEval); "" = score


def load_task(name: str, dataset: str = "", reward: str = "", guidance: float | None = None) -> Task:
    """Resolve a task: its dataset (default dataset/<name>), reward and guidance (default task.json);
    imports the task.json's reward_module, if any. Task.dataset holds the folder as it is stored
    (model.portable_path); load_prompts resolves it."""
    dataset = dataset or f"{DATASETS}/{name}"
    folder = Path(repo_path(dataset))
    if not folder.is_dir():
        raise FileNotFoundError(f"task {name!r}: dataset folder {dataset} does not exist (pass --dataset DIR, or "
                                f"fetch Flow-GRPO's prompt sets: python -m data fetch flowgrpo --out {DATASETS})")
    spec = read_json(folder / "task.json", "task file") if (folder / "task.json").is_file() else {}
    for module in [spec["reward_module"]] if isinstance(spec.get("reward_module"), str) else \
            spec.get("reward_module", []):
        importlib.import_module(module)  # registers the task's reward (rewards.register)
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
    metadatas = read_jsonl(meta_path, "metadata file")
    if len(metadatas) != len(prompts):
        raise ValueError(f"{meta_path} has {len(metadatas)} lines but {path} has {len(prompts)} prompts")
    for i, (p, m) in enumerate(zip(prompts, metadatas)):
        if not isinstance(m, dict):
            raise ValueError(f"{meta_path} line {i + 1} is a JSON {type(m).__name__}, not an object")
        if m.get("prompt", p) != p:
            raise ValueError(f"{meta_path} line {i + 1} is for prompt {m['prompt']!r}, not {p!r}")
        if "include" in m:  # GenEval metadata: every field the rules read
            check_geneval_metadata(m, f"{meta_path} line {i + 1}")
    return prompts, metadatas
