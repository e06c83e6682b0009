"""What a run shows outside its folder: experiment trackers and the model page of a saved adapter.

- `Trackers` mirrors the run's ground truth (config.json, metrics.jsonl, samples/*.png) into
  TensorBoard and/or Weights & Biases (`--report_to tensorboard,wandb`), from rank 0. A resumed run
  continues the same tracker run: TensorBoard writes into OUT/tensorboard/ and drops the steps past
  the checkpoint (`purge_step`); W&B resumes the run id saved in OUT/tracker.json. Both packages are
  optional and imported only when asked for. W&B runs offline with `WANDB_MODE=offline`; its project
  is `--wandb_project`.
- `model_card` writes README.md into every saved adapter folder: the Hub's metadata header (base
  model, library, tags), what the adapter is (a teacher of one task, or a student of several), how to
  load it, the recipe, the last evaluation, and the command that made it. Uploading the folder as it
  is gives a complete model page; `pipe.load_lora_weights(folder)` ignores the README.
- `push_to_hub` uploads a checkpoint folder's public files (`--push_to_hub OWNER/NAME`).

Run: a library, used by student.py; and, to (re)write the model card of a saved adapter folder from
the files saved with it (config.json, run_config.json, metrics.jsonl):
    python -m plumbing.reporting --card ckpts/toy-geneval
"""
from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

from plumbing.jsonfiles import read_json, read_jsonl
from plumbing.model_files import MAX_SEQUENCE_LENGTH, t5_length

TRACKERS = ("tensorboard", "wandb")
INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb"}
RESUME_FILES = ("raw_weights.safetensors", "ema_weights.safetensors", "old_weights.safetensors",
                "trainer_state.pt", "checkpoint.json")   # what resume needs, not the model page


def parse_report_to(spec: str) -> list[str]:
    """"none" | "tensorboard" | "wandb" | "tensorboard,wandb" -> the list; a missing package is an
    error naming its install command (checked before any model loads)."""
    import importlib.util
    names = [] if spec in ("", "none") else [s.strip() for s in spec.split(",")]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(f"--report_to {spec!r}: unknown tracker {unknown}; use none, tensorboard, wandb or both")
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise ValueError(f"--report_to {name} needs its package: {INSTALL[name]}")
    return names


class Trackers:
    """The trackers of one run (rank 0 only; other ranks get an instance that does nothing)."""

    def __init__(self, names: list[str], out: Path, config: dict, start: int, active: bool):
        self.tb = self.wb = None
        if not active:
            return
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start if start > 0 else None)
            self.tb.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", start)
        if "wandb" in names:
            import wandb
            state_file = out / "tracker.json"
            state = read_json(state_file, "tracker state") if state_file.is_file() else {}
            if "wandb_id" not in state:
                state["wandb_id"] = uuid.uuid4().hex[:8]
                state_file.write_text(json.dumps(state))
            self.wb = wandb.init(project=config.get("wandb_project") or "diffusion-opd", id=state["wandb_id"],
                                 resume="allow", dir=str(out), name=out.name, config=config)

    def log(self, metrics: dict, images: dict[str, str] | None = None) -> None:
        """One metrics line (numbers only) and its sample grids {tag: png path}, at metrics["step"]."""
        step = metrics["step"]
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for key, value in numbers.items():
                self.tb.add_scalar(key, value, step)
            for tag, path in (images or {}).items():
                import numpy as np
                from PIL import Image
                self.tb.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
            table = evaluation_table(metrics)
            if table:
                self.tb.add_text("evaluation", table, step)
            self.tb.flush()
        if self.wb is not None:
            import wandb
            row = dict(numbers)
            row.update({tag: wandb.Image(path) for tag, path in (images or {}).items()})
            self.wb.log(row, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()


def evaluation_table(metrics: dict) -> str:
    """The evaluation keys of one metrics line as a Markdown table ("" without an evaluation)."""
    rows = {k.removeprefix("eval/"): v for k, v in metrics.items() if k.startswith("eval/")}
    if not rows:
        return ""
    return "| metric | value |\n|---|---:|\n" + "".join(f"| {k} | {v:.4f} |\n" for k, v in rows.items())


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not Path(name).exists() and not name.startswith((".", "/"))


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that started this run, as a user would retype it (the script's name, not its path)."""
    import shlex
    return shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)])


