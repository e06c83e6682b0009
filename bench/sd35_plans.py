"""The memory plan of every docs/sd35.md command at SD3.5-Medium's real size, without a GPU or a download.

Each command of the page runs its own `--dry_run --device cuda --max_memory_gb G` in this process, as rank
0 of --world ranks (the per-rank sizes the paper's 8 GPUs give; no process group is started: a dry run
makes no collective call), on a stand-in of what the command reaches for: SD3.5-Medium's configuration
files (tests/fixtures/sd35m_config: every module is built on the meta device, no weights), as a local
folder or under its hub id in a stand-in hub cache; Flow-GRPO's prompt folders (a few prompts each, their
task.json); Stage-1 teachers and the release's teachers as adapter folders of rank 32 (configs and an
empty weights file: a dry run reads headers only); reward models as empty local folders (a dry run checks
that they exist; its builds of the rewards, which need their weights, are stood in), the OCR and HPSv2.1
packages' checks answered when they are not installed. What it
prints for each command is the plan's last line and the settings the plan chose.

Run:
    python -m bench.sd35_plans                         # an 80 GB card (79.6 GiB), 8 ranks
    python -m bench.sd35_plans --gib 39.4 23.6         # 40 GB and 24 GB cards
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import shutil
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "sd35m_config"
SD35 = "stabilityai/stable-diffusion-3.5-medium"
CARDS = {"80 GB": 79.6, "40 GB": 39.4, "24 GB": 23.6}  # what torch.cuda reports for H100-80GB, A100-40GB, L4/4090


def page_commands() -> list[list[str]]:
    """Every command of docs/sd35.md's bash blocks, as argument lists (continuations joined)."""
    text = (REPO / "docs" / "sd35.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line:
                out.append(shlex.split(line))
    return out


def flowgrpo_files() -> dict[str, dict[str, str]]:
    """A few prompts in each of Flow-GRPO's dataset/ folders, in its layout."""
    genevals = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
                {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}],
                 "prompt": "a photo of two dogs"},
                {"tag": "colors", "include": [{"class": "computer mouse", "count": 1, "color": "red"}],
                 "prompt": "a photo of a red computer mouse"},
                {"tag": "position", "include": [{"class": "person", "count": 1},
                                                {"class": "cat", "count": 1, "position": ["left of", 0]}],
                 "prompt": "a photo of a cat left of a person"}]
    jsonl = "".join(json.dumps(m) + "\n" for m in genevals)
    ocr = 'a sign that says "Open"\na poster with the text "Sale 2024"\nthe word "hello" on a wall\n'
    pick = "a cat on a sofa, digital art\na misty forest at dawn\nportrait of an old sailor\n"
    return {"geneval": {"train_metadata.jsonl": jsonl, "test_metadata.jsonl": jsonl},
            "ocr": {"train.txt": ocr, "test.txt": ocr}, "pickscore": {"train.txt": pick, "test.txt": pick}}


