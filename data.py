"""Tasks and their prompt datasets, in Flow-GRPO's layout (paper section 10, "Data formats").

A task is a prompt folder plus the reward that judges it:
    <dataset>/train.txt, test.txt                one prompt per line
    <dataset>/train_metadata.jsonl, test_...     optional, one JSON object per prompt (GenEval needs it)
    <dataset>/task.json                          optional: {"reward", "guidance", "eval_key",
                                                 "reward_module"}
task.json is this project's addition: it lets `--task geneval` pick the dataset's reward, the teacher's
guidance and the metric to report without flags, and names the Python module that registers the
reward when it is not one of rewards/'s ("reward_module", imported before the reward is built).
Real Flow-GRPO datasets work without it (pass --reward). A task's dataset defaults to dataset/<task>,
where Flow-GRPO's own prompt sets land (`python -m data fetch flowgrpo --out dataset`). A dataset
path inside the repository is stored relative to it (plumbing.model_files.portable_path), so saved runs and
teachers work in any clone.

Every metadata line a GenEval reward reads is type-checked when its file is loaded
(rules.check_geneval_metadata), so a bad field fails here, before any model loads.

Run (downloads Flow-GRPO's prompt files, pinned to one commit, checked, with each folder's task.json):
    python -m data fetch flowgrpo --out dataset      # dataset/geneval, dataset/ocr, dataset/pickscore
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

from rewards import PROMPT_RULES, parse_spec
from rewards.rules import check_geneval_metadata, quoted_target
from plumbing.jsonfiles import read_json, read_jsonl
from plumbing.model_files import portable_path, repo_path

DATASETS = "dataset"  # where a task's prompt folder is looked for by default: dataset/<task>


@dataclass
class Task:
    name: str
    dataset: str        # folder in Flow-GRPO layout
    reward: str         # rewards.make_reward spec, e.g. "geneval=1" or "pickscore=1,clipscore=1"
    guidance: float     # CFG scale of this task's teacher (paper section 7: GenEval 1.0, others 4.5)
    eval_key: str = ""  # an info key of the reward to report at evaluation ("strict" for GenEval); "" = score


def task_dataset(task: str, given: str = "", recipe: dict | None = None) -> str:
    """Where task `task`'s prompt set is, one rule in every script: the folder given on the command line,
    else the one the base's recipe names for it (its "datasets": the embedded base's toy world), else
    dataset/<task>, where Flow-GRPO's prompt sets land."""
    named = (recipe or {}).get("datasets", {}).get("value", {})
    return given or named.get(task, "") or f"{DATASETS}/{task}"


def load_task(name: str, dataset: str = "", reward: str = "", guidance: float | None = None) -> Task:
    """Resolve a task: its dataset (default dataset/<name>), reward and guidance (default task.json);
    imports the task.json's reward_module, if any. Task.dataset holds the folder as it is stored
    (plumbing.model_files.portable_path); load_prompts resolves it."""
    dataset = dataset or task_dataset(name)
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


def read_text_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file; a byte that is not UTF-8 is a one-line error naming the file and
    its line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path} line {line} is not UTF-8 (byte {data[e.start]:#04x}): save the file as "
                         "UTF-8") from None


def check_prompts(task: Task) -> None:
    """What the task's reward reads of a prompt is there, in every train and test prompt (file and line
    named): the OCR reward's target, the first double-quoted span."""
    rules = [PROMPT_RULES[name] for name in parse_spec(task.reward) if name in PROMPT_RULES]
    for split in ("train", "test") if rules else ():
        path = Path(repo_path(task.dataset)) / f"{split}.txt"
        for number, line in enumerate(read_text_lines(path), 1):
            for rule in rules:
                if line.strip():
                    rule(line.strip(), f"{path} line {number}")


def load_prompts(folder, split):
    """(prompts, metadatas) from <folder>/<split>.txt and, if present, <split>_metadata.jsonl
    (Flow-GRPO layout); without a metadata file every metadata is {}. `folder` may be stored form."""
    folder = Path(repo_path(str(folder)))
    if not folder.is_dir():
        raise FileNotFoundError(f"prompt folder {folder} does not exist")
    path = folder / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected {split}.txt with one prompt per line)")
    prompts = [line.strip() for line in read_text_lines(path) if line.strip()]
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


# ---------------------------------------------------------------------- Flow-GRPO's prompt sets
FLOWGRPO_REPO = "yifan123/flow_grpo"
FLOWGRPO_REF = "ac4c86e8cae021841f1fde853d340e0db67690dd"  # 2025-07-18, the commit these files were pinned at
FLOWGRPO_URL = "https://raw.githubusercontent.com/{repo}/{ref}/dataset/"
# folder -> {file: git blob id (SHA-1 of "blob <size>\0" + content), the checksum git itself keeps}
FLOWGRPO_FILES = {
    "geneval": {"train_metadata.jsonl": "0b97e8a6802c08fc7537cd00c76ae79c851bddcb",
                "test_metadata.jsonl": "27cdaf5cc1356fe15aeadbb8df55682ca74228f0"},
    "ocr": {"train.txt": "3ce0521b77b0a9031191d66ecc36ebaaf27a3922",
            "test.txt": "8deb4f8d8f2e863f45353354243669b3c991a6a2"},
    "pickscore": {"train.txt": "a437bd921c03fbc00c4e7ce148ae2d28fcd6e49b",
                  "test.txt": "45f05231b969fb5f74c8debd606b22cd3be27f8e"},
}
# each folder's task.json: the reward, the teacher's guidance (paper section 7) and the reported metric.
# pickscore: the aesthetic teacher's equal mix of PickScore, CLIPScore and HPSv2.1 (section 8), each on
# Flow-GRPO's scale (PickScore / 26, CLIPScore x 100 / 30); its GenEval teacher is CFG-free (NFT): 1.0
FLOWGRPO_TASKS = {
    "geneval": {"reward": "geneval=1", "guidance": 1.0, "eval_key": "strict"},
    "ocr": {"reward": "ocr=1", "guidance": 4.5},
    "pickscore": {"reward": "pickscore=0.03846,clipscore=3.333,hpsv2=1", "guidance": 4.5},
}


