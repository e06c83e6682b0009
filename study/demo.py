"""The paper's study on the toy world in one command: Table 1 with intervals at matched CFG, the
premise (interference) and the cross-task matrix, Fig. 6 on a low-noise axis and a claims table with
verdicts (paper sections 5, 8, 9).

Stages, in order; each skips the work already done, so an interrupted demo continues where it stopped
(an OUT holding runs of another base model is refused):
  1. teachers   the teachers to distil: --teachers (default ckpts/*, made by `make teachers`); their
                training minutes and images come from their metrics.jsonl
  2. opd        DiffusionOPD from them: ODE (a = 0), closed form (opd.py's loop, run by
                study/instruments.py to log the held-out distance)                        OUT/opd/
  3. baselines  each a documented command with its algorithm's settings of the shipped teachers
                (Makefile TEACHER_*): multi-task GRPO-Guard on the mixed prompt set (teacher_rl.py
                --task mixed --ratio_norm --lr 1e-3), multi-task NFT (nft.py --task mixed), cascade NFT
                (nft.py one task after another, chained by --init_lora); SFT on teacher samples
                (study/instruments.py --baseline sft) and its control that fits the empty prompt too
                (--sft_caption_dropout 0.1)
  4. fig6       OPD variants x seeds, the held-out distance to the teachers logged every round:
                ODE closed form, SDE (a = 0.7) closed form, SDE PPO-style                 OUT/fig6/
  5. variance   the gradient-variance ratio PPO-style / closed form (study/instruments.py
                --variance_rollouts)
  6. results    study.table (every model at every CFG of --cfgs and at its own; bootstrap intervals,
                curves, samples), fig6.png and claims.md (study/claims.py)            OUT/results/
Every command run is appended to OUT/commands.txt; OUT/plan.json holds each run's steps and compute.

Equal images (C2): every baseline sees as many training images as OPD's pipeline, the teachers'
images included: C = sum of the teachers' images + S_o T P (S_o rounds of T tasks x P prompts);
multi-task runs round(C / B) steps of B images, cascade T stages of round(C / (T B)). SFT sees OPD's
S_o T P teacher samples (its teachers are OPD's). OPD, SFT and the baselines are evaluated
--curve_points times on --eval_prompts test prompts per task (curves.png against images and
minutes; C3 reads the time to a stated quality from these points).

Matched CFG: every model gets a Table 1 row NAME@CFG at each CFG of --cfgs (4.5 and 1.0: the
protocol's and the NFT runs') and at its own; the premise, the cross-task matrix and C2 and C6
compare rows at one CFG; C1 compares each model at the CFG it is deployed with.

Budget: measured on a fresh clone in docs/study.md (make demo); `--quick` runs every stage with tiny
sizes (tests/algorithm/test_demo.py); every size is a flag, `--preset long` the larger study.

Departures from the paper
1. Tiny: toy teachers of minutes, baselines at the student's pipeline's images (the paper: tens of
   GPU-hours, baselines run until they match).
2. The multi-task prompt set routes every prompt to its own task's reward (rewards/registry.py's per-sample
   routing by the metadata's "rewards"), tasks in equal shares.
3. Times are training minutes on one machine; the paper adds GPU-hours of teachers trained in parallel.

Run:
    python -m study.demo                                    # the toy study into runs/demo (make demo)
    python -m study.demo --quick --out runs/demo-quick      # every stage, tiny sizes (CI)
    python -m study.demo --preset long --out runs/demo-long # 3x the rounds and seeds' images
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from student import check_same_base
from plumbing.config import config_dict, option, parse_config
from plumbing.jsonfiles import read_json

ROOT = Path(__file__).resolve().parents[1]  # the repository: scripts run as modules from here
TASKS = ("geneval", "ocr", "aesthetic")      # the toy world's, in the cascade's order (--tasks)
TOY_MODEL = "models/toy-sd3"                 # the embedded base, whose world the study runs in


@dataclass
class DemoConfig:
    """The toy study: OPD, multi-task and cascade baselines, SFT, Fig. 6 seeds, Table 1, claims."""
    teachers: list[str] = field(default_factory=lambda: sorted(str(p) for p in (ROOT / "ckpts").glob("toy-*")))
    tasks: list[str] = option(factory=lambda: list(TASKS), help="one teacher each, in the cascade's order; the "
                                                                "joint baselines train on their prompts mixed "
                                                                "(study.mixed)")
    model: str = option(TOY_MODEL, "base pipeline folder (the embedded toy model)")
    recipe: str = option(f"{TOY_MODEL}/recipe.json", "every run's recipe: the toy world's, also on another --model")
    out: str = "runs/demo"
    quick: bool = option(False, "tiny sizes that exercise every stage (CI)")
    preset: str = option("default", "default | long: 3x OPD rounds, Fig. 6 rounds and evaluation prompts")
    nproc: int = option(2, "processes per training / evaluation command (torchrun when > 1)")
    threads: int = option(1, "OMP threads per process")
    num_steps: int = option(10, "sampling steps N of training rollouts (paper: 10)")
    opd_rounds: int = option(30, "S_o: OPD rounds (optimizer steps)")
    opd_prompts: int = option(8, "P: prompts per task per round")
    baseline_batch: int = option(32, "B: images per step of the multi-task and cascade baselines")
    group_size: int = option(8, "G: images per prompt")
    fig6_rounds: int = option(16, "rounds of each Fig. 6 run")
    fig6_prompts: int = option(4, "prompts per task per round of each Fig. 6 run")
    fig6_seeds: int = 3
    fig6_noise: float = option(0.7, "a of the SDE variants (paper Fig. 6: 0.7)")
    distance_prompts: int = option(12, "test prompts per task of the held-out distance")
    distance_every: int = option(2, "Fig. 6 rounds between two held-out distances (each costs ~5 s on 2 cores)")
    variance_rollouts: int = option(8, "R rollouts for the gradient-variance ratio")
    eval_prompts: int = option(16, "test prompts per task at each curve point of a run (curves.png, C3)")
    curve_points: int = option(5, "evaluations of every OPD, SFT and baseline run, the last at its end")
    baseline_images: int = option(-1, "images of each baseline: -1 = the teachers' + OPD's (equal total images)")
    sft_caption_dropout: float = option(0.1, "the SFT control's share of empty-prompt samples (pretraining's 0.1)")
    cfgs: list[float] = option(factory=lambda: [4.5, 1.0], help="every model gets a Table 1 row at each")
    eval_steps: int = option(40, "ODE steps of every evaluation (paper: 40)")
    final_prompts: int = option(128, "test prompts per task for Table 1")
    grid_prompts: int = option(8, "prompts per task in each model's sample grid")


QUICK = dict(nproc=1, num_steps=3, opd_rounds=2, opd_prompts=2, baseline_batch=6, group_size=2, fig6_rounds=2,
             fig6_prompts=1, fig6_seeds=2, distance_prompts=2, distance_every=1, variance_rollouts=2, eval_prompts=3, eval_steps=3,
             final_prompts=6, grid_prompts=3, curve_points=2, baseline_images=24)
LONG = dict(opd_rounds=90, fig6_rounds=48, final_prompts=256)


# ---------------------------------------------------------------------- plan
def plan(cfg: DemoConfig, teacher_images: int = 0) -> dict[str, dict]:
    """Steps, images per step and compute (steps x images) of every training run: S_o T P for OPD and
    both SFT runs; every baseline C = the teachers' images + OPD's (cfg.baseline_images when > 0):
    the multi-task runs round(C / B) steps of B images, cascade T x round(C / (T B))."""
    T, B = len(cfg.tasks), cfg.baseline_batch
    runs = {"opd": {"steps": cfg.opd_rounds, "images_per_step": T * cfg.opd_prompts}}
    C = cfg.baseline_images if cfg.baseline_images > 0 else \
        teacher_images + runs["opd"]["steps"] * runs["opd"]["images_per_step"]
    runs["sft"] = dict(runs["opd"])
    runs["sft-dropout"] = dict(runs["opd"])
    runs["multitask-guard"] = {"steps": max(1, round(C / B)), "images_per_step": B}
    runs["multitask-nft"] = {"steps": max(1, round(C / B)), "images_per_step": B}
    for k, t in enumerate(cfg.tasks, 1):
        runs[f"cascade-{k}-{t}"] = {"steps": max(1, round(C / (T * B))), "images_per_step": B}
    for variant in ("ode", "sde", "ppo"):
        for seed in range(cfg.fig6_seeds):
            runs[f"fig6/{variant}-s{seed}"] = {"steps": cfg.fig6_rounds, "images_per_step": T * cfg.fig6_prompts}
    for r in runs.values():
        r["compute"] = r["steps"] * r["images_per_step"]
    return runs


def check(cfg: DemoConfig) -> None:
    """Sizes that would fail a later stage fail here, before any training."""
    problems = [msg for bad, msg in [
        (cfg.baseline_batch % cfg.group_size, f"group_size {cfg.group_size} does not divide baseline_batch {cfg.baseline_batch}"),
        (cfg.baseline_batch % cfg.nproc, f"baseline_batch {cfg.baseline_batch} does not divide over {cfg.nproc} processes"),
        (cfg.opd_prompts % cfg.nproc, f"opd_prompts {cfg.opd_prompts} does not divide over {cfg.nproc} processes"),
        (cfg.fig6_prompts % cfg.nproc, f"fig6_prompts {cfg.fig6_prompts} does not divide over {cfg.nproc} processes"),
        (min(cfg.eval_prompts, cfg.final_prompts, cfg.distance_prompts) < cfg.nproc,
         f"fewer evaluation prompts than {cfg.nproc} processes"),
        (len(cfg.teachers) != len(cfg.tasks), f"--teachers: one per task {cfg.tasks}, got {cfg.teachers}"),
        (cfg.preset not in ("default", "long"), f"--preset must be default or long, got {cfg.preset!r}"),
    ] if bad]
    if problems:
        raise SystemExit("error: " + "; ".join(problems))


# ---------------------------------------------------------------------- running the scripts
def launch(cfg: DemoConfig, module: str, args: list[str]) -> None:
    """Run `python -m module ARGS` and log the command: with cfg.nproc > 1 under torchrun in fresh
    processes; with one process in this one (module.main(ARGS), the same code path without paying
    ~10 s of imports per stage), at cfg.threads threads."""
    launcher = [sys.executable] if cfg.nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.nproc}"]
    cmd = [*launcher, "-m", module, *args]
    print("\n$ " + shlex.join(cmd), flush=True)
    with open(Path(cfg.out) / "commands.txt", "a") as f:
        f.write(f"OMP_NUM_THREADS={cfg.threads} " + shlex.join(cmd) + "\n")
    if cfg.nproc > 1:
        subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(cfg.threads)})
        return
    import importlib

    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        importlib.import_module(module).main(args)
    finally:
        torch.set_num_threads(threads)


def by_task(cfg: DemoConfig) -> list[str]:
    """cfg.teachers in the order of cfg.tasks, each teacher's task read as opd.py reads it (its run_config.json;
    no weights loaded): the table's rows and claim C1 pair each task with its own teacher."""
    from opd import OPDConfig
    from teachers import resolve_teachers
    try:
        _, specs = resolve_teachers(OPDConfig(teachers=list(cfg.teachers)))
    except (ValueError, FileNotFoundError) as e:  # a folder that is no teacher, or names no task
        raise SystemExit(f"error: --teachers: {e}") from None
    found = {s["task"].name: ref for ref, s in zip(cfg.teachers, specs)}
    if sorted(found) != sorted(cfg.tasks):
        raise SystemExit(f"error: --teachers must hold one teacher per task {cfg.tasks}; theirs are {sorted(found)}")
    return [found[t] for t in cfg.tasks]


