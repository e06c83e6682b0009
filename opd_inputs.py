"""The inputs of a distillation run (opd.py's OPDConfig), every one checked with a one-line error before
any model loads and before anything is written: the teachers, the recipe, every field, the base, the
memory plan, the prompt sets, the run folder, the rewards. opd.py's loop and the study's tools that run
it (study/instruments.py, bench/opd_round.py) start from `check_inputs` (opd.py: `start`, with the ranks and the dry run).

Run: a library (opd.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from data import check_prompts, load_prompts
from model import LORA_TARGETS
from rewards import check_spec, make_reward, reward_bytes
from sample import trained_steps
from student import check_same_base, check_student_config
from teachers import fetch_teacher, resolve_teachers, routing_table
from plumbing.config import apply_recipe, config_dict, describe_recipe, given_keys, require, require_positive
from plumbing.dist import Dist, print_main
from plumbing.memory import plan_run
from plumbing.model_files import (check_lora_folder, check_model_path, check_model_resolution, portable_path,
                                  resolve_dtype)
from plumbing.rundir import RunDir
from plumbing.stops import fail


@dataclass
class Inputs:
    """A distillation run's checked inputs (check_inputs)."""
    dist: Dist
    specs: list                 # the teachers' specs (teachers.resolve_teachers)
    prompts_by_task: dict       # task name -> its training prompts
    rewards: dict               # task name -> its reward (evaluation only); {} with --dry_run
    run: RunDir


def check_inputs(cfg, dist: Dist, argv: list[str] | None = (), script: str = "opd.py") -> Inputs:
    """Every input of a distillation run (opd.py's OPDConfig) checked, with a one-line error, before any
    model loads and before anything is written: the teachers (resolve_teachers), the recipe (applied to
    cfg), every field, the base, the memory plan (applied to cfg: plumbing.memory.plan_run), the prompt sets
    and the run folder. The rewards are built on the host when the plan offloads them (they only
    evaluate)."""
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
        return Inputs(dist, specs, prompts_by_task, rewards, run)
    except (ValueError, FileNotFoundError, KeyError, ImportError) as e:
        fail(e)


def start(cfg, argv, script: str = "opd.py") -> Inputs | None:
    """opd.train's start: the ranks (Dist), then every input (check_inputs); with --dry_run the resolved
    config is printed and None returned (nothing loaded, nothing written)."""
    try:
        dist = Dist(cfg.device, plan_only=cfg.dry_run, timeout_s=cfg.collective_timeout_s)
    except ValueError as e:
        fail(e)
    inputs = check_inputs(cfg, dist, argv, script)
    if cfg.dry_run:
        print_main(dist, "dry run: every input checked; the resolved config:", json.dumps(config_dict(cfg), indent=2))
        return None
    return inputs