def write_prompt_set(folder, train: list[dict], test: list[dict], task: dict | None = None) -> None:
    """A prompt set in the layout load_prompts reads: <folder>/{train,test}.txt (each entry's "prompt") and
    {train,test}_metadata.jsonl (each entry whole), and task.json when `task` is given ({"reward",
    "guidance", "eval_key", "reward_module"}). The toy worlds write theirs with it; so may a fork's task."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, metas in (("test", test), ("train", train)):
        (folder / f"{name}.txt").write_text("".join(m["prompt"] + "\n" for m in metas))
        (folder / f"{name}_metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metas))
    if task is not None:
        (folder / "task.json").write_text(json.dumps(task, indent=1) + "\n")


def git_blob_id(data: bytes) -> str:
    """The id git gives a file's content: SHA-1 of b"blob <size>\\0" + data."""
    import hashlib
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _download(url: str, timeout_s: float = 60.0) -> bytes:
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.read()
    except urllib.error.HTTPError as e:
        raise ValueError(f"{url} answered HTTP {e.code}: the file is not at that place (--ref, --base_url)") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ValueError(f"cannot download {url} ({reason}): offline? Fetch on a machine with internet and copy the "
                         "folders over") from None


def fetch_flowgrpo(out: str, base_url: str = "", ref: str = FLOWGRPO_REF, verify: bool = True) -> list[str]:
    """Flow-GRPO's prompt files of the paper's tasks into <out>/{geneval,ocr,pickscore}/ in the layout
    load_prompts reads (GenEval's prompts also written to train.txt/test.txt from its metadata), each
    with its task.json. Every file is checked against its pinned git blob id (verify) and its content
    checked line by line (load_prompts: GenEval metadata types, a quoted text in every OCR prompt); a
    folder is written only when all of its files pass, via a temporary folder renamed into place.
    Returns the folders written."""
    import os
    import shutil
    base = base_url or FLOWGRPO_URL.format(repo=FLOWGRPO_REPO, ref=ref)
    base = base if base.endswith("/") else base + "/"
    written = []
    for folder, files in FLOWGRPO_FILES.items():
        contents = {}
        for name, blob in files.items():
            data = _download(f"{base}{folder}/{name}")
            if verify and git_blob_id(data) != blob:
                raise ValueError(f"{base}{folder}/{name} is not the file this project pinned (git blob "
                                 f"{git_blob_id(data)[:12]} instead of {blob[:12]}): it changed upstream or the "
                                 f"download is damaged; pass --unverified to take it as it is")
            contents[name] = data.decode()
        tmp = Path(out) / f".{folder}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, text in contents.items():
            (tmp / name).write_text(text if text.endswith("\n") else text + "\n")
            if name.endswith("_metadata.jsonl"):  # GenEval: the prompts from the metadata
                prompts = [m["prompt"] for m in read_jsonl(tmp / name, "downloaded metadata")]
                (tmp / name.replace("_metadata.jsonl", ".txt")).write_text("".join(p + "\n" for p in prompts))
        (tmp / "task.json").write_text(json.dumps(FLOWGRPO_TASKS[folder], indent=1) + "\n")
        for split in ("train", "test"):
            prompts, _ = load_prompts(str(tmp), split)  # the GenEval metadata's types, line by line
            if folder == "ocr":
                for i, p in enumerate(prompts):
                    try:
                        quoted_target(p)
                    except ValueError:
                        raise ValueError(f"{folder}/{split}.txt line {i + 1} has no quoted text to render: "
                                         f"{p[:80]!r}") from None
        final = Path(out) / folder
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        written.append(str(final))
    return written


def main(argv=None) -> list[str]:
    import argparse
    ap = argparse.ArgumentParser(description="Datasets: fetch the prompt sets of the paper's tasks.")
    sub = ap.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="download prompt sets into the layout the scripts read")
    fetch.add_argument("source", choices=["flowgrpo"], help="flowgrpo: Flow-GRPO's GenEval, OCR and PickScore prompts")
    fetch.add_argument("--out", default=DATASETS, help=f"folder to write <task>/ into (default {DATASETS})")
    fetch.add_argument("--ref", default=FLOWGRPO_REF, help="the Flow-GRPO commit to take the files from")
    fetch.add_argument("--base_url", default="", help="where the dataset/ folder is served (default: GitHub's raw "
                       "files of --ref)")
    fetch.add_argument("--unverified", action="store_true", help="accept files that differ from the pinned ones")
    args = ap.parse_args(argv)
    try:
        written = fetch_flowgrpo(args.out, args.base_url, args.ref, verify=not args.unverified)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    for folder in written:
        print(f"wrote {folder}: {len(load_prompts(folder, 'train')[0])} train and "
              f"{len(load_prompts(folder, 'test')[0])} test prompts")
    return written


if __name__ == "__main__":
    main()