def joint_task(cfg: DemoConfig) -> list[str]:
    """The joint baselines' task: the base's mixed prompt set of the toy world's three tasks (its recipe names
    data/toy/mixed), or for other --tasks their teachers' prompt sets mixed into OUT/mixed (study.mixed)."""
    if list(cfg.tasks) == list(TASKS):
        return ["--task", "mixed"]
    from opd import OPDConfig
    from study.mixed import write_mixed_dataset
    from teachers import resolve_teachers
    _, specs = resolve_teachers(OPDConfig(teachers=list(cfg.teachers)))
    tasks = {s["task"].name: s["task"] for s in specs}
    folder = Path(cfg.out) / "mixed"
    write_mixed_dataset([tasks[t] for t in cfg.tasks], folder)
    return ["--task", "mixed", "--dataset", str(folder)]


def check_runs_share_the_base(cfg) -> None:
    """Refuse an OUT whose runs were trained on another base: the same --model path can hold new
    weights (a retrained base), and finished runs would otherwise be skipped and reported."""
    runs = sorted(p.parent for p in Path(cfg.out).glob("**/checkpoint/run_config.json"))
    if not runs:
        return
    from model import FlowModel
    model = FlowModel.load(cfg.model)
    try:
        for run in runs:
            check_same_base(str(run), model)
    except ValueError as e:
        raise SystemExit(f"error: {cfg.out} holds a run of another base model than {cfg.model}: {e}; "
                         f"remove {cfg.out} or pass another --out") from None


