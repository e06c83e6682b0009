"""The paper's claims, one row each, with the measured effect, its 95% interval and a verdict.

Verdicts: "reproduced" when the interval lies on the paper's side of the line the claim draws,
"not reproduced" when it lies on the other side, "not distinguishable" when it straddles it. The
intervals come from the evaluation's per-prompt values (paired bootstrap over prompts: every model was
evaluated on the same prompts and seeds, evaluate.py) or, for the Fig. 6 ablations, from the training
seeds (bootstrap over seeds).

Claims (paper section 9 and the text around Fig. 6):
    C1  OPD reaches each teacher on the teacher's own task        student / teacher >= 0.95
    C2  OPD beats multi-task RL and cascade RL on the average     min-max average difference > 0
    C3  ... in less time (teachers trained in parallel + OPD)     training minutes to reach a stated quality
                                                                  (no interval); "not tested" where neither does
    C4  the closed-form KL learns faster than PPO-style (a = 0.7) held-out distance after the same images,
                                                                  and images to the same distance, ratio > 1
    C5  the ODE (a = 0) is more sample-efficient than a = 0.7     images to the same distance, ratio > 1
    C6  OPD beats SFT on teacher samples                          min-max average difference > 0

Run: a library (study/demo.py writes claims.md with it).
"""
from __future__ import annotations

import numpy as np

from evaluate import bootstrap_picks, reported
from study.plots import distance_curve, images_to_reach, sample_efficiency

N_BOOT = 2000


def verdict(lo: float, hi: float, line: float) -> str:
    """The claim says the effect exceeds `line`."""
    if lo > line:
        return "reproduced"
    if hi < line:
        return "not reproduced"
    return "not distinguishable"


def _column(table: dict, model: str, task: dict) -> tuple[np.ndarray, list | None]:
    per_prompt = next(m for m in table["models"] if m["name"] == model)["per_prompt"][task["name"]]
    tags = per_prompt["tags"] if task["metric"] != "reward" else None
    return np.asarray(per_prompt[task["metric"]], dtype=np.float64), tags


def _bootstrap_tasks(table: dict, models: list[str]) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """Per task: the models' per-prompt values as one (models, prompts) array, and the prompt groups a
    bootstrap draw resamples within (GenEval's tags, or all prompts)."""
    out = []
    for task in table["tasks"]:
        columns = [_column(table, m, task) for m in models]
        tags, n = columns[0][1], len(columns[0][0])
        groups = [np.arange(n)] if tags is None else [np.flatnonzero(np.asarray(tags) == t) for t in dict.fromkeys(tags)]
        out.append((np.stack([c[0] for c in columns]), groups))
    return out


def _resampled_columns(tasks: list, models: list[str], rng, n_boot: int) -> np.ndarray:
    """n_boot bootstrap draws of every model's reported number per task (evaluate.reported: the mean
    over groups of each group's mean), the same prompts for all models in a draw; `tasks` from
    _bootstrap_tasks. Returns (n_boot, models, tasks); the draws are those of n_boot successive
    per-task, per-group resamplings (evaluate.bootstrap_picks)."""
    groups = [g for _, task_groups in tasks for g in task_groups]
    picks = iter(bootstrap_picks(rng, groups, n_boot))
    out = []
    for values, task_groups in tasks:
        means = [values[:, g[next(picks)]].mean(-1) for g in task_groups]   # each (models, n_boot)
        out.append(np.mean(means, axis=0))
    return np.stack(out, axis=-1).transpose(1, 0, 2)


def _minmax(table: np.ndarray) -> np.ndarray:
    """study.table.minmax_average of (..., models, tasks) tables: (..., models). A column where every
    model scores the same is left out; where every column is, the average is 0."""
    lo, hi = table.min(-2, keepdims=True), table.max(-2, keepdims=True)
    keep = hi > lo                                                     # (..., 1, tasks)
    normalised = np.where(keep, (table - lo) / np.where(keep, hi - lo, 1), 0.0)
    return normalised.sum(-1) / np.maximum(keep.sum(-1), 1)


def _paired_draws(table: dict, a: str, b: str, task_name: str, seed: int) -> tuple:
    """(draws of reported(a), draws of reported(b), reported(a), reported(b)) on one task: N_BOOT paired
    bootstrap resamplings of the prompts (within GenEval's tags), the same prompts for both models."""
    task = next(t for t in table["tasks"] if t["name"] == task_name)
    (x, tags), (y, _) = _column(table, a, task), _column(table, b, task)
    rng = np.random.default_rng(seed)
    groups = [np.arange(len(x))] if tags is None else [np.flatnonzero(np.asarray(tags) == g) for g in dict.fromkeys(tags)]
    picks = bootstrap_picks(rng, groups, N_BOOT)
    draws_a = np.mean([x[g[p]].mean(-1) for g, p in zip(groups, picks)], axis=0)   # (N_BOOT,)
    draws_b = np.mean([y[g[p]].mean(-1) for g, p in zip(groups, picks)], axis=0)
    return draws_a, draws_b, reported(x, tags), reported(y, tags)


def ratio_to_teacher(table: dict, student: str, teacher: str, task_name: str, seed: int = 0) -> dict:
    """C1: reported(student) / reported(teacher) on the teacher's task, paired bootstrap over prompts."""
    num, den, value_s, value_t = _paired_draws(table, student, teacher, task_name, seed)
    if value_t == 0:  # a ratio to nothing: no verdict either way
        return {"value": None, "interval": None, "verdict": "not distinguishable"}
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(den != 0, num / np.where(den != 0, den, 1), np.nan)
    lo, hi = np.nanpercentile(ratios, [2.5, 97.5])  # a draw whose teacher mean is 0 has no ratio
    return {"value": value_s / value_t, "interval": (float(lo), float(hi)), "verdict": verdict(lo, hi, 0.95)}


