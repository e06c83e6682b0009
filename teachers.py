"""What a teacher is and where it comes from (paper sections 6-7): the frozen model of one task that
supervises the student's batches of that task (Algorithm 1's hard routing).

A teacher is a PEFT LoRA folder on the student's own base (loaded as a frozen adapter on the student's
backbone: one copy of the base weights for everyone), or a full SD3-family pipeline folder (its own
model). Either is a local folder or a hub reference owner/repo[/subfolder], fetched to the hub cache:
this project's checkpoints, Flow-GRPO's public LoRAs (e.g. jieliu/SD3.5M-FlowGRPO-GenEval) and the
DiffusionOPD release (quanhaol/DiffusionOPD/{AesTeacher,GenEvalTeacher,OCRTeacher}/lora).

A teacher trained here carries its task, dataset, reward, guidance and base in run_config.json; the
others name no base (adapter_config.json: base_model_name_or_path null) and no task, so opd.py's
`--model` and `--teacher_task` supply them, and `--teacher_dataset/--teacher_cfg/--teacher_reward`
(task=value) set or override the rest. A task may have several teachers (`--teacher_task geneval
geneval ocr`, the release's teacher axis): they supervise the same batches of its prompts, each with its
own guidance, and must share its prompt set and reward. `resolve_teachers` reads only configs (no
weights) and fails on every inconsistency before any compute; `load_teachers` loads them onto the
student's model; `by_task` groups them into Algorithm 1's routes.

Run: a library (opd.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from data import Task, load_task
from model import FlowModel
from student import check_same_base
from plumbing.jsonfiles import read_json
from plumbing.model_files import check_lora_folder, check_model_path


@dataclass
class Teacher:
    task: Task
    adapter: str | None                 # adapter name on the student's backbone, or None
    model: FlowModel | None = None      # a separate full checkpoint, when not an adapter




def _kv(items: list[str], what: str) -> dict[str, str]:
    """["task=value", ...] -> {task: value} (the --teacher_* overrides)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--{what} expects task=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def fetch_teacher(ref: str) -> str:
    """A local teacher folder (a run directory of teacher_rl.py or nft.py stands for its checkpoint/),
    or a hub reference "owner/repo[/sub/folder]" (e.g. the DiffusionOPD release's
    quanhaol/DiffusionOPD/AesTeacher/lora) downloaded to the hub cache; returns a folder."""
    if Path(ref).is_dir():
        run = Path(ref) / "checkpoint"
        is_run = not (Path(ref) / "adapter_config.json").is_file() and (run / "adapter_config.json").is_file()
        return str(run) if is_run else ref
    parts = ref.split("/")
    if len(parts) < 2 or Path(ref).is_absolute() or ref.startswith(".") or Path(ref).exists():
        raise FileNotFoundError(f"teacher {ref} does not exist (expected a PEFT LoRA folder, an SD3 pipeline "
                                "folder or a hub id owner/repo[/subfolder])")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    from huggingface_hub import snapshot_download
    try:
        root = snapshot_download(repo, allow_patterns=[f"{sub}/*"] if sub else None)
    except Exception as e:  # offline, unknown repo, no access: all end here, with the hub's reason
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        raise FileNotFoundError(f"teacher {ref} is not a local folder and could not be fetched from the hub "
                                f"({type(e).__name__}: {reason}); check the id, huggingface-cli login for a "
                                "private repo, or download it and pass its folder") from None
    return str(Path(root) / sub)