def model_card(folder: Path, config: dict, run_config: dict, last_eval: dict, command: str, script: str) -> None:
    """README.md of an adapter folder: the Hub's metadata header and a page that says what it is."""
    base = run_config.get("base_model", "")
    student = "tasks" in run_config
    algorithm = {"flow-grpo": "Flow-GRPO", "grpo-guard": "GRPO-Guard", "nft": "DiffusionNFT"}.get(
        run_config.get("algorithm"), "DiffusionOPD" if student else "Flow-GRPO")
    tags = ["text-to-image", "lora", "diffusers", "sd3", "flow-matching", algorithm.lower().replace("-", "")]
    # the T5 length the adapter was trained and evaluated with; diffusers' own default is 256 tokens,
    # which encodes every prompt differently (and so gives other images than the ones scored here)
    length = run_config.get("max_sequence_length", MAX_SEQUENCE_LENGTH)
    header = ["---", "library_name: diffusers", "pipeline_tag: text-to-image", "tags:"] + [f"- {t}" for t in tags]
    if _looks_like_hub_id(base):
        header.append(f"base_model: {base}")
    header += [f"max_sequence_length: {length}", "---"]
    if student:
        what = (f"A DiffusionOPD student: one LoRA distilled on its own rollouts from the teachers of "
                f"{', '.join(run_config['tasks'])} ({', '.join(map(str, run_config.get('teachers', [])))}).")
    else:
        what = (f"A {algorithm} teacher for the task `{run_config.get('task')}` (reward `{run_config.get('reward')}`, "
                f"sampled with CFG {run_config.get('guidance')}).")
    keys = ("recipe", "lr", "lora_rank", "lora_alpha", "steps", "num_steps", "noise_level", "guidance", "batch",
            "group_size", "prompts_per_batch", "timestep_fraction", "beta", "ratio_norm", "clip_range", "kl_beta",
            "ema_decay", "ema_every", "height", "width")
    recipe = "".join(f"| {k} | {config[k]} |\n" for k in keys if k in config)
    lines = header + [
        f"# {Path(config.get('out', 'adapter')).name}", "", what, "",
        f"Base model: `{base}` (base fingerprint `{run_config.get('base_fingerprint')}`). Trained for "
        f"{run_config.get('step')} steps with this repository's `{script}` (paper: DiffusionOPD, arXiv 2605.15055).",
        "", "## Use", "", "```python", "import torch", "from diffusers import StableDiffusion3Pipeline", "",
        f'pipe = StableDiffusion3Pipeline.from_pretrained("{base}")',
        'pipe.load_lora_weights("<this folder or repo>")',
        f'image = pipe("a prompt", num_inference_steps=40, guidance_scale={run_config.get("guidance", 4.5)}, '
        f'max_sequence_length={length},',
        '             generator=torch.Generator().manual_seed(0)).images[0]',
        "```", "",
        f"`max_sequence_length={length}` is the prompt length (T5 tokens) this adapter was trained and evaluated "
        "with; diffusers' default (256) encodes prompts differently and gives other images. With "
        "`generator=torch.Generator().manual_seed(i)` the image is the one the evaluation below scored for "
        "test prompt i.", "",
        "Or as a PEFT adapter: `PeftModel.from_pretrained(pipe.transformer, folder)`.", "",
        "## Training", "", "| setting | value |", "|---|---|", recipe.rstrip("\n"), "",
        "Command:", "", "```bash", command, "```", "",
        "## Last evaluation", "", "40-step ODE, one image per test prompt, prompt i seeded i (evaluate.py).", "",
        evaluation_table(last_eval).rstrip("\n") or "(no evaluation yet)", ""]
    (folder / "README.md").write_text("\n".join(lines))


def push_to_hub(folder: Path, repo: str, message: str) -> str:
    """Upload a checkpoint folder's public files (adapter, diffusers weights, configs, model card) to
    the Hub repo `repo`, created if missing. Returns the repo URL."""
    from huggingface_hub import HfApi
    api = HfApi()
    url = api.create_repo(repo, exist_ok=True, repo_type="model")
    api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model", commit_message=message,
                      ignore_patterns=list(RESUME_FILES))
    return str(url)


def rewrite_card(folder: str) -> Path:
    """README.md of a saved adapter folder from its own files: config.json (the training config),
    run_config.json and the last evaluation line of metrics.jsonl. A run_config without the prompt
    length (saved before it was recorded) takes the length FlowModel encodes for its base."""
    root = Path(folder)
    missing = [f for f in ("config.json", "run_config.json") if not (root / f).is_file()]
    if missing:
        raise SystemExit(f"error: {folder} has no {' or '.join(missing)}: not an adapter folder this project saved")
    config = read_json(root / "config.json", "training config")
    run_config = read_json(root / "run_config.json", "run config")
    run_config.setdefault("max_sequence_length", t5_length(run_config.get("base_model", "")))
    records = read_jsonl(root / "metrics.jsonl", "metrics", torn_tail_ok=True) if (root / "metrics.jsonl").is_file() \
        else []
    evals = [m for m in records if any(k.startswith("eval/") for k in m)]
    script = {"nft": "nft.py"}.get(run_config.get("algorithm"), "opd.py" if "tasks" in run_config else "teacher_rl.py")
    model_card(root, config, run_config, evals[-1] if evals else {}, equivalent_command(script, config), script)
    return root / "README.md"


def equivalent_command(script: str, config: dict) -> str:
    """A command that reproduces a saved config: every value that differs from the script's default."""
    import importlib
    import shlex
    module = importlib.import_module(script.removesuffix(".py"))
    cls = {"teacher_rl": "TeacherConfig", "nft": "NFTConfig", "opd": "OPDConfig"}[module.__name__]
    defaults = vars(getattr(module, cls)())
    args = []
    for key, value in config.items():
        if key in defaults and key not in ("resume", "device", "report_to", "recipe") and value != defaults[key]:
            args += [f"--{key}", *(map(str, value) if isinstance(value, list) else [str(value).lower()
                                                                                    if isinstance(value, bool) else str(value)])]
    return shlex.join(["python", script, *args])


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="Write the model card (README.md) of a saved adapter folder.")
    ap.add_argument("--card", nargs="+", required=True, metavar="FOLDER", help="adapter folders to write a card for")
    for folder in ap.parse_args().card:
        print(f"wrote {rewrite_card(folder)}")
