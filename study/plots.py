"""Figures of the study, drawn from run logs: reward against training images and wall-clock (paper
Fig. 3), the OPD ablations against optimizer steps (paper Fig. 6), and sample grids.

What a run directory (teacher_rl.py, opd.py) logs in metrics.jsonl, one JSON line per step:
    sec/<phase>          seconds of each phase of the step; training time = their sum without sec/eval
    images               training images so far (Stage 1: steps x batch; OPD: rounds x prompts x tasks)
    reward_mean          GRPO training reward of the step's SDE rollouts (teacher_rl.py)
    eval/<key>           teacher_rl.py: its own task's ODE evaluation (eval/reward, eval/strict)
    eval/<task>/<key>    opd.py, and teacher_rl.py on a mixed task (evaluate.py): each task's evaluation
A chain of runs (a cascade; OPD after its teachers) shares its axes: each run starts where the
previous one ended, in minutes and in images. Curves plot `reward` (GenEval: partial credit), the quantity every run logs.

Departures from the paper
1. Time is wall-clock *training* minutes on this machine, summed over a chain's runs (the paper:
   GPU hours, teachers trained in parallel). Evaluation time (sec/eval) is not training time.
2. A step logged twice (a run resumed from a checkpoint older than its last logged step) counts
   once, with its last record: the model at the end holds the work of that record only.

Run (regenerates the figures from logs, no model needed):
    python -m study.plots curves --tasks geneval ocr aesthetic --out curves.png \\
        --runs "opd=runs/demo/teacher-geneval+runs/demo/teacher-ocr+runs/demo/teacher-aesthetic+runs/demo/opd" \\
               joint=runs/demo/joint
    python -m study.plots ablation --tasks geneval ocr aesthetic --variance runs/demo/variance.json --out ablation.png \\
        --panel "closed form vs PPO-style (a = 0.7)" "closed form=runs/demo/opd-sde" "PPO-style=runs/demo/opd-ppo" \\
        --panel "ODE vs SDE (closed form)" "ODE (a = 0)=runs/demo/opd" "SDE (a = 0.7)=runs/demo/opd-sde"
"""
from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from plumbing.jsonfiles import read_json, read_jsonl  # noqa: E402


