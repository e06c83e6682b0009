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

`validate` checks every input of a distillation run, the teachers first.

Run: a library (opd.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from data import Task, check_prompts, load_prompts, load_task
from harness import check_same_base, check_student_config
from model import LORA_TARGETS, FlowModel
from rewards import check_spec, make_reward, reward_bytes
from sample import trained_steps
from plumbing.config import apply_recipe, describe_recipe, given_keys, require, require_positive
from plumbing.dist import Dist, print_main
from plumbing.memory import plan_run
from plumbing.stops import fail
from plumbing.rundir import RunDir
from plumbing.jsonfiles import read_json
from plumbing.model_files import (check_lora_folder, check_model_path, check_model_resolution, portable_path,
                                  resolve_dtype)


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


def validate(cfg, dist: Dist, argv: list[str] | None = (), script: str = "opd.py"):
    """Every input of a distillation run (opd.py's OPDConfig) checked, with a one-line error, before any
    model loads and before anything is written: the teachers (resolve_teachers), the recipe (applied to
    cfg), every field, the base, the memory plan (applied to cfg: plumbing.memory.plan_run), the prompt sets
    and the run folder. Returns (teacher specs, train prompts by task, rewards by task, run dir); the
    rewards are built on the host when the plan offloads them (they only evaluate)."""
    try:
        with dist.local_first():  # a hub teacher downloads once per node
            base, specs = resolve_teachers(cfg)
        # paths inside the repository stored relative to it, as datasets and bases are: the same run by any path
        cfg.model = portable_path(cfg.model or base)
        cfg.teachers = [portable_path(t) for t in cfg.teachers]
        cfg.init_lora = portable_path(cfg.init_lora) if cfg.init_lora else ""
        given = given_keys(type(cfg), argv)
        changed = apply_recipe(cfg, given, cfg.model, "opd")
        cfg.dtype = resolve_dtype(cfg.dtype, dist.device, cfg.full_finetune)
        check_student_config(cfg)
        require_positive(cfg, "prompts_per_batch", "num_steps")
        require(cfg.noise_level >= 0, f"--noise_level must be >= 0, got {cfg.noise_level}")
        require(0 < cfg.timestep_fraction <= 1,
                f"--timestep_fraction must be in (0, 1], got {cfg.timestep_fraction}")
        require(cfg.teacher_chunk >= 0 and cfg.train_chunk >= 0, "--teacher_chunk/--train_chunk must be >= 0")
        require(cfg.teacher_dtype in ("float32", "model"),
                f"--teacher_dtype must be float32 or model, got {cfg.teacher_dtype!r}")
        require(cfg.estimator in ("closed_form", "ppo"),
                f"--estimator must be closed_form or ppo, got {cfg.estimator!r}")
        require(not (cfg.estimator == "ppo" and cfg.noise_level <= 0),
                "the PPO-style estimator needs a log-density: use --noise_level > 0 (e.g. 0.7)")
        bad = [j for j in cfg.train_steps if not 0 <= j < cfg.num_steps]
        require(not bad, f"--train_steps {bad} outside 0..{cfg.num_steps - 1}")
        dist.split(cfg.prompts_per_batch, "prompts_per_batch (every task gets this many prompts per round)",
                   "--prompts_per_batch")
        check_model_path(cfg.model)
        if cfg.init_lora:
            with dist.local_first():
                check_lora_folder(fetch_teacher(cfg.init_lora))  # the base is checked when it loads
        check_model_resolution(cfg.model, cfg.height, cfg.width)
        teacher_size = 0.5 if cfg.teacher_dtype == "model" and cfg.dtype == "bfloat16" else 1.0
        plan = plan_run("opd", cfg, dist, given | set(changed), reward_bytes([s["task"].reward for s in specs]),
                        trained=len(trained_steps(cfg)), lora_targets=LORA_TARGETS,
                        adapters=teacher_size * sum(s["kind"] == "lora" for s in specs))
        prompts_by_task = {s["task"].name: load_prompts(s["task"].dataset, "train")[0] for s in specs}
        for s in specs:
            load_prompts(s["task"].dataset, "test")
            check_prompts(s["task"])  # what its reward reads of every prompt (OCR: its quoted target)
        run = RunDir(cfg.out, cfg, dist, script, argv)
        adapters = [s["path"] for s in specs if s["kind"] == "lora"]
        adapters += [fetch_teacher(cfg.init_lora)] if cfg.init_lora else []
        for adapter in adapters + ([str(run.resume_from)] if run.resume_from else []):
            check_same_base(adapter, cfg.model)  # its recorded base against this base's stored weights
        needs = [line for s in specs for line in check_spec(s["task"].reward, build=True)] if cfg.dry_run else []
        device = "cpu" if cfg.offload_rewards else dist.device
        with dist.local_first():  # first-use downloads of the reward models, once per node
            rewards = {} if cfg.dry_run else {s["task"].name: make_reward(s["task"].reward, device=device)
                                              for s in specs}
        print_main(dist, *filter(None, [plan, describe_recipe(cfg, changed, given), routing_table(specs)]), *needs)
        return specs, prompts_by_task, rewards, run
    except (ValueError, FileNotFoundError, KeyError, ImportError) as e:
        fail(e)