def finished(run: Path, steps: int) -> bool:
    """A run is done when its checkpoint holds `steps` optimizer steps."""
    saved = run / "checkpoint" / "run_config.json"
    return saved.is_file() and read_json(saved, "run config").get("step", 0) >= steps


def train(cfg: DemoConfig, module: str, name: str, steps: int, args: list[str], points: int = 1) -> Path:
    """Run `module` into OUT/name unless it is finished, evaluated `points` times (evenly, the last at
    its end); --resume continues an interrupted run."""
    run = Path(cfg.out) / name
    if finished(run, steps):
        print(f"[skip] {name}: {steps} steps done", flush=True)
        return run
    every = max(1, steps // max(1, points))
    launch(cfg, module, [*args, "--model", cfg.model, "--recipe", cfg.recipe, "--steps", str(steps), "--num_steps",
                         str(cfg.num_steps), "--eval_every", str(every), "--save_every", str(steps),
                         "--eval_prompts", str(cfg.eval_prompts), "--eval_steps", str(cfg.eval_steps),
                         "--out", str(run), "--resume"])
    if not finished(run, steps):
        raise SystemExit(f"error: {module} ended without a checkpoint of {steps} steps in {run}")
    return run


def distil(cfg: DemoConfig, name: str, steps: int, prompts: int, *args: str, points: int = 1) -> Path:
    return train(cfg, "study.instruments", name, steps, ["--teachers", *cfg.teachers, "--prompts_per_batch",
                                                         str(prompts), "--distance_prompts", str(cfg.distance_prompts),
                                                         *args], points)


def stage1(cfg: DemoConfig, module: str, name: str, steps: int, *args: str) -> Path:
    return train(cfg, module, name, steps, [*args, "--batch", str(cfg.baseline_batch), "--group_size",
                                            str(cfg.group_size)], cfg.curve_points)


def teacher_images(cfg: DemoConfig) -> int:
    """The teachers' training images, summed: each one's last metrics "images" (study.plots.read_metrics)."""
    from study.plots import read_metrics
    return sum(read_metrics(teacher)[-1]["images"] for teacher in cfg.teachers)


def gradient_variance(cfg: DemoConfig) -> dict:
    """study.instruments' variance ratio of the PPO-style / closed-form gradients at a = fig6_noise, saved
    to OUT/variance.json (one process; reused while R and a are unchanged)."""
    import torch

    from study import instruments
    path = Path(cfg.out) / "variance.json"
    setting = {"rollouts": cfg.variance_rollouts, "noise_level": cfg.fig6_noise}
    if path.is_file() and {k: read_json(path, "variance measurement").get(k) for k in setting} == setting:
        print(f"[skip] variance: {path} holds it", flush=True)
        return read_json(path, "variance measurement")
    args = ["--teachers", *cfg.teachers, "--model", cfg.model, "--noise_level", str(cfg.fig6_noise),
            "--variance_rollouts", str(cfg.variance_rollouts), "--recipe", cfg.recipe, "--prompts_per_batch",
            str(cfg.opd_prompts), "--num_steps", str(cfg.num_steps)]
    print("\n$ study.instruments.main(" + shlex.join(args) + ")", flush=True)
    with open(Path(cfg.out) / "commands.txt", "a") as f:
        f.write(f"OMP_NUM_THREADS={cfg.threads} {shlex.join([sys.executable, '-m', 'study.instruments', *args])}\n")
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:  # the measurement trains nothing and writes no run directory
        result = {**setting, **instruments.main(args)}
    finally:
        torch.set_num_threads(threads)
    path.write_text(json.dumps(result, indent=2))
    return result


# ---------------------------------------------------------------------- results
def row(name: str, g: float) -> str:
    """The Table 1 row of model `name` sampled at CFG g."""
    return f"{name}@{g:g}"


def claims(cfg: DemoConfig, table: dict, fig6: dict[str, list[str]], variance: dict, times: dict, own: dict,
           chains: dict, images: dict, joint_of: dict) -> str:
    """claims.md: the premise, the cross-task matrix and one row per claim of the paper (study/claims.py),
    each naming the CFG and the images it compares at. `own`: each model's deployed CFG; `chains`:
    each model's runs (study.plots curves); `images`: each model's training images (teachers' included);
    `joint_of`: per task, the multi-task baseline of its teacher's algorithm."""
    from study import claims as c
    from study.plots import minutes_to_reach
    tasks, teachers = list(cfg.tasks), {t: f"teacher-{t}" for t in cfg.tasks}
    rows = []
    # the premise: a joint run of the teacher's algorithm and recipe, with at least the teacher's images of
    # the task, gains less on it than the single-task teacher (same CFG)
    for t in tasks:
        joint, g = joint_of[t], own[teachers[t]]
        rows.append((f"P interference on {t}: the single-task teacher beats the joint {joint} run "
                     f"({images[teachers[t]]} vs {images[joint] // len(tasks)} images of the task, CFG {g:g})",
                     "teacher - joint", c.difference(table, row(teachers[t], g), row(joint, g), t)))
    for t in tasks:
        rows.append((f"C1 OPD reaches the {t} teacher (>= 95%; each at its deployed CFG: OPD "
                     f"{own['opd']:g}, teacher {own[teachers[t]]:g})", "student / teacher",
                     c.ratio_to_teacher(table, row("opd", own["opd"]), row(teachers[t], own[teachers[t]]), t)))
    total = images["opd"]
    for g in cfg.cfgs:
        at_g = [m["name"] for m in table["models"] if m["name"].endswith(f"@{g:g}")]
        for baseline in ("multitask-guard", "multitask-nft", "cascade-nft"):
            rows.append((f"C2 OPD beats {baseline} on the min-max average (CFG {g:g}; {total} vs {images[baseline]} "
                         "images, teachers' included)", "difference",
                         c.average_difference(table, row("opd", g), row(baseline, g), among=at_g)))
    # C3: training minutes to reach 90% of the teachers' mean reward on their own tasks (the curves)
    scores = {m["name"]: m["scores"] for m in table["models"]}
    target = 0.9 * sum(scores[row(teachers[t], own[teachers[t]])][t]["reward"] for t in tasks) / len(tasks)
    reach = {name: minutes_to_reach(chains[name], tasks, target) for name in ("opd", "multitask-guard", "multitask-nft")}
    cascade = scores[row("cascade-nft", own["cascade-nft"])]  # its stages evaluate their own task: the end only
    reach["cascade-nft"] = times["cascade-nft"] if sum(cascade[t]["reward"] for t in tasks) / len(tasks) >= target else None
    for baseline in ("multitask-guard", "multitask-nft", "cascade-nft"):
        mine, theirs = reach["opd"], reach[baseline]
        if mine is None and theirs is None:
            result = {"value": None, "interval": None, "verdict": "not tested (neither reached it)"}
        elif theirs is None:
            result = {"value": mine, "interval": None,
                      "verdict": f"reproduced ({baseline} did not reach it in {times[baseline]:.1f} min)"}
        elif mine is None:
            result = {"value": theirs, "interval": None, "verdict": "not reproduced (OPD did not reach it)"}
        else:
            result = {"value": mine - theirs, "interval": None,
                      "verdict": "reproduced" if mine < theirs else "not reproduced"}
        rows.append((f"C3 OPD (longest teacher + OPD) reaches 90% of the teachers' mean reward ({target:.3f}) "
                     f"in less training time than {baseline}", "minutes OPD - baseline"
                     if mine is not None and theirs is not None else "minutes", result))
    rows.append((f"C4 closed form beats PPO-style at a = {cfg.fig6_noise:g} (final held-out distance)", "PPO - closed form",
                 c.final_distance_difference(fig6["ppo"], fig6["sde"], tasks)))
    rows.append((f"C4 closed form more sample-efficient than PPO-style at a = {cfg.fig6_noise:g}", "images ratio PPO / closed form",
                 c.efficiency_ratio(fig6["sde"], fig6["ppo"], tasks)))
    rows.append((f"C5 ODE (a = 0) more sample-efficient than a = {cfg.fig6_noise:g} (paper: up to ~5x)", "images ratio SDE / ODE",
                 c.efficiency_ratio(fig6["ode"], fig6["sde"], tasks)))
    g = own["opd"]
    at_g = [m["name"] for m in table["models"] if m["name"].endswith(f"@{g:g}")]
    for sft in ("sft", "sft-dropout"):
        rows.append((f"C6 OPD beats {sft} on teacher samples on the min-max average (CFG {g:g}; equal images)",
                     "difference", c.average_difference(table, row("opd", g), row(sft, g), among=at_g)))
    text = c.format_claims(rows)
    matrix = c.cross_task_matrix(table, {f"{teachers[t]} ({own[teachers[t]]:g})": (row(teachers[t], own[teachers[t]]),
                                                                                   row("base", own[teachers[t]]))
                                         for t in tasks}, tasks)
    ratio = variance["ratio"]
    return (text + "\nCross-task effects: each teacher minus the base at the teacher's CFG, on every task "
            "[95% paired bootstrap interval]:\n\n" + matrix +
            f"\nGradient variance of the PPO-style estimator / the closed form's at a = {variance['noise_level']}: "
            f"{ratio:.1f}x ({variance['rollouts']} rollouts; cosine of their mean gradients {variance['cos_mean_grads']:.2f}).\n")


def teacher_minutes(cfg: DemoConfig) -> dict[str, float]:
    from study.plots import run_seconds
    return {Path(t).name: run_seconds(t) / 60 for t in cfg.teachers}


def main(argv=None) -> dict:
    cfg = parse_config(DemoConfig, argv)
    if cfg.quick:
        cfg = dataclasses.replace(cfg, **{k: v for k, v in QUICK.items() if f"--{k}" not in (argv or sys.argv[1:])})
    elif cfg.preset == "long":
        cfg = dataclasses.replace(cfg, **LONG)
    check(cfg)
    cfg = dataclasses.replace(cfg, teachers=by_task(cfg))
    check_runs_share_the_base(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    teachers_seen = teacher_images(cfg) if cfg.baseline_images <= 0 else 0
    runs = plan(cfg, teachers_seen)
    (out / "plan.json").write_text(json.dumps({"config": config_dict(cfg), "runs": runs,
                                               "teacher_images": teachers_seen}, indent=2))
    print("plan (steps x images per step = compute):\n" + "\n".join(
        f"  {name:24s} {r['steps']:5d} x {r['images_per_step']:3d} = {r['compute']}" for name, r in runs.items()))

    # ---- 2. OPD, 3. SFT (and its control) at OPD's images, the baselines at the teachers' + OPD's
    opd_run = distil(cfg, "opd", cfg.opd_rounds, cfg.opd_prompts, points=cfg.curve_points)
    sft = distil(cfg, "sft", cfg.opd_rounds, cfg.opd_prompts, "--baseline", "sft", points=cfg.curve_points)
    sft_dropout = distil(cfg, "sft-dropout", cfg.opd_rounds, cfg.opd_prompts, "--baseline", "sft",
                         "--sft_caption_dropout", str(cfg.sft_caption_dropout), points=cfg.curve_points)
    joint = joint_task(cfg)
    guard = stage1(cfg, "teacher_rl", "multitask-guard", runs["multitask-guard"]["steps"], *joint,
                   "--ratio_norm", "--lr", "1e-3")
    nft_mt = stage1(cfg, "nft", "multitask-nft", runs["multitask-nft"]["steps"], *joint)
    cascade = []
    for k, t in enumerate(cfg.tasks, 1):
        init = ["--init_lora", str(cascade[-1] / "checkpoint")] if cascade else []
        cascade.append(stage1(cfg, "nft", f"cascade-{k}-{t}", runs[f"cascade-{k}-{t}"]["steps"], "--task", t,
                              *init))

    # ---- 4. Fig. 6: ODE vs SDE (closed form), closed form vs PPO-style (a = 0.7), seeds, distance every round
    variants = {"ode": ["--noise_level", "0"], "sde": ["--noise_level", str(cfg.fig6_noise)],
                "ppo": ["--noise_level", str(cfg.fig6_noise), "--estimator", "ppo"]}
    fig6 = {v: [str(distil(cfg, f"fig6/{v}-s{s}", cfg.fig6_rounds, cfg.fig6_prompts, *args, "--seed", str(s),
                           "--distance_every", str(cfg.distance_every))) for s in range(cfg.fig6_seeds)]
            for v, args in variants.items()}
    variance = gradient_variance(cfg)

    # ---- 6. Table 1: every model at every CFG of cfg.cfgs, with intervals; curves, samples; Fig. 6; claims
    from study.plots import plot_distance, read_metrics, run_seconds
    from study.table import ModelSpec, model_guidance, resolve_adapter
    results = out / "results"
    tmin = teacher_minutes(cfg)
    models = {"base": cfg.model, **{f"teacher-{t}": f"{cfg.model}+{p}" for t, p in zip(cfg.tasks, cfg.teachers)},
              "opd": f"{cfg.model}+{opd_run}", "sft": f"{cfg.model}+{sft}", "sft-dropout": f"{cfg.model}+{sft_dropout}",
              "multitask-guard": f"{cfg.model}+{guard}", "multitask-nft": f"{cfg.model}+{nft_mt}",
              "cascade-nft": f"{cfg.model}+{cascade[-1]}"}
    own_rule = SimpleNamespace(guidance=cfg.cfgs[0], own_guidance=True)  # the fields model_guidance reads
    own = {name: model_guidance(ModelSpec(name, cfg.model, resolve_adapter(ref.split("+", 1)[1]) if "+" in ref else None),
                                own_rule) for name, ref in models.items()}
    cfgs = list(dict.fromkeys([*cfg.cfgs, *own.values()]))
    longest = max(cfg.teachers, key=lambda t: tmin[Path(t).name])
    chains = {**{f"teacher-{t}": [p] for t, p in zip(cfg.tasks, cfg.teachers)}, "opd": [longest, str(opd_run)],
              "sft": [longest, str(sft)], "sft-dropout": [longest, str(sft_dropout)], "multitask-guard": [str(guard)],
              "multitask-nft": [str(nft_mt)], "cascade-nft": [str(r) for r in cascade]}
    # the curves charge OPD and SFT with all three teachers (their images and minutes: total compute, C2's
    # images); the time column and C3 with the longest teacher only (trained in parallel, the paper's)
    curve_chains = {**chains, **{k: [*cfg.teachers, chains[k][-1]] for k in ("opd", "sft", "sft-dropout")}}
    launch(cfg, "study.table", ["--models", *[f"{row(k, g)}={v}@{g:g}" for k, v in models.items() for g in cfgs],
                                "--time", *[f"{row(k, g)}={'+'.join(v)}" for k, v in chains.items() for g in cfgs],
                                "--curves", *[f"{k}={'+'.join(v)}" for k, v in curve_chains.items()],
                                "--tasks", *cfg.tasks, "--recipe", cfg.recipe, "--prompts", str(cfg.final_prompts), "--steps",
                                str(cfg.eval_steps), "--grid_prompts", str(cfg.grid_prompts), "--out", str(results)])
    table = read_json(results / "table.json", "table")
    plot_distance([("closed form vs PPO-style (a = %g)" % cfg.fig6_noise, {"closed form": fig6["sde"], "PPO-style": fig6["ppo"]}),
                   ("ODE vs SDE (closed form)", {"ODE (a = 0)": fig6["ode"], f"SDE (a = {cfg.fig6_noise:g})": fig6["sde"]})],
                  list(cfg.tasks), str(results / "fig6.png"))
    times = {name: sum(run_seconds(r) for r in chain) / 60 for name, chain in chains.items()}
    times["opd (total compute)"] = sum(tmin.values()) + run_seconds(str(opd_run)) / 60
    images = {name: sum(read_metrics(r)[-1].get("images", 0) for r in chain) for name, chain in chains.items()}
    # OPD's pipeline (and SFT's, whose teachers are OPD's): every teacher's images (its chain holds only the
    # longest teacher's time) + its own
    for name, run in (("opd", opd_run), ("sft", sft), ("sft-dropout", sft_dropout)):
        images[name] = sum(images[f"teacher-{t}"] for t in cfg.tasks) + read_metrics(str(run))[-1].get("images", 0)
    joint_of = {t: "multitask-nft" if read_json(Path(resolve_adapter(p)) / "run_config.json", "the teacher's run "
                                                "config").get("algorithm") == "nft" else "multitask-guard"
                for t, p in zip(cfg.tasks, cfg.teachers)}
    text = claims(cfg, table, fig6, variance, times, own, chains, images, joint_of)
    header = (f"Claims of the paper on the toy world ({cfg.final_prompts} test prompts per task, {cfg.fig6_seeds} "
              "seeds per Fig. 6 variant; intervals: 95% bootstrap over prompts, or over seeds for C4-C5; rows "
              "NAME@CFG are sampled at that CFG; deployed CFGs: " + ", ".join(f"{k} {v:g}" for k, v in own.items()) + ").")
    (results / "claims.md").write_text(
        f"{header}\n\n{text}\n"
        "Times (training min, a chain's runs summed): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()) + "\n"
        "Images (training, a chain's runs summed; OPD's and SFT's with every teacher's): " +
        ", ".join(f"{k} {v}" for k, v in images.items()) + "\n")
    print("\n" + text + f"\nwrote {results}/table.md, table.json, claims.md, fig6.png, curves.png, samples/*.png")
    return {"results": str(results), "variance": variance, "plan": runs, "config": dataclasses.asdict(cfg)}

if __name__ == "__main__":
    main()
