"""The paper's Table 1 in miniature (section 9): evaluate several models on several tasks with the
protocol of evaluate.py, and write, under --out:
    table.md           per task the reported metric (GenEval: strict accuracy, the task's eval_key;
                       others: reward), training wall-clock, min-max normalised average
    table.json         the same for machines, with every metric, the time per run and the protocol;
                       also the mean of each per-image term the reward reports (e.g. toy_aesthetic/align)
    curves.png         reward against training wall-clock of every run (study.plots.plot_curves, Fig. 3)
    samples/NAME.png   one grid per model: the first --grid_prompts test prompts of every task
    cache/NAME.json    per-model results, reused on a rerun while the weights and protocol are unchanged

Normalised average (Table 1's last column): every task column is min-max normalised over the compared
models, n_mc = (v_mc - min_m' v_m'c) / (max_m' v_m'c - min_m' v_m'c), then averaged over columns.

Departures from the paper
1. A column where all models score the same separates none of them; it is left out of the average
   (the paper never meets this case), and the average is "-" when every column is left out.
2. Time is the training wall-clock read from the runs' metrics.jsonl (study.plots: sec/* of each step
   summed without sec/eval), in minutes; `--time NAME=RUN+RUN` sums a chain run one after another
   on one machine (the paper adds the teachers' time, trained in parallel, as "85.8 + 11.3").
3. Models are sampled at --height x --width (the paper's 512 px; a base folder's recipe.json may say
   otherwise: the embedded toy base evaluates at its own 32 px), in --dtype (bfloat16 on CUDA), with the
   images per forward (--batch) lowered by the memory plan when they would not fit the GPU.

Run:
    python -m study.table --models base=models/toy-sd3 opd=models/toy-sd3+runs/opd --out runs/eval   # CPU
    torchrun --standalone --nproc_per_node=2 -m study.table --models base=models/toy-sd3 \\
        geneval=models/toy-sd3+runs/demo/teacher-geneval opd=models/toy-sd3+runs/demo/opd \\
        --time geneval=runs/demo/teacher-geneval \\
               opd=runs/demo/teacher-geneval+runs/demo/teacher-ocr+runs/demo/teacher-aesthetic+runs/demo/opd \\
        --tasks geneval ocr aesthetic --out runs/demo/results
    python -m study.table --models sd35=stabilityai/stable-diffusion-3.5-medium \\
        student=stabilityai/stable-diffusion-3.5-medium+DiffusionOPD/Student/lora --tasks geneval \\
        --datasets geneval=dataset/geneval --prompts 2212       # 1 GPU, SD3.5-M: bf16, 512 px, planned batch
    (dataset/geneval/task.json: {"reward": "geneval=1", "eval_key": "strict"}; see data.py)
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from data import Task, check_prompts, load_prompts, load_task, task_dataset
from evaluate import EVAL_GUIDANCE, EVAL_STEPS, eval_images, evaluate_tasks, interval
from model import LORA_TARGETS, FlowModel
from rewards import check_spec, make_reward, reward_bytes
from student import check_same_base
from plumbing.config import apply_recipe, config_dict, describe_recipe, given_keys, option, parse_config, recipe_of
from plumbing.dist import Dist, print_main
from plumbing.durable import sha256
from plumbing.memory import plan_run
from plumbing.jsonfiles import read_json
from plumbing.model_files import (DTYPES, check_lora_folder, check_model_path, check_model_resolution,
                                  resolve_dtype)


# ---------------------------------------------------------------------- Table 1
def minmax_average(table: list[list[float]]) -> list[float | None]:
    """Rows = models, columns = tasks: avg_m = mean_c (v_mc - min_c) / (max_c - min_c) over the
    columns that separate the models (max_c > min_c); None where no column does (departure 1)."""
    if not (table and all(len(row) == len(table[0]) for row in table)):
        raise ValueError(f"ragged table {table}")
    columns = [c for c in range(len(table[0])) if max(r[c] for r in table) > min(r[c] for r in table)]
    if not columns:
        return [None] * len(table)
    lo = {c: min(r[c] for r in table) for c in columns}
    hi = {c: max(r[c] for r in table) for c in columns}
    return [sum((row[c] - lo[c]) / (hi[c] - lo[c]) for c in columns) / len(columns) for row in table]


def format_table(names: list[str], metrics: list[str], values: list[list[float]], minutes: list[float | None],
                 averages: list[float | None], intervals: list[list[tuple]] | None = None,
                 guidance: list[float] | None = None) -> str:
    """Markdown rows shaped like the paper's Table 1: model | [CFG |] time | one column per task | avg;
    each value with its interval [lo, hi] when given, the CFG each row was sampled at when given."""
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    def cell(v, ci):
        return num(v, ".3f") + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
    intervals = intervals or [[None] * len(metrics) for _ in names]
    cfg_head, cfg_rule = ("CFG | ", "---:|") if guidance else ("", "")
    lines = [f"| model | {cfg_head}time (min) | " + " | ".join(metrics) + " | avg (min-max norm.) |",
             f"|---|{cfg_rule}---:|" + "---:|" * len(metrics) + "---:|"]
    for k, (name, row, cis, minute, avg) in enumerate(zip(names, values, intervals, minutes, averages)):
        cfg_cell = f"{guidance[k]:g} | " if guidance else ""
        lines.append(f"| {name} | {cfg_cell}{num(minute, '.3g')} | " + " | ".join(cell(v, ci) for v, ci in zip(row, cis))
                     + f" | {num(avg, '.3f')} |")
    return "\n".join(lines) + "\n"


def chain_minutes(runs: list[str]) -> dict[str, float]:
    """Training minutes of each run of a chain (plots.run_seconds: sec/* summed, sec/eval left out)."""
    from study.plots import run_seconds
    return {run: run_seconds(run) / 60 for run in runs}


# ---------------------------------------------------------------------- models
@dataclass
class ModelSpec:
    name: str
    base: str                   # diffusers pipeline folder or hub id
    adapter: str | None         # PEFT LoRA folder (a run directory resolves to its checkpoint/)
    guidance: float | None = None  # CFG of this row (@CFG); None: model_guidance's rule


def resolve_adapter(path: str) -> str:
    """A PEFT LoRA folder, or a teacher_rl.py / opd.py run directory -> its checkpoint/ folder."""
    p = Path(path)
    for folder in (p, p / "checkpoint"):
        if (folder / "adapter_config.json").is_file():
            return str(folder)
    raise FileNotFoundError(f"adapter {path} is neither a PEFT LoRA folder nor a run directory with "
                            "checkpoint/adapter_config.json")


def parse_models(items: list[str]) -> list[ModelSpec]:
    """["NAME=BASE[+ADAPTER][@CFG]", ...] -> specs; adapters resolved, names unique. @CFG samples the
    row at that CFG (one model at several CFGs: one row each, e.g. base@1=models/toy-sd3@1)."""
    specs = []
    for item in items:
        name, eq, value = item.partition("=")
        head, at, tail = value.rpartition("@")
        guidance = None
        if at:
            try:
                guidance = float(tail)
            except ValueError:
                raise ValueError(f"--models {item!r}: @{tail} is not a CFG scale; expected NAME=BASE[+ADAPTER][@CFG], "
                                 "e.g. base1=models/toy-sd3@1.0") from None
            if guidance <= 0:
                raise ValueError(f"--models {item!r}: CFG must be > 0, got {guidance}")
            value = head
        base, _, adapter = value.partition("+")
        if not eq or not name or not base:
            raise ValueError(f"--models expects NAME=BASE[+ADAPTER][@CFG], got {item!r}")
        if any(s.name == name for s in specs):
            raise ValueError(f"--models: name {name!r} given twice")
        specs.append(ModelSpec(name, base, resolve_adapter(adapter) if adapter else None, guidance))
    return specs


def model_guidance(spec: ModelSpec, cfg) -> float:
    """The CFG a model is sampled with: the row's @CFG when given; else a teacher's own (its run_config
    "guidance"; the paper's GenEval NFT teacher: 1.0) with --own_guidance; else --guidance (4.5)."""
    if spec.guidance is not None:
        return spec.guidance
    run_config = Path(spec.adapter or "") / "run_config.json"
    if cfg.own_guidance and spec.adapter and run_config.is_file():
        saved = read_json(run_config, "run config")
        if "tasks" not in saved and "guidance" in saved:  # a teacher (a student names its tasks)
            return float(saved["guidance"])
    return cfg.guidance


def cache_key(spec: ModelSpec, cfg) -> dict:
    """What a cached result depends on: the weights (adapter file hash) and the protocol."""
    return {"base": spec.base, "adapter": spec.adapter,
            "adapter_sha256": sha256(Path(spec.adapter) / "adapter_model.safetensors")[:16] if spec.adapter else None,
            "prompts": cfg.prompts, "steps": cfg.steps, "guidance": model_guidance(spec, cfg), "seed": cfg.seed,
            "height": cfg.height, "width": cfg.width, "dtype": cfg.dtype}


# ---------------------------------------------------------------------- command line
@dataclass
class EvalConfig:
    """Evaluate models on tasks: Table 1 (Markdown + JSON), reward curves and sample grids."""
    models: list[str] = option(factory=list, help="NAME=BASE[+ADAPTER][@CFG]; ADAPTER: PEFT folder or run dir")
    tasks: list[str] = field(default_factory=lambda: ["geneval", "ocr", "aesthetic"])
    datasets: list[str] = option(factory=list, help="TASK=DIR; default: the base recipe's, else dataset/<task>")
    rewards: list[str] = option(factory=list, help="TASK=SPEC: another reward than the dataset's task.json")
    eval_key: list[str] = option(factory=list, help="TASK=KEY: the reward info entry to report (e.g. GenEval "
                                                    "through Flow-GRPO's server: geneval=rewards)")
    export_geneval: str = option("", "also write every GenEval image in its evaluator's layout: DIR/<model>/")
    time: list[str] = option(factory=list, help="NAME=RUN[+RUN...]: training time, chain summed")
    curves: list[str] = option(factory=list, help="NAME=RUN[+RUN...] to plot; default: the --time chains")
    out: str = "runs/eval"
    prompts: int = option(64, "first test prompts of each task")
    steps: int = option(EVAL_STEPS, "ODE steps (paper: 40)")
    guidance: float = option(EVAL_GUIDANCE, "CFG (paper: 4.5)")
    own_guidance: bool = option(True, "a teacher is sampled with its own guidance (model_guidance)")
    seed: int = option(0, "prompt i uses seed + i")
    batch: int = option(32, "images per forward, per rank (lowered by the memory plan)")
    height: int = option(512, "pixels (paper: 512); 0 = the model's default resolution")
    width: int = 512
    recipe: str = option("auto", "auto: the first model's base folder's recipe.json (\"table\"), paper, a path")
    grid_prompts: int = option(8, "per task in each model's sample grid")
    device: str = "auto"
    dtype: str = option("auto", "transformer and text encoders: auto (CUDA: bfloat16; CPU: float32), float32, "
                                "bfloat16; the VAE: float32")
    offload_text_encoders: bool = option(False, "keep the text encoders in host memory between encodings")
    max_memory_gb: float = option(0.0, "the memory plan's budget per GPU; 0 = the GPU's memory on CUDA")
    dry_run: bool = option(False, "check every input, print the plan and the config, load nothing")


def validate(cfg: EvalConfig, argv=None):
    """Every bad input fails here with a one-line error, before any model loads and before --out is
    written; the recipe of the first model's base is applied (its "table" values, e.g. the embedded base's
    own resolution) to the keys the command line does not set."""
    from study.plots import parse_named, read_metrics
    try:
        for name in ("prompts", "steps", "batch"):
            if getattr(cfg, name) <= 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(cfg, name)}")
        if cfg.height < 0 or cfg.width < 0 or cfg.max_memory_gb < 0:
            raise ValueError("--height/--width/--max_memory_gb must be >= 0")
        if cfg.dtype not in ("auto", *DTYPES):
            raise ValueError(f"--dtype must be auto, float32 or bfloat16, got {cfg.dtype!r}")
        if cfg.grid_prompts < 0:
            raise ValueError(f"--grid_prompts must be >= 0, got {cfg.grid_prompts}")
        if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
            raise ValueError(f"--out {cfg.out} is a file, not a directory")
        models = parse_models(cfg.models)
        if not models:
            raise ValueError("no models given (--models NAME=BASE[+ADAPTER][@CFG] ...)")
        datasets = {k: v[0] for k, v in parse_named(cfg.datasets, "--datasets").items()}
        rewards = dict(item.split("=", 1) for item in cfg.rewards if "=" in item)
        if len(rewards) != len(cfg.rewards):
            raise ValueError(f"--rewards expects TASK=SPEC, e.g. pickscore=pickscore=1, got {cfg.rewards}")
        unknown = sorted((set(datasets) | set(rewards)) - set(cfg.tasks))
        if unknown:
            raise ValueError(f"--datasets/--rewards name tasks {unknown} not in --tasks {cfg.tasks}")
        keys = dict(item.split("=", 1) for item in cfg.eval_key if "=" in item)
        if len(keys) != len(cfg.eval_key) or sorted(set(keys) - set(cfg.tasks)):
            raise ValueError(f"--eval_key expects TASK=KEY for tasks of --tasks, e.g. geneval=rewards, got {cfg.eval_key}")
        recipe = recipe_of(cfg, models[0].base)[1]  # its "datasets": where the base's own tasks' prompts are
        tasks = [load_task(name, task_dataset(name, datasets.get(name, ""), recipe), rewards.get(name, ""))
                 for name in cfg.tasks]
        for task in tasks:
            task.eval_key = keys.get(task.name, task.eval_key)
        for task in tasks:
            load_prompts(task.dataset, "test")
            check_prompts(task)
        times = parse_named(cfg.time, "--time")
        stray = sorted(set(times) - {m.name for m in models})
        if stray:
            raise ValueError(f"--time names {stray} that are not models ({[m.name for m in models]})")
        curves = parse_named(cfg.curves, "--curves") if cfg.curves else times
        for run in {r for chain in list(times.values()) + list(curves.values()) for r in chain}:
            read_metrics(run)
        for spec in models:
            check_model_path(spec.base)
            if spec.adapter:  # before any model loads: its files, and its recorded base against this one's
                check_lora_folder(spec.adapter)
                check_same_base(spec.adapter, spec.base)
        changed = apply_recipe(cfg, given_keys(EvalConfig, argv), models[0].base, "table")
        for spec in models:
            check_model_resolution(spec.base, cfg.height, cfg.width)
        return models, tasks, times, curves, changed
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise SystemExit(f"error: {e}") from None


def plan(cfg: EvalConfig, models: list[ModelSpec], tasks: list[Task], dist, argv=None) -> str:
    """The memory plan of the evaluation (plumbing.memory.plan_run; --batch and the text encoders' place are chosen
    when not given) and the resolved dtype, set on cfg; the lines to print."""
    try:
        cfg.dtype = resolve_dtype(cfg.dtype, dist.device)
        adapters = sum((Path(m.adapter) / "adapter_model.safetensors").stat().st_size for m in models if m.adapter)
        return plan_run("table", cfg, dist, given_keys(EvalConfig, argv), reward_bytes([t.reward for t in tasks]),
                        trained=0, lora_targets=LORA_TARGETS, adapter_bytes=adapters, model=models[0].base)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


def evaluate_model(spec: ModelSpec, index: int, tasks: list[Task], rewards: dict, cfg: EvalConfig, dist,
                   loaded: dict) -> dict:
    """{task: {"result": evaluate_task's result, "per_prompt": its per-prompt values}} for one model,
    from cache/NAME.json where the key still matches; rank 0 writes samples/NAME.png when anything was
    (re)evaluated or the grid is missing."""
    from study.plots import save_sample_grid
    out = Path(cfg.out)
    cache_file, grid_file = out / "cache" / f"{spec.name}.json", out / "samples" / f"{spec.name}.png"
    key = cache_key(spec, cfg)
    cached = read_json(cache_file, "evaluation cache", "delete it to evaluate again") if cache_file.is_file() else {}
    old = cached.get("tasks", {}) if cached.get("key") == key else {}
    results = {t.name: old[t.name] for t in tasks
               if t.name in old and (old[t.name]["dataset"], old[t.name]["reward"]) == (t.dataset, t.reward)}
    todo = [task for task in tasks if task.name not in results]
    if not todo and (grid_file.is_file() or not cfg.grid_prompts):
        return results
    if spec.base not in loaded:
        with dist.local_first():  # a hub model downloads once per node
            loaded[spec.base] = FlowModel.load(spec.base, device=dist.device, dtype=DTYPES[cfg.dtype])
        if cfg.offload_text_encoders:
            loaded[spec.base].offload_text_encoders()
    model, adapter = loaded[spec.base], None
    if spec.adapter:
        check_same_base(spec.adapter, model)
        adapter = f"model{index}"
        if not model.has_adapter(adapter):
            model.load_lora(spec.adapter, adapter)
    guidance = model_guidance(spec, cfg)
    for dataset in dict.fromkeys(t.dataset for t in todo):  # one generation per prompt set, every reward on it
        group = [t for t in todo if t.dataset == dataset]
        per_prompt = [{} for _ in group]
        geneval = cfg.export_geneval and "include" in load_prompts(dataset, "test")[1][0]
        found = evaluate_tasks(model, group, [rewards[t.name] for t in group], dist, adapter, cfg.prompts, cfg.steps,
                               guidance, cfg.seed, cfg.batch, per_prompt=per_prompt, height=cfg.height or None,
                               width=cfg.width or None,
                               export=str(Path(cfg.export_geneval) / spec.name) if geneval else None)
        for task, res, values in zip(group, found, per_prompt):
            results[task.name] = {"dataset": task.dataset, "reward": task.reward, "result": res,
                                  "per_prompt": values, "guidance": guidance}
            if dist.is_main:
                print(f"{spec.name} on {task.name}: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()), flush=True)
    if dist.is_main:
        if cfg.grid_prompts:
            rows = {}
            for task in tasks:
                prompts, _ = load_prompts(task.dataset, "test")
                idx = list(range(min(cfg.grid_prompts, len(prompts))))
                rows[task.name] = (eval_images(model, prompts, idx, cfg.steps, guidance, cfg.seed, adapter,
                                               cfg.height or None, cfg.width or None), [prompts[i] for i in idx])
            save_sample_grid(rows, str(grid_file), f"{spec.name}: {spec.base}" + (f" + {spec.adapter}" if spec.adapter
                             else "") + f"  (ODE {cfg.steps} steps, CFG {guidance}, prompt i seeded {cfg.seed} + i)")
        cache_file.write_text(json.dumps({"key": key, "tasks": results}, indent=2))
    dist.barrier()
    return results


def main(argv=None) -> dict:
    from study.plots import plot_curves
    cfg = parse_config(EvalConfig, argv)
    models, tasks, times, curves, changed = validate(cfg, argv)
    try:
        dist = Dist(cfg.device, plan_only=cfg.dry_run)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print_main(dist, *filter(None, [plan(cfg, models, tasks, dist, argv),
                                    describe_recipe(cfg, changed, given_keys(EvalConfig, argv))]))
    if cfg.dry_run:
        try:
            needs = [f"{t.name}: {line}" for t in tasks for line in check_spec(t.reward, build=True)]
        except (ValueError, FileNotFoundError, ImportError) as e:
            raise SystemExit(f"error: {e}") from None
        print_main(dist, *needs, "dry run: every input checked; the resolved config:",
                   json.dumps(config_dict(cfg), indent=2))
        dist.close()
        return None
    try:
        with dist.local_first():  # first-use downloads of the reward models, once per node
            rewards, loaded = {t.name: make_reward(t.reward, device=dist.device) for t in tasks}, {}
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise SystemExit(f"error: {e}") from None
    out = Path(cfg.out)
    created = not out.exists()
    try:
        if dist.is_main:
            for sub in ("cache", "samples"):
                (out / sub).mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps(config_dict(cfg), indent=2))
    except OSError as e:
        raise SystemExit(f"error: --out {out} cannot be written ({e.strerror or e}); choose a folder you can "
                         "write to") from None
    dist.barrier()
    try:
        results = {spec.name: evaluate_model(spec, i, tasks, rewards, cfg, dist, loaded) for i, spec in enumerate(models)}
    except (ValueError, FileNotFoundError) as e:  # e.g. an adapter trained on another base
        if created and dist.is_main and not any((out / "cache").iterdir()):  # nothing evaluated: leave nothing
            shutil.rmtree(out, ignore_errors=True)
        raise SystemExit(f"error: {e}") from None

    # ---- Table 1: the task's eval key (GenEval: strict) or its reward; time; normalised average
    metrics = [f"{t.name} {t.eval_key or 'reward'}" for t in tasks]
    scores = {m.name: {t.name: results[m.name][t.name]["result"] for t in tasks} for m in models}
    values = [[scores[m.name][t.name][t.eval_key or "reward"] for t in tasks] for m in models]
    intervals = [[interval(results[m.name][t.name]["per_prompt"][t.eval_key or "reward"],
                           results[m.name][t.name]["per_prompt"]["tags"] if t.eval_key else None) for t in tasks]
                 for m in models]
    averages = minmax_average(values)
    parts = {m.name: chain_minutes(times[m.name]) for m in models if m.name in times}
    minutes = [sum(parts[m.name].values()) if m.name in parts else None for m in models]
    table = {
        "protocol": {"sampler": "ODE", "steps": cfg.steps, "guidance": cfg.guidance, "prompts": cfg.prompts,
                     "seed": cfg.seed, "seeding": "prompt i uses seed + i"},
        "tasks": [{"name": t.name, "metric": t.eval_key or "reward", "dataset": t.dataset, "reward": t.reward}
                  for t in tasks],
        "models": [{"name": m.name, "base": m.base, "adapter": m.adapter, "scores": scores[m.name],
                    "columns": dict(zip([t.name for t in tasks], row)),
                    "intervals": dict(zip([t.name for t in tasks], ci)), "avg_minmax": avg,
                    "guidance": {t.name: results[m.name][t.name]["guidance"] for t in tasks},
                    "per_prompt": {t.name: results[m.name][t.name]["per_prompt"] for t in tasks},
                    "train_minutes": minute, "train_minutes_per_run": parts.get(m.name)}
                   for m, row, ci, avg, minute in zip(models, values, intervals, averages, minutes)],
    }
    if dist.is_main:
        md = format_table([m.name for m in models], metrics, values, minutes, averages, intervals,
                          [results[m.name][tasks[0].name]["guidance"] for m in models])
        (out / "table.md").write_text(
            f"Evaluation: ODE {cfg.steps} steps at each row's CFG (default {cfg.guidance}; teachers: their own "
            f"guidance; NAME=...@CFG: that CFG), first "
            f"{cfg.prompts} test prompts per task, prompt i seeded {cfg.seed} + i; [95% bootstrap interval over "
            f"prompts].\n\n{md}\n"
            "time: training wall-clock in minutes from the runs' metrics.jsonl (sec/* without sec/eval), "
            "chained runs summed.\navg: each task column min-max normalised over the models above, then averaged.\n")
        (out / "table.json").write_text(json.dumps(table, indent=2))
        if curves:
            plot_curves(curves, [t.name for t in tasks], str(out / "curves.png"))
        print(md + f"wrote {out}/table.md, table.json" + (", curves.png" if curves else "") + ", samples/*.png")
    dist.close()
    return table


if __name__ == "__main__":
    main()