def resolve_teachers(cfg) -> tuple[str, list[dict]]:
    """Read every teacher's saved config (no weights loaded): its task, dataset, guidance, reward,
    base. Returns (base model, [spec]). Every inconsistency is an error here, before any compute."""
    if not cfg.teachers:
        raise ValueError("no teachers given (--teachers DIR [DIR ...])")
    if cfg.teacher_task and len(cfg.teacher_task) != len(cfg.teachers):
        raise ValueError(f"--teacher_task names {len(cfg.teacher_task)} tasks for {len(cfg.teachers)} "
                         "teachers")
    datasets, cfgs = _kv(cfg.teacher_dataset, "teacher_dataset"), _kv(cfg.teacher_cfg, "teacher_cfg")
    rewards = _kv(cfg.teacher_reward, "teacher_reward")
    for name, w in cfgs.items():
        try:
            float(w)
        except ValueError:
            raise ValueError(f"--teacher_cfg {name}={w}: the guidance must be a number") from None
    specs, bases, fingerprints = [], set(), set()
    for i, ref in enumerate(cfg.teachers):
        path = fetch_teacher(ref)
        p = Path(path)
        saved = read_json(p / "run_config.json", "teacher file",
                          "copy the teacher folder again from its source") \
            if (p / "run_config.json").is_file() else {}
        kind = "lora" if (p / "adapter_config.json").is_file() else \
            "full" if (p / "model_index.json").is_file() else ""
        if not kind:
            raise ValueError(f"teacher {path} is neither a PEFT LoRA folder nor an SD3 pipeline folder")
        name = cfg.teacher_task[i] if cfg.teacher_task else saved.get("task", "")
        if not name:
            raise ValueError(f"teacher {path} names no task: pass --teacher_task (one per teacher)")
        task = load_task(name, datasets.get(name, saved.get("dataset", "")),
                         rewards.get(name, saved.get("reward", "")),
                         float(cfgs[name]) if name in cfgs else saved.get("guidance"))
        task.eval_key = saved.get("eval_key", task.eval_key)
        if kind == "lora":
            check_lora_folder(path)
            base = saved.get("base_model") or read_json(p / "adapter_config.json", "teacher file").get(
                "base_model_name_or_path")
            bases.add(base or "")  # Flow-GRPO's and the release's adapters name no base (null)
            fingerprints.add(saved.get("base_fingerprint"))
        else:
            check_model_path(path)
        specs.append({"path": path, "kind": kind, "task": task, "ref": ref})
    names = [s["task"].name for s in specs]
    for name in dict.fromkeys(names):  # several teachers of one task supervise one batch of its prompts
        same = [s["task"] for s in specs if s["task"].name == name]
        for what in ("dataset", "reward"):
            if len({getattr(task, what) for task in same}) > 1:
                raise ValueError(f"the teachers of task {name!r} name different {what}s "
                                 f"{sorted({getattr(task, what) for task in same})}: pass --teacher_{what} "
                                 f"{name}=... (one per task)")
    for key in list(datasets) + list(cfgs) + list(rewards):
        if key not in names:
            raise ValueError(f"override for unknown task {key!r}; teachers' tasks are {names}")
    fingerprints.discard(None)
    if len(fingerprints) > 1:
        raise ValueError(f"teachers were trained on different base models (fingerprints "
                         f"{sorted(fingerprints)})")
    base = cfg.model
    if not base:
        bases.discard("")
        if len(bases) != 1:
            named = f"bases {sorted(bases)}" if bases else "no base model"
            raise ValueError(f"the teachers name {named}: "
                             "pass --model (e.g. stabilityai/stable-diffusion-3.5-medium)")
        base = bases.pop()
    return base, specs


def load_teachers(model: FlowModel, specs, dist, dtype: torch.dtype = torch.float32) -> list[Teacher]:
    teachers = []
    for s in specs:
        if s["kind"] == "lora":
            check_same_base(s["path"], model)
            before = sum(t.task.name == s["task"].name for t in teachers)  # the task's teachers so far
            name = f"teacher_{s['task'].name}" + (f"_{before}" if before else "")
            model.load_lora(s["path"], name, dtype=dtype)
            teachers.append(Teacher(s["task"], name))
        else:
            teachers.append(Teacher(s["task"], None, FlowModel.load(s["path"], device=dist.device,
                                                                   dtype=model.dtype)))
    return teachers


def by_task(teachers: list) -> list[list]:
    """Algorithm 1's routes: the teachers grouped by task, tasks in the order of their first teacher."""
    tasks = list(dict.fromkeys(t.task.name for t in teachers))
    return [[t for t in teachers if t.task.name == name] for name in tasks]


def routing_table(specs) -> str:
    """What supervises what (printed at start and by the dry run): per task its teachers, prompts and
    guidance."""
    lines = ["routing (Algorithm 1): task <- teachers (loss summed over a task's teachers), prompts, guidance"]
    for name in dict.fromkeys(s["task"].name for s in specs):
        mine = [s for s in specs if s["task"].name == name]
        lines.append(f"  {name} <- {', '.join(s['ref'] for s in mine)}; prompts {mine[0]['task'].dataset}; "
                     f"guidance {', '.join(str(s['task'].guidance) for s in mine)}")
    return "\n".join(lines)
