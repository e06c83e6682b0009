"""The paper's toy study in one command: Table 1 and Figs. 3 and 6 in miniature (paper sections 5, 8, 9).

Stages, in order; each skips the work already done, so an interrupted demo continues where it stopped
(an OUT holding runs of another base model is refused):
  1. teachers   one Flow-GRPO teacher per task (teacher_rl.py)                  OUT/teacher-<task>/
  2. opd        DiffusionOPD from those teachers: ODE (a = 0), closed form (opd.py)      OUT/opd/
  3. joint      joint multi-reward GRPO on a mixed prompt set, each prompt judged by its
                own task's reward (teacher_rl.py --task mixed)                 OUT/data/mixed/, OUT/joint/
  4. cascade    GRPO on one task after another, chained by --init_lora         OUT/cascade-<k>-<task>/
  5. ablations  opd.py at a = 0.7 with the closed-form and the PPO-style estimator (Fig. 6), and the
                gradient-variance ratio of the two estimators (opd.main, --variance_rollouts)
                                                               OUT/opd-sde/, OUT/opd-ppo/, OUT/variance.json
  6. results    study/table.py (Table 1, Fig. 3 curves, sample grids), study/plots.py (Fig. 6)  OUT/results/
Every command run is appended to OUT/commands.txt; OUT/plan.json holds each run's steps and compute.

Equal compute: the baselines get the optimizer steps x images of teachers + OPD,
    C = T S_t B + S_o T P       T tasks; teachers: S_t steps of B images; OPD: S_o rounds of T x P images
    joint: round(C / B) steps of B images;  cascade: T stages of round(C / (T B)) steps of B images.

Budget (defaults): <= 60 min on 2 CPU cores; measured times are in docs/study.md. `--quick` runs every
stage with tiny step counts (tests/test_demo.py).

Departures from the paper
1. Tiny: teachers see 768 images each (the paper: tens of GPU-hours of SD3.5-M).
2. Teachers and baselines use Flow-GRPO (the paper: DiffusionNFT / GRPO-Guard, section 8).
3. The joint baseline's reward routes every prompt to its own task's reward (r_i = r_task(i)(x_i),
   rewards.py per-sample routing by the metadata's "rewards"), with tasks in equal shares.
4. Times are training minutes of runs one after another on one machine (evaluate.py departure 2).

Run:
    python -m study.demo                              # the toy study, models/toy-sd3, into runs/demo
    python -m study.demo --quick --out runs/demo-quick      # every stage, tiny step counts (CI)
    python -m study.demo --teacher_steps 48 --opd_steps 48 --out runs/demo-2x     # every size is a flag
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from data import load_task, write_mixed_dataset
from harness import check_same_base, config_dict, parse_config
from model import TOY_MODEL

ROOT = Path(__file__).resolve().parents[1]  # the repository: scripts run as modules from here


@dataclass
class DemoConfig:
    """The toy study: teachers, OPD, joint and cascade GRPO baselines, Fig. 6 ablations, Table 1 and figures."""
    model: str = TOY_MODEL              # base pipeline folder (the embedded toy model)
    out: str = "runs/demo"
    quick: bool = False                 # tiny step counts (QuickDemoConfig) that exercise every stage
    nproc: int = 2                      # processes per training / evaluation command (torchrun when > 1)
    threads: int = 1                    # OMP threads per process
    tasks: list[str] = field(default_factory=lambda: ["geneval", "ocr", "aesthetic"])  # cascade order too
    num_steps: int = 10                 # sampling steps N of training rollouts (paper: 10)
    teacher_steps: int = 24             # S_t: GRPO steps per teacher
    teacher_batch: int = 32             # B: images per GRPO step (teachers, joint, cascade)
    group_size: int = 8                 # G: images per prompt
    opd_steps: int = 24                 # S_o: OPD rounds (optimizer steps)
    opd_prompts: int = 8                # P: prompts (= images) per task per round
    ablation_steps: int = 24            # OPD rounds of each a = 0.7 ablation run
    ablation_noise: float = 0.7         # a of the ablations (paper Fig. 6: 0.7)
    variance_rollouts: int = 8          # R rollouts for the gradient-variance ratio
    evals_per_run: int = 4              # evaluations during each training run (curves)
    eval_prompts: int = 16              # test prompts per task at those evaluations
    eval_steps: int = 40                # ODE steps of every evaluation (paper: 40)
    final_prompts: int = 64             # test prompts per task for Table 1
    grid_prompts: int = 8               # prompts per task in each model's sample grid


@dataclass
class QuickDemoConfig(DemoConfig):
    """--quick: the same stages with tiny step counts (CI; its time: docs/study.md)."""
    nproc: int = 1
    num_steps: int = 3
    teacher_steps: int = 2
    teacher_batch: int = 8
    group_size: int = 4
    opd_steps: int = 2
    opd_prompts: int = 2
    ablation_steps: int = 2
    variance_rollouts: int = 2
    evals_per_run: int = 1
    eval_prompts: int = 4               # >= 3: the mixed prompt set's first prompts cover every task
    eval_steps: int = 3
    final_prompts: int = 4
    grid_prompts: int = 4


# ---------------------------------------------------------------------- plan
def plan(cfg: DemoConfig) -> dict[str, dict]:
    """Steps, images per step and compute (steps x images) of every training run, equal compute for
    the baselines: C = T S_t B + S_o T P; joint round(C / B) steps; cascade T x round(C / (T B))."""
    T, B = len(cfg.tasks), cfg.teacher_batch
    runs = {f"teacher-{t}": {"steps": cfg.teacher_steps, "images_per_step": B} for t in cfg.tasks}
    runs["opd"] = {"steps": cfg.opd_steps, "images_per_step": T * cfg.opd_prompts}
    C = sum(r["steps"] * r["images_per_step"] for r in runs.values())
    runs["joint"] = {"steps": max(1, round(C / B)), "images_per_step": B}
    for k, t in enumerate(cfg.tasks, 1):
        runs[f"cascade-{k}-{t}"] = {"steps": max(1, round(C / (T * B))), "images_per_step": B}
    for name in ("opd-sde", "opd-ppo"):
        runs[name] = {"steps": cfg.ablation_steps, "images_per_step": T * cfg.opd_prompts}
    for r in runs.values():
        r["compute"] = r["steps"] * r["images_per_step"]
    return runs


def check(cfg: DemoConfig) -> None:
    """Sizes that would fail a later stage fail here, before any training."""
    problems = [msg for bad, msg in [
        (cfg.teacher_batch % cfg.group_size, f"group_size {cfg.group_size} does not divide teacher_batch {cfg.teacher_batch}"),
        (cfg.teacher_batch % cfg.nproc, f"teacher_batch {cfg.teacher_batch} does not divide over {cfg.nproc} processes"),
        (cfg.opd_prompts % cfg.nproc, f"opd_prompts {cfg.opd_prompts} does not divide over {cfg.nproc} processes"),
        (min(cfg.eval_prompts, cfg.final_prompts) < cfg.nproc, f"fewer evaluation prompts than {cfg.nproc} processes"),
        (len(set(cfg.tasks)) != len(cfg.tasks) or len(cfg.tasks) < 2, f"tasks {cfg.tasks}: two or more, distinct"),
    ] if bad]
    if problems:
        raise SystemExit("error: " + "; ".join(problems))


# ---------------------------------------------------------------------- the mixed prompt set
# ---------------------------------------------------------------------- running the scripts
def launch(cfg: DemoConfig, module: str, args: list[str]) -> None:
    """Run `python -m module` in a fresh process (torchrun with cfg.nproc processes when > 1); log the command."""
    launcher = [sys.executable] if cfg.nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.nproc}"]
    cmd = [*launcher, "-m", module, *args]
    print("\n$ " + shlex.join(cmd), flush=True)
    with open(Path(cfg.out) / "commands.txt", "a") as f:
        f.write(f"OMP_NUM_THREADS={cfg.threads} " + shlex.join(cmd) + "\n")
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(cfg.threads)})


def check_runs_share_the_base(cfg) -> None:
    """Refuse an OUT whose runs were trained on another base: the same --model path can hold new
    weights (a retrained base), and finished runs would otherwise be skipped and reported."""
    runs = sorted(p.parent for p in Path(cfg.out).glob("*/checkpoint/run_config.json"))
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
    return saved.is_file() and json.loads(saved.read_text()).get("step", 0) >= steps


def train(cfg: DemoConfig, module: str, name: str, steps: int, args: list[str]) -> Path:
    """Run `module` into OUT/name unless it is finished; --resume continues an interrupted run."""
    run = Path(cfg.out) / name
    if finished(run, steps):
        print(f"[skip] {name}: {steps} steps done", flush=True)
        return run
    every = max(1, steps // cfg.evals_per_run)
    launch(cfg, module, [*args, "--model", cfg.model, "--recipe", "toy", "--steps", str(steps), "--num_steps", str(cfg.num_steps),
                         "--eval_every", str(every), "--save_every", str(every), "--eval_prompts",
                         str(cfg.eval_prompts), "--eval_steps", str(cfg.eval_steps), "--out", str(run), "--resume"])
    assert finished(run, steps), f"{module} ended without a checkpoint of {steps} steps in {run}"
    return run


def grpo(cfg: DemoConfig, name: str, steps: int, *args: str) -> Path:
    return train(cfg, "teacher_rl", name, steps, [*args, "--batch", str(cfg.teacher_batch),
                                                     "--group_size", str(cfg.group_size)])


def distil(cfg: DemoConfig, name: str, steps: int, teachers: list[Path], *args: str) -> Path:
    return train(cfg, "opd", name, steps, ["--teachers", *[str(t / "checkpoint") for t in teachers],
                                              "--prompts_per_batch", str(cfg.opd_prompts), *args])


def gradient_variance(cfg: DemoConfig, teachers: list[Path]) -> dict:
    """opd.main's variance ratio of the PPO-style / closed-form gradients at a = ablation_noise,
    saved to OUT/variance.json (one process; reused while R and a are unchanged)."""
    import torch

    import opd
    path = Path(cfg.out) / "variance.json"
    setting = {"rollouts": cfg.variance_rollouts, "noise_level": cfg.ablation_noise}
    if path.is_file() and {k: json.loads(path.read_text()).get(k) for k in setting} == setting:
        print(f"[skip] variance: {path} holds it", flush=True)
        return json.loads(path.read_text())
    args = ["--teachers", *[str(t / "checkpoint") for t in teachers], "--model", cfg.model, "--noise_level",
            str(cfg.ablation_noise), "--variance_rollouts", str(cfg.variance_rollouts), "--recipe", "toy", "--prompts_per_batch",
            str(cfg.opd_prompts), "--num_steps", str(cfg.num_steps)]
    print("\n$ opd.main(" + shlex.join(args) + ")", flush=True)
    with open(Path(cfg.out) / "commands.txt", "a") as f:
        f.write(f"OMP_NUM_THREADS={cfg.threads} {shlex.join([sys.executable, '-m', 'opd', *args])}\n")
    torch.set_num_threads(cfg.threads)
    with tempfile.TemporaryDirectory() as scratch:  # the measurement trains nothing: its run directory is dropped
        result = {**setting, **opd.main([*args, "--out", scratch])}
    path.write_text(json.dumps(result, indent=2))
    return result


def main(argv=None) -> dict:
    cfg = parse_config(DemoConfig, argv)
    if cfg.quick:
        cfg = parse_config(QuickDemoConfig, argv)
    check(cfg)
    check_runs_share_the_base(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = plan(cfg)
    (out / "plan.json").write_text(json.dumps({"config": config_dict(cfg), "runs": runs}, indent=2))
    print("plan (steps x images per step = compute):\n" + "\n".join(
        f"  {name:24s} {r['steps']:5d} x {r['images_per_step']:3d} = {r['compute']}" for name, r in runs.items()))
    tasks = [load_task(t) for t in cfg.tasks]

    # ---- 1. teachers, 2. OPD (ODE, closed form)
    teachers = [grpo(cfg, f"teacher-{t.name}", runs[f"teacher-{t.name}"]["steps"], "--task", t.name) for t in tasks]
    opd_run = distil(cfg, "opd", runs["opd"]["steps"], teachers)

    # ---- 3. joint multi-reward GRPO on the mixed prompt set
    mixed = write_mixed_dataset(tasks, out / "data" / "mixed")
    joint = grpo(cfg, "joint", runs["joint"]["steps"], "--task", mixed.name, "--dataset", mixed.dataset)

    # ---- 4. cascade: one task after another, each stage starting from the previous adapter
    cascade = []
    for k, t in enumerate(tasks, 1):
        init = ["--init_lora", str(cascade[-1] / "checkpoint")] if cascade else []
        cascade.append(grpo(cfg, f"cascade-{k}-{t.name}", runs[f"cascade-{k}-{t.name}"]["steps"], "--task", t.name,
                            *init))

    # ---- 5. Fig. 6 ablations at a = 0.7 and the gradient-variance ratio
    noise = ["--noise_level", str(cfg.ablation_noise)]
    sde = distil(cfg, "opd-sde", runs["opd-sde"]["steps"], teachers, *noise)
    ppo = distil(cfg, "opd-ppo", runs["opd-ppo"]["steps"], teachers, *noise, "--estimator", "ppo")
    variance = gradient_variance(cfg, teachers)

    # ---- 6. Table 1, Fig. 3 curves, sample grids (study/table.py); Fig. 6 (study/plots.py)
    results = out / "results"
    models = {"base": cfg.model, **{f"teacher-{t.name}": f"{cfg.model}+{r}" for t, r in zip(tasks, teachers)},
              "joint-grpo": f"{cfg.model}+{joint}", "cascade-grpo": f"{cfg.model}+{cascade[-1]}",
              "opd": f"{cfg.model}+{opd_run}"}
    times = {**{f"teacher-{t.name}": [r] for t, r in zip(tasks, teachers)}, "joint-grpo": [joint],
             "cascade-grpo": cascade, "opd": [*teachers, opd_run]}
    launch(cfg, "study.table", ["--models", *[f"{k}={v}" for k, v in models.items()],
                                "--time", *[f"{k}={'+'.join(map(str, v))}" for k, v in times.items()],
                                "--tasks", *cfg.tasks, "--prompts", str(cfg.final_prompts), "--steps",
                                str(cfg.eval_steps), "--grid_prompts", str(cfg.grid_prompts), "--out", str(results)])
    from study.plots import plot_ablation
    a = cfg.ablation_noise
    plot_ablation([(f"closed form vs PPO-style (a = {a})", {"closed form": str(sde), "PPO-style": str(ppo)}),
                   ("ODE vs SDE (closed form)", {"ODE (a = 0)": str(opd_run), f"SDE (a = {a})": str(sde)})],
                  cfg.tasks, str(results / "ablation.png"), variance)
    print(f"\nwrote {results}/table.md, table.json, curves.png, ablation.png, samples/*.png; "
          f"gradient variance ratio PPO-style / closed form = {variance['ratio']:.1f} (a = {a})")
    return {"results": str(results), "variance": variance, "plan": runs, "config": dataclasses.asdict(cfg)}


if __name__ == "__main__":
    main()