def _adapter(folder: Path, base: str | None, run_config: dict | None = None) -> None:
    """An adapter folder of the paper's LoRA (r 32 on the 8 attention projections) that a dry run accepts:
    its configs and a weights file whose header reads (no weights)."""
    import torch
    from safetensors.torch import save_file

    from model import LORA_TARGETS
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 32, "lora_alpha": 64, "target_modules": list(LORA_TARGETS),
         "base_model_name_or_path": base}))
    save_file({"base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(32, 1536)},
              str(folder / "adapter_model.safetensors"))
    if run_config is not None:
        (folder / "run_config.json").write_text(json.dumps(run_config))


def stand_in(root: Path) -> dict:
    """The stand-in world under `root` (module docstring); returns the environment to run in."""
    from data import FLOWGRPO_TASKS
    for folder, named in flowgrpo_files().items():
        (root / "dataset" / folder).mkdir(parents=True)
        for name, text in named.items():
            (root / "dataset" / folder / name).write_text(text)
            if name.endswith("_metadata.jsonl"):  # as `python -m data fetch` writes GenEval's prompts too
                prompts = "".join(json.loads(line)["prompt"] + "\n" for line in text.splitlines())
                (root / "dataset" / folder / name.replace("_metadata.jsonl", ".txt")).write_text(prompts)
        (root / "dataset" / folder / "task.json").write_text(json.dumps(FLOWGRPO_TASKS[folder]))
    snapshot = root / "hub" / "models--stabilityai--stable-diffusion-3.5-medium"
    shutil.copytree(FIXTURE, snapshot / "snapshots" / ("0" * 40))
    (snapshot / "refs").mkdir()
    (snapshot / "refs" / "main").write_text("0" * 40)
    release = root / "hub" / "models--quanhaol--DiffusionOPD"
    for name in ("GenEvalTeacher", "OCRTeacher", "AesTeacher"):
        _adapter(release / "snapshots" / ("1" * 40) / name / "lora", None)
    (release / "refs").mkdir()
    (release / "refs" / "main").write_text("1" * 40)
    for base, ckpts in ((SD35, "ckpts-hub"), (str(FIXTURE), "ckpts-folder")):
        for task, folder in (("geneval", "geneval"), ("ocr", "ocr"), ("aesthetic", "pickscore")):
            spec = FLOWGRPO_TASKS[folder]
            _adapter(root / ckpts / task / "checkpoint", base, {
                "task": task, "dataset": str(root / "dataset" / folder), "reward": spec["reward"],
                "guidance": spec["guidance"], "eval_key": spec.get("eval_key", ""), "base_model": base})
        _adapter(root / ckpts.replace("ckpts", "runs") / "opd" / "checkpoint", base, {
            "base_model": base, "tasks": ["geneval", "ocr", "aesthetic"], "guidance": 4.5})  # the OPD student
    env = {}
    for var in ("CLIP_MODEL", "PICKSCORE_MODEL", "PICKSCORE_PROCESSOR", "GENEVAL_DETECTOR"):
        (root / "rewards" / var).mkdir(parents=True)
        env[var] = str(root / "rewards" / var)
    (root / "rewards" / "mlp.pth").write_bytes(b"")
    env["AESTHETIC_MLP"] = str(root / "rewards" / "mlp.pth")
    return env


def _module_main(target: str):
    import nft
    import opd
    import teacher_rl
    from study import table
    return {"teacher_rl.py": teacher_rl.main, "nft.py": nft.main, "opd.py": opd.main, "study.table": table.main}[target]


def dry_run(command: list[str], root: Path, env: dict, gib: float, world: int = 8, base: str = "hub",
            extra: list[str] = ()) -> tuple[str, dict]:
    """One page command's dry run at the real size, as rank 0 of `world` ranks, with the model as a hub id
    (`base` "hub") or the fixture folder ("folder"). Returns (what it printed, its resolved config)."""
    import huggingface_hub.constants
    import torch.distributed

    import rewards
    rest = command[2:]
    target, args = (rest[1], rest[2:]) if rest[0] == "-m" else (rest[0], rest[1:])

    def place(token: str, flag: str) -> str:
        if flag == "--out":  # a dry run writes nothing; its --out must not hold another run
            return str(root / "out" / base / token)
        if base == "folder":
            token = token.replace(SD35, str(FIXTURE))
        token = re.sub(r"(^|[=+])dataset(/|$)", lambda m: f"{m.group(1)}{root / 'dataset'}{m.group(2)}", token)
        return re.sub(r"(^|[=+])(ckpts|runs)(/|$)", lambda m: f"{m.group(1)}{root / (m.group(2) + '-' + base)}"
                                                            f"{m.group(3)}", token)
    args = [place(t, flag) for flag, t in zip(["", *args], args)]
    if target in ("teacher_rl.py", "nft.py") and "--model" not in args and base == "folder":
        args = ["--model", str(FIXTURE), *args]
    argv = [*args, *extra, "--dry_run", "--device", "cuda", "--max_memory_gb", str(gib)]
    checks = {name: (lambda **o: ["stand-in"]) for name in ("ocr", "hpsv2")}
    builds = {name: (lambda device, dtype, **o: None) for name in rewards.REWARDS}  # the dry run's reward builds
    printed = io.StringIO()
    with mock.patch.dict(os.environ, {**env, "WORLD_SIZE": str(world), "RANK": "0", "LOCAL_RANK": "0",
                                      "HF_HUB_OFFLINE": "1"}), \
            mock.patch.object(torch.distributed, "init_process_group", lambda *a, **k: None), \
            mock.patch.object(huggingface_hub.constants, "HF_HUB_CACHE", str(root / "hub")), \
            mock.patch.dict(rewards.CHECKS, checks), mock.patch.dict(rewards.REWARDS, builds), \
            contextlib.redirect_stderr(printed):
        _module_main(target)(argv)
    text = printed.getvalue()
    config = json.loads(text[text.index("the resolved config:") + len("the resolved config:"):])
    return text, config


def plan_line(printed: str) -> str:
    return next(line for line in printed.splitlines() if line.startswith("predicted peak "))


def main(argv=None):
    import tempfile
    ap = argparse.ArgumentParser(description="The memory plan of every docs/sd35.md command at SD3.5-M's size.")
    ap.add_argument("--gib", type=float, nargs="+", default=[CARDS["80 GB"]], help="the card's memory in GiB")
    ap.add_argument("--world", type=int, default=8, help="ranks (GPUs) the commands run on")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        env = stand_in(root)
        for gib in args.gib:
            print(f"## {gib} GiB per GPU, {args.world} ranks")
            for command in page_commands():
                if command[0] != "torchrun":
                    continue
                name = " ".join(command[2:5])
                try:
                    printed, config = dry_run(command, root, env, gib, args.world)
                    print(f"{name}: {plan_line(printed)} [dtype {config['dtype']}, {config['height']}x{config['width']}]")
                except SystemExit as e:
                    print(f"{name}: {e}")


if __name__ == "__main__":
    main()