def difference(table: dict, a: str, b: str, task_name: str, line: float = 0.0, seed: int = 0) -> dict:
    """reported(a) - reported(b) on one task (e.g. a teacher's gain over the base), paired bootstrap
    over prompts; the verdict says whether the difference exceeds `line`."""
    draws_a, draws_b, value_a, value_b = _paired_draws(table, a, b, task_name, seed)
    lo, hi = np.percentile(draws_a - draws_b, [2.5, 97.5])
    return {"value": value_a - value_b, "interval": (float(lo), float(hi)), "verdict": verdict(lo, hi, line)}


def average_difference(table: dict, a: str, b: str, seed: int = 0, among: list[str] | None = None) -> dict:
    """min-max average of `a` minus that of `b`, normalised over the rows `among` (default: every model
    of the table; pass the rows sampled at one CFG to compare at matched CFG), bootstrap over prompts."""
    models = among or [m["name"] for m in table["models"]]
    if a not in models or b not in models:
        raise ValueError(f"average_difference: {a!r} and {b!r} must be among the rows normalised over, {models}")
    rng = np.random.default_rng(seed)
    avg = _minmax(_resampled_columns(_bootstrap_tasks(table, models), models, rng, N_BOOT))   # (N_BOOT, models)
    diffs = avg[:, models.index(a)] - avg[:, models.index(b)]
    rows = {m["name"]: m for m in table["models"]}
    full = _minmax(np.array([[rows[name]["columns"][t["name"]] for t in table["tasks"]] for name in models]))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"value": float(full[models.index(a)] - full[models.index(b)]), "interval": (float(lo), float(hi)),
            "verdict": verdict(lo, hi, 0.0)}


def cross_task_matrix(table: dict, pairs: dict[str, tuple[str, str]], tasks: list[str], seed: int = 0) -> str:
    """Markdown: one row per teacher, one column per task: the teacher's reported number minus the
    base's at the same CFG (pairs: {row label: (teacher row, base row)}), paired bootstrap interval."""
    lines = ["| teacher (CFG) | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for label, (teacher, base) in pairs.items():
        cells = []
        for task in tasks:
            d = difference(table, teacher, base, task, seed=seed)
            cells.append(f"{d['value']:+.3f} [{d['interval'][0]:+.3f}, {d['interval'][1]:+.3f}]")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def final_distance_difference(worse: list[str], better: list[str], tasks: list[str], seed: int = 0) -> dict:
    """C4: final held-out distance of `worse` minus `better` (seed means), bootstrap over seeds."""
    rng = np.random.default_rng(seed)
    w = np.array([distance_curve(r, tasks)[2][-1] for r in worse])
    b = np.array([distance_curve(r, tasks)[2][-1] for r in better])
    diffs = [w[rng.integers(0, len(w), len(w))].mean() - b[rng.integers(0, len(b), len(b))].mean()
             for _ in range(N_BOOT)]
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"value": float(w.mean() - b.mean()), "interval": (float(lo), float(hi)), "verdict": verdict(lo, hi, 0.0)}


def _images_or_length(runs: list[str], tasks: list[str], threshold: float) -> float:
    """Images the seed-mean curve needs to reach `threshold`, or the run's length if it never does."""
    return images_to_reach(runs, tasks, threshold) or distance_curve(runs[0], tasks)[0][-1]


def efficiency_ratio(fast: list[str], slow: list[str], tasks: list[str], fraction: float = 0.5, seed: int = 0) -> dict:
    """C4, C5: images `slow` needs / images `fast` needs to close `fraction` of the distance gap (seed-mean
    curves); the interval from resampling the seeds of each. A curve that never gets there counts as
    the run's length (a lower bound on the ratio when it is `slow`)."""
    base = sample_efficiency(fast, slow, tasks, fraction)
    rng = np.random.default_rng(seed)
    ratios = []
    for _ in range(N_BOOT):
        f = [fast[i] for i in rng.integers(0, len(fast), len(fast))]
        s = [slow[i] for i in rng.integers(0, len(slow), len(slow))]
        ratios.append(_images_or_length(s, tasks, base["threshold"]) / _images_or_length(f, tasks, base["threshold"]))
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    value, bound = base["ratio_b_over_a"], False
    if value is None and base["images_a"] and base["images_b"] is None:  # `slow` never got there: >= its length
        value, bound = _images_or_length(slow, tasks, base["threshold"]) / base["images_a"], True
    return {"value": value, "lower_bound": bound, "interval": (float(lo), float(hi)), "verdict": verdict(lo, hi, 1.0),
            "images_fast": base["images_a"], "images_slow": base["images_b"]}


def format_claims(rows: list[tuple[str, str, dict]]) -> str:
    """Markdown: claim | measured | 95% interval | verdict."""
    def num(v):
        return "-" if v is None else f"{v:.3g}"
    lines = ["| claim | measured | 95% interval | verdict |", "|---|---:|---|---|"]
    for claim, what, r in rows:
        ci = r.get("interval")
        lines.append(f"| {claim} | {what} {'>= ' if r.get('lower_bound') else ''}{num(r.get('value'))} | "
                     + (f"[{num(ci[0])}, {num(ci[1])}]" if ci else "-") + f" | {r['verdict']} |")
    return "\n".join(lines) + "\n"