# ---------------------------------------------------------------------- reading run logs
def read_metrics(run: str) -> list[dict]:
    """The records of <run>/metrics.jsonl, one per step (the last one of a step logged twice), by step."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"run {run} has no metrics.jsonl (expected a teacher_rl.py / opd.py run directory)")
    by_step = {}
    for number, record in enumerate(read_jsonl(path, "metrics", torn_tail_ok=True), 1):  # a killed run's tail
        if not isinstance(record, dict) or "step" not in record:
            raise ValueError(f"{path}: record {number} has no 'step': {str(record)[:200]}")
        by_step[record["step"]] = record
    records = [by_step[s] for s in sorted(by_step)]
    # a Stage-1 run logged before records carried "images" (the shipped teachers): (step + 1) x batch
    config = Path(run) / "config.json"
    if any("images" not in r for r in records) and config.is_file():
        batch = read_json(config, "the run's config").get("batch")
        if isinstance(batch, int):
            records = [{**r, "images": (r["step"] + 1) * batch} if "images" not in r else r for r in records]
    return records


def train_seconds(record: dict) -> float:
    """Training seconds of one step: its sec/* fields summed, evaluation (sec/eval) left out."""
    return sum(v for k, v in record.items() if k.startswith("sec/") and k != "sec/eval")


def run_seconds(run: str) -> float:
    return sum(train_seconds(r) for r in read_metrics(run))


def run_task(run: str) -> str | None:
    """The task a teacher_rl.py run trained on (config.json), or None for an opd.py run."""
    path = Path(run) / "config.json"
    return read_json(path, "the run's config").get("task") if path.is_file() else None


def eval_reward(record: dict, task: str, own_task: str | None) -> float | None:
    """The record's evaluation reward on `task`: eval/<task>/reward, or eval/reward of a run trained on it."""
    if f"eval/{task}/reward" in record:
        return record[f"eval/{task}/reward"]
    if own_task == task and "eval/reward" in record:
        return record["eval/reward"]
    return None


# ---------------------------------------------------------------------- figures
def _label_once(label, seen):
    """`label` the first time a panel sees it, then None (one legend entry per chain)."""
    if label in seen:
        return None
    seen.add(label)
    return label


def plot_curves(chains: dict[str, list[str]], tasks: list[str], path: str) -> None:
    """One column per task of evaluation reward (evaluate.py's ODE, each run at its own CFG), against
    the chain's training images (top row; a record's "images") and its cumulative training minutes
    (bottom row). The earlier runs of a chain are drawn dashed, except a run that is a chain of its
    own (OPD's teachers): it is drawn there and only shifts the axes here."""
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.2 * len(tasks), 7.0), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    seen = [[set() for _ in row] for row in axes]
    alone = {runs[0] for runs in chains.values() if len(runs) == 1}
    for c, (name, runs) in enumerate(chains.items()):
        color, offset, images_offset = colors[c % len(colors)], 0.0, 0
        for r, run in enumerate(runs):
            last = r == len(runs) - 1
            records = read_metrics(run)
            minutes, elapsed = [], offset
            for record in records:
                elapsed += train_seconds(record) / 60
                minutes.append(elapsed)
            images = [images_offset + rec["images"] if "images" in rec else None for rec in records]
            offset, images_offset = elapsed, images[-1] if records and images[-1] is not None else images_offset
            if not last and run in alone:
                continue
            own = run_task(run)
            for t, task in enumerate(tasks):
                ys = [eval_reward(rec, task, own) for rec in records]
                for row, xs in enumerate((images, minutes)):
                    points = [(x, y) for x, y in zip(xs, ys) if y is not None and x is not None]
                    if points:
                        axes[row][t].plot(*zip(*points), marker="o", ms=3, color=color, ls="-" if last else "--",
                                          alpha=1.0 if last else 0.6, label=_label_once(name, seen[row][t]))
    for t, task in enumerate(tasks):
        for row, xlabel in enumerate(("training images (a chain's runs summed)", "training wall-clock (min)")):
            ax = axes[row][t]
            ax.set_title(f"{task}: evaluation reward\n(ODE, each run's CFG, its test prompts)", fontsize=9)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        axes[0][t].set_ylabel("reward")
        axes[1][t].set_ylabel("reward")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def mean_eval_reward(record: dict, tasks: list[str]) -> float | None:
    """Mean over tasks of eval/<task>/reward (an opd.py evaluation step), None if a task is missing."""
    values = [record.get(f"eval/{t}/reward") for t in tasks]
    return None if None in values else sum(values) / len(values)


def minutes_to_reach(chain: list[str], tasks: list[str], threshold: float) -> float | None:
    """Training minutes of a chain (its earlier runs' in full, then its last run's up to the step) at the
    first evaluation of its last run whose mean reward over `tasks` is >= threshold; None if none is
    (or the last run does not evaluate every task)."""
    offset = sum(run_seconds(run) for run in chain[:-1]) / 60
    elapsed = offset
    for record in read_metrics(chain[-1]):
        elapsed += train_seconds(record) / 60
        mean = mean_eval_reward(record, tasks)
        if mean is not None and mean >= threshold:
            return elapsed
    return None


def plot_ablation(panels: list[tuple[str, dict[str, str]]], tasks: list[str], path: str,
                  variance: dict | None = None) -> None:
    """Fig. 6: per panel, the mean evaluation reward over tasks of opd.py runs against optimizer steps;
    `variance` (opd.py --variance_rollouts result) annotates the first panel with the variance ratio."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, (title, runs) in zip(axes[0], panels):
        for name, run in runs.items():
            points = [(rec["step"] + 1, mean_eval_reward(rec, tasks)) for rec in read_metrics(run)]
            points = [(x, y) for x, y in points if y is not None]
            if not points:
                raise ValueError(f"run {run} logged no evaluation of all tasks {tasks} (is it an opd.py run?)")
            ax.plot(*zip(*points), marker="o", ms=3, label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer steps (rounds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("evaluation reward, mean over tasks")
    if variance is not None:  # zero closed-form variance: teachers equal to the student, nothing to compare
        ratio = f"{variance['ratio']:.1f}x" if variance["closed_form"]["var"] > 0 else "undefined (zero gradients)"
        axes[0][0].text(0.02, 0.02, f"gradient variance PPO-style / closed form = {ratio}\n"
                        f"({variance['rollouts']} rollouts, a = {variance['noise_level']})",
                        transform=axes[0][0].transAxes, fontsize=7, va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


_CURVES: dict[tuple, tuple] = {}  # distance_curve's results by (run, tasks, metrics file's size and time)


def distance_curve(run: str, tasks: list[str]) -> tuple[list[float], list[float], list[float]]:
    """(images seen, training seconds, mean over tasks of the held-out distance to the teachers) at every
    step an opd.py run logged eval/<task>/distance for all tasks (opd.py --distance_every). Read once per
    state of the run's metrics.jsonl (the bootstraps of study/claims.py ask thousands of times)."""
    metrics = Path(run) / "metrics.jsonl"
    stat = metrics.stat() if metrics.is_file() else None
    key = (str(run), tuple(tasks), stat and (stat.st_size, stat.st_mtime_ns))
    if key not in _CURVES:
        _CURVES[key] = _read_distance_curve(run, tasks)
    return _CURVES[key]


def _read_distance_curve(run: str, tasks: list[str]) -> tuple[list[float], list[float], list[float]]:
    cfg = read_json(Path(run) / "config.json", "the run's config")
    if "prompts_per_batch" not in cfg:
        raise ValueError(f"run {run} logged no held-out distance for all tasks {tasks} (not an opd.py run)")
    per_round = cfg["prompts_per_batch"] * len(tasks)
    images, seconds, distance, elapsed = [], [], [], 0.0
    for record in read_metrics(run):
        elapsed += train_seconds(record)
        values = [record.get(f"eval/{t}/distance") for t in tasks]
        if None not in values:
            images.append((record["step"] + 1) * per_round)
            seconds.append(elapsed)
            distance.append(sum(values) / len(values))
    if not distance:
        raise ValueError(f"run {run} logged no held-out distance for all tasks {tasks} (opd.py --distance_every)")
    return images, seconds, distance


def _mean_curve(runs: list[str], tasks: list[str], axis: int):
    """The seeds' curves on a common x (axis 0: images, 1: seconds, interpolated): (x, mean, lo, hi)."""
    import numpy as np
    curves = [distance_curve(run, tasks) for run in runs]
    xs = np.asarray(curves[0][axis], dtype=float) if axis == 0 else np.linspace(
        max(c[1][0] for c in curves), min(c[1][-1] for c in curves), 50)
    ys = np.stack([np.interp(xs, c[axis], c[2]) for c in curves])
    return xs, ys.mean(0), ys.min(0), ys.max(0)


def images_to_reach(runs: list[str], tasks: list[str], threshold: float) -> float | None:
    """Images the seed-mean distance curve needs to first fall to `threshold` (linear interpolation
    between logged points); None if it never does."""
    xs, mean, _, _ = _mean_curve(runs, tasks, 0)
    for i in range(len(xs)):
        if mean[i] <= threshold:
            if i == 0:
                return float(xs[0])
            frac = (mean[i - 1] - threshold) / (mean[i - 1] - mean[i])
            return float(xs[i - 1] + frac * (xs[i] - xs[i - 1]))
    return None


def sample_efficiency(a: list[str], b: list[str], tasks: list[str], fraction: float = 0.5) -> dict:
    """Images `a` and `b` need to close `fraction` of the gap between the first logged distance and the
    lower of their two final distances (seed means), and their ratio b / a (None where one never does)."""
    curves = [_mean_curve(runs, tasks, 0) for runs in (a, b)]
    start, end = max(c[1][0] for c in curves), min(c[1][-1] for c in curves)
    threshold = start - fraction * (start - end)
    na, nb = images_to_reach(a, tasks, threshold), images_to_reach(b, tasks, threshold)
    return {"threshold": threshold, "fraction": fraction, "images_a": na, "images_b": nb,
            "ratio_b_over_a": nb / na if na and nb else None}


def plot_distance(panels: list[tuple[str, dict[str, list[str]]]], tasks: list[str], path: str) -> None:
    """Fig. 6 on a low-noise axis: per panel, the held-out distance to the teachers (mean over tasks)
    against images seen (top) and training wall-clock (bottom); a line per variant = the mean of its
    seeds, the band their range."""
    fig, axes = plt.subplots(2, len(panels), figsize=(4.8 * len(panels), 6.4), squeeze=False)
    for col, (title, variants) in enumerate(panels):
        for name, runs in variants.items():
            for row, axis in enumerate((0, 1)):
                x, mean, lo, hi = _mean_curve(runs, tasks, axis)
                x = x / 60 if axis == 1 else x
                line, = axes[row][col].plot(x, mean, label=f"{name} ({len(runs)} seeds)")
                axes[row][col].fill_between(x, lo, hi, color=line.get_color(), alpha=0.2)
        axes[0][col].set_title(title, fontsize=10)
        axes[0][col].set_xlabel("images seen")
        axes[1][col].set_xlabel("training wall-clock (min)")
        for row in range(2):
            axes[row][col].set_yscale("log")
            axes[row][col].grid(alpha=0.3)
            axes[row][col].legend(fontsize=7)
    for row in range(2):
        axes[row][0].set_ylabel("held-out distance to the teachers")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_sample_grid(rows: dict[str, tuple], path: str, title: str) -> None:
    """One row per task of images (B, 3, H, W) in [0, 1], each captioned with its prompt."""
    cols = max(len(images) for images, _ in rows.values())
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.25 * cols, 1.55 * len(rows)), squeeze=False)
    for r, (task, (images, prompts)) in enumerate(rows.items()):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(images):
                ax.imshow(images[c].permute(1, 2, 0).float().clamp(0, 1).cpu().numpy(), interpolation="nearest")
                ax.set_title("\n".join(textwrap.wrap(prompts[c], 22)[:3]), fontsize=4.5)
        axes[r][0].text(-0.15, 0.5, task, transform=axes[r][0].transAxes, rotation=90, va="center", ha="right",
                        fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


# ---------------------------------------------------------------------- CLI
def parse_named(items: list[str], what: str) -> dict[str, list[str]]:
    """["NAME=A+B", ...] -> {NAME: [A, B]}: a named chain of paths ('+' joins paths)."""
    out = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not name or not value:
            raise ValueError(f"{what} expects NAME=PATH[+PATH...], got {item!r}")
        if name in out:
            raise ValueError(f"{what}: name {name!r} given twice")
        out[name] = value.split("+")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description="Draw the study's figures from run logs.")
    sub = ap.add_subparsers(dest="figure", required=True)
    curves = sub.add_parser("curves", help="reward against training wall-clock (Fig. 3)")
    curves.add_argument("--runs", nargs="+", required=True, help="NAME=RUN[+RUN...] (a chain shares one time axis)")
    ablation = sub.add_parser("ablation", help="OPD ablations against optimizer steps (Fig. 6)")
    ablation.add_argument("--panel", nargs="+", action="append", required=True, metavar="TITLE NAME=RUN",
                          help="a panel title, then its runs; repeat for several panels")
    ablation.add_argument("--variance", help="JSON of the gradient-variance measurement (study/demo.py writes it)")
    for p in (curves, ablation):
        p.add_argument("--tasks", nargs="+", default=["geneval", "ocr", "aesthetic"])
        p.add_argument("--out", required=True, help="PNG path")
    args = ap.parse_args(argv)
    try:
        if args.figure == "curves":
            plot_curves(parse_named(args.runs, "--runs"), args.tasks, args.out)
        else:
            panels = [(p[0], {k: v[0] for k, v in parse_named(p[1:], "--panel").items()}) for p in args.panel]
            variance = read_json(args.variance, "variance measurement") if args.variance else None
            plot_ablation(panels, args.tasks, args.out, variance)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
