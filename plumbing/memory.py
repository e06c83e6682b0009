"""The memory planner: the peak device memory of every script, predicted before anything loads, and the
fastest setting that fits.

Out-of-memory is the most common complaint of Flow-GRPO's users; nothing in this field estimates it
before a run. `plan` predicts, per rank, the peak of each phase of a script's step (teacher_rl.py,
nft.py and opd.py training, study.table's evaluation), for each candidate setting, picks the fastest
that fits the budget (--max_memory_gb, or the GPU's memory on CUDA) for every knob the command line and
the recipe leave free, and refuses, with the numbers, when none fits. What the model needs comes from
its config files alone, on the meta device (plumbing/footprint.py).

The model of the peak (bytes per rank; rows count a CFG pair as 2 where the model samples with CFG):
    resident   = transformer (weights and buffers in --dtype) + text encoders (in --dtype; 0 when
                 offloaded to the host) + VAE (float32) + the student LoRA in float32 x 5 (weights,
                 gradients, two AdamW moments, EMA shadow) + frozen adapters (teachers, NFT's old policy,
                 the table's models) + reward models on the device (float32)
    a phase    = resident + its tensors + its activation peak, e.g. for opd.py per task batch of P prompts
                 and K trained steps: rollout no_grad(2P) + the trajectory; teacher no_grad(2 teacher_chunk);
                 train train(2 train_chunk) (or train_checkpointed); eval no_grad(2 eval_batch) and the
                 VAE decode of eval_batch images; encode (offloaded encoders) the text encoders
    predicted  = max over phases x (1 + MARGIN) + CUDA_RESERVED
What the model leaves to CUDA_RESERVED and MARGIN (stated, not simulated): the CUDA context, cuBLAS and
NCCL workspaces (CUDA_RESERVED = 1.5 GiB), the caching allocator's fragmentation and the reward models'
and text encoders' activations (small next to the transformer's: MARGIN = 5% of the peak).
tests/plumbing/test_memory.py checks the plan's arithmetic; tests/algorithm/test_sd35_size.py the
real-size plans of docs/sd35.md's commands on SD3.5-Medium's configuration.

Departures: none from the paper (it gives no memory model).

Run:
    python opd.py ... --dry_run --device cuda --max_memory_gb 79.6    # any script: its plan for an 80 GB
                                                                      # card, from a machine without a GPU
    python -m bench.sd35_plans --gib 79.6 39.4 23.6                   # the paper's commands at real size
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from plumbing.footprint import GiB, Footprint, footprint, text_length
from plumbing.model_files import DTYPES, resolution_rule

CUDA_RESERVED = int(1.5 * GiB)   # CUDA context (~0.5 GiB), cuBLAS/cuDNN and NCCL workspaces
MARGIN = 0.05                    # allocator fragmentation, reward and text-encoder activations


# ---------------------------------------------------------------------- what each script holds
@dataclass(frozen=True)
class Job:
    """What one rank of a script runs, read from its resolved config (`job`)."""
    script: str                 # opd | grpo | nft | table
    images: int                 # OPD: prompts per task batch; Stage 1: images per step; table: 0
    trained_steps: int          # K
    num_steps: int              # N sampling steps of a rollout
    rows_per_image: int         # 2 with a CFG pair, 1 when the model samples with guidance 1.0
    reward_bytes: int           # the reward models, float32
    eval_steps: int
    kl_reference: bool = False  # teacher_rl's KL to the base: a reference forward beside the graph
    keeps_means: bool = False   # GRPO-Guard keeps the rollout's means
    full_finetune: bool = False


def job(script: str, cfg, world: int, reward_bytes: int, trained: int) -> Job:
    """The Job of a resolved config on `world` ranks that trains `trained` sampling steps per rollout."""
    rows = 1 if getattr(cfg, "guidance", 4.5) == 1.0 else 2
    if script == "table":
        return Job("table", 0, 0, 0, rows, reward_bytes, cfg.steps)
    if script == "opd":
        return Job("opd", cfg.prompts_per_batch // world, trained, cfg.num_steps, 2, reward_bytes, cfg.eval_steps,
                   full_finetune=cfg.full_finetune)
    return Job(script, cfg.batch // world, trained, cfg.num_steps, rows, reward_bytes, cfg.eval_steps,
               kl_reference=script == "grpo" and cfg.kl_beta > 0, keeps_means=getattr(cfg, "ratio_norm", False),
               full_finetune=cfg.full_finetune)


# the knobs each script's plan may choose (the others are fixed by the config)
KNOBS = {"opd": ("train_chunk", "teacher_chunk", "grad_checkpointing", "offload_text_encoders",
                 "offload_rewards", "eval_batch"),
         "grpo": ("train_batch", "rollout_batch", "grad_checkpointing", "offload_text_encoders", "eval_batch"),
         "nft": ("train_batch", "rollout_batch", "grad_checkpointing", "offload_text_encoders", "eval_batch"),
         "table": ("offload_text_encoders", "batch")}
# knobs that are a size, and the phases each one sizes: the planner takes the largest value that fits them,
# halving from the configured one
SIZES = {"eval_batch": ("eval", "eval decode"), "rollout_batch": ("rollout", "decode"), "batch": ("eval", "eval decode"),
         "teacher_chunk": ("teacher",)}
LAUNCH_BOUND_ROWS = 6  # fewer rows per forward+backward leave an H200 waiting on kernel launches (docs/bench.md)


def phases(fp: Footprint, j: Job, s: dict, adapter_bytes: int = 0) -> dict[str, int]:
    """Predicted bytes of each phase of one step of job `j` under setting `s` (knob -> value), before
    MARGIN and CUDA_RESERVED (module docstring)."""
    w = j.rows_per_image
    # the trained weights x 5 (weights, gradients, two AdamW moments, EMA shadow); full fine-tuning trains
    # the float32 transformer itself (4 more copies) and keeps a frozen copy for the base and the teachers
    student = 0 if j.script == "table" else 5 * fp.transformer if j.full_finetune else 5 * fp.lora
    rewards = 0 if s.get("offload_rewards") else j.reward_bytes
    resident = fp.transformer + fp.vae + student + adapter_bytes + \
        (0 if s.get("offload_text_encoders") else fp.text_encoders)
    out = {}
    if s.get("offload_text_encoders"):
        out["encode"] = resident + fp.text_encoders
    train = fp.train_checkpointed if s.get("grad_checkpointing") else fp.train
    if j.script == "opd":
        P, K = j.images, j.trained_steps
        traj = P * (j.num_steps + 1) * fp.latent
        out["rollout"] = resident + traj + Footprint.at(fp.no_grad, w * P)
        out["teacher"] = resident + traj + Footprint.at(fp.no_grad, w * (s["teacher_chunk"] or K * P))
        out["train"] = resident + traj + K * P * fp.latent + Footprint.at(train, w * (s["train_chunk"] or K * P))
    elif j.script in ("grpo", "nft"):
        B = j.images
        held = B * (j.num_steps + 1) * fp.latent + (B * j.num_steps * fp.latent if j.keeps_means else 0) + \
            2 * B * fp.image + j.reward_bytes  # trajectories, the images twice (per batch, then joined)
        rb, tb = s["rollout_batch"], s["train_batch"]
        out["rollout"] = resident + held + Footprint.at(fp.no_grad, w * rb)
        out["decode"] = resident + held + Footprint.at(fp.decode, rb)
        out["train"] = resident + held + Footprint.at(train, w * tb) + \
            (Footprint.at(fp.no_grad, w * tb) if j.kl_reference else 0)
        rewards = j.reward_bytes
    eval_batch = s["batch"] if j.script == "table" else s["eval_batch"]
    eval_held = resident + rewards + eval_batch * (j.eval_steps + 1) * fp.latent
    out["eval"] = eval_held + Footprint.at(fp.no_grad, w * eval_batch)
    out["eval decode"] = eval_held + Footprint.at(fp.decode, eval_batch) + eval_batch * fp.image
    return out


def predicted(peaks: dict[str, int]) -> int:
    """The device memory a phase table needs: its largest phase, the margin and the CUDA reservation."""
    return int(max(peaks.values()) * (1 + MARGIN)) + CUDA_RESERVED


def _halvings(n: int) -> list[int]:
    out = [n]
    while out[-1] > 1:
        out.append((out[-1] + 1) // 2)
    return out


def candidates(j: Job, cfg, fixed: set[str]) -> list[dict]:
    """Settings, fastest first: nothing offloaded, then (opd.py) the reward models kept on the host until an
    evaluation needs them, then the text encoders too. Within each, the student's chunks (opd.py: all
    trained steps of a task batch in one backward, then one step's prompts, then one row; Stage 1:
    --train_batch, then halvings) of at least LAUNCH_BOUND_ROWS rows without gradient checkpointing, then
    those with it, then the smaller chunks without and with it. The sizes (SIZES) are chosen afterwards,
    the largest that fits (teacher_chunk: all trained steps at once first). Keys in `fixed` keep the config's
    value."""
    w, P = j.rows_per_image, j.images
    if j.script == "opd":
        sizes, rows = list(dict.fromkeys([0, P, 1])), lambda c: w * (c or j.trained_steps * P)
    elif j.script in ("grpo", "nft"):
        sizes, rows = _halvings(cfg.train_batch), lambda c: w * c
    else:
        sizes, rows = [None], lambda c: LAUNCH_BOUND_ROWS
    big = [c for c in sizes if rows(c) >= LAUNCH_BOUND_ROWS]
    small = [c for c in sizes if c not in big]
    train = [(c, ckpt) for group in (big, small) for ckpt in (False, True) for c in group]
    placements = [(False, False), (True, False), (True, True)] if j.script == "opd" else [(False, False), (False, True)]
    out = []
    for rewards_off, encoders_off in placements:
        for chunk, ckpt in train:
            s = {"train_chunk": chunk, "train_batch": chunk, "grad_checkpointing": ckpt,
                 "offload_text_encoders": encoders_off, "offload_rewards": rewards_off}
            s = {k: s.get(k) for k in KNOBS[j.script]}
            s.update({k: getattr(cfg, k) for k in KNOBS[j.script] if k in fixed or k in SIZES})
            if s not in out:
                out.append(s)
    return out


def _fit_sizes(fp: Footprint, j: Job, s: dict, budget: float, fixed: set[str], adapter_bytes: int) -> dict:
    """s with each free size knob (SIZES) lowered until the phases it sizes fit, the largest value first:
    halvings, and for opd.py's teacher_chunk all trained steps at once (0), then one step's prompts, then 1."""
    for key in [k for k in SIZES if k in s and k not in fixed]:
        values = list(dict.fromkeys([0, j.images, 1])) if key == "teacher_chunk" and s[key] == 0 else _halvings(s[key])
        for value in values:
            s = {**s, key: value}
            peaks = phases(fp, j, s, adapter_bytes)
            if predicted({p: peaks[p] for p in SIZES[key] if p in peaks}) <= budget:
                break
    return s


def describe(s: dict) -> str:
    """One setting in words, as the plan prints it and `--key value` would set it."""
    return ", ".join(f"{k} {('on' if v else 'off') if isinstance(v, bool) else v}" for k, v in s.items())


def plan(fp: Footprint, j: Job, cfg, budget: float, fixed: set[str] = frozenset(),
         adapter_bytes: int = 0) -> tuple[dict, list[tuple[dict, int]]]:
    """(the fastest setting whose predicted peak fits `budget` bytes, [(setting, predicted peak)] of the
    candidates). Keys of `fixed` (the command line's and the recipe's) are not chosen. ValueError with the
    numbers when none fits."""
    table = []
    for s in candidates(j, cfg, set(fixed)):
        s = _fit_sizes(fp, j, s, budget, set(fixed), adapter_bytes)
        table.append((s, predicted(phases(fp, j, s, adapter_bytes))))
        if table[-1][1] <= budget:
            return s, table
    smallest = min(table, key=lambda r: r[1])
    raise ValueError(f"no setting fits {budget / GiB:.1f} GiB: the smallest predicted peak is "
                     f"{smallest[1] / GiB:.1f} GiB ({describe(smallest[0])}); use fewer prompts or images per "
                     f"GPU (more GPUs), a lower resolution, --dtype bfloat16, or a larger --max_memory_gb")


def format_plan(table: list[tuple[dict, int]], chosen: dict, budget: float, what: str) -> str:
    """The plan as the scripts print it: a row per setting tried, then one line,
    `predicted peak 31.2 GiB of 80.0 GiB (train_chunk 6, ...)`."""
    limit = "no budget" if budget == float("inf") else f"budget {budget / GiB:.1f} GiB"
    lines = [f"memory plan ({what}; {limit}; per GPU process, with {MARGIN:.0%} margin and "
             f"{CUDA_RESERVED / GiB:.1f} GiB CUDA context):"]
    lines += [f"  {'->' if s == chosen else '  '} {peak / GiB:6.1f} GiB  {describe(s)}" for s, peak in table]
    peak = next(p for s, p in table if s == chosen)
    of = "" if budget == float("inf") else f" of {budget / GiB:.1f} GiB"
    lines.append(f"predicted peak {peak / GiB:.1f} GiB{of} ({describe(chosen)})")
    return "\n".join(lines)


def plan_run(script: str, cfg, dist, fixed: set[str], reward_bytes: int, *, trained: int,
             lora_targets: tuple[str, ...], adapters: float = 0.0, adapter_bytes: int = 0,
             model: str | None = None) -> str:
    """A script's plan, before anything loads: predict the peak memory of a step of `script` (opd, grpo,
    nft, table; base `model`, default cfg.model; `trained` sampling steps trained per rollout, a student
    LoRA on `lora_targets`; with `adapters` frozen LoRAs of the student's size and `adapter_bytes` more)
    for each setting and set on `cfg` the fastest that fits the budget (--max_memory_gb, or the GPU's
    memory on CUDA) for the knobs not in `fixed`. Without a budget (CPU and no --max_memory_gb) nothing
    changes; the dry run still prints the configured setting's peak. Returns the lines to print ("" when
    there is nothing to say); a ValueError naming the numbers when nothing fits, when the model's configs
    are not found and a budget was asked for, or when a CUDA dry run without a GPU has no budget. The
    same command plans the same way in its dry run and its run (on the same budget)."""
    budget = cfg.max_memory_gb * GiB
    if not budget and dist.device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--dry_run --device cuda on a machine without a GPU plans for a GPU of "
                             "--max_memory_gb GiB: pass it (an 80 GB card holds 79.6 GiB)")
        budget = torch.cuda.get_device_properties(dist.device).total_memory
    if not budget and not cfg.dry_run:
        return ""
    budget = budget or float("inf")
    height, width, model = cfg.height, cfg.width, model or cfg.model
    try:
        rule = resolution_rule(model)
        if rule is None:
            raise FileNotFoundError(f"the configs of {model} are not found")
        height, width = height or rule[1], width or rule[1]
        fp = footprint(model, height, width, DTYPES[cfg.dtype], getattr(cfg, "lora_rank", 32), text_length(model),
                       lora_targets)
    except FileNotFoundError as e:
        if budget != float("inf"):
            raise ValueError(f"--max_memory_gb: {e}") from None
        return f"memory plan skipped ({e})"
    j = job(script, cfg, dist.world, reward_bytes, trained)
    adapter_bytes += int(adapters * fp.lora)  # frozen LoRAs of the student's rank (teachers, NFT's old policy)
    fixed = {k for k in KNOBS[script] if k in fixed}
    if budget == float("inf"):  # nothing to choose: the configured setting's peak
        s = {k: getattr(cfg, k) for k in KNOBS[script]}
        chosen, table = s, [(s, predicted(phases(fp, j, s, adapter_bytes)))]
    else:
        chosen, table = plan(fp, j, cfg, budget, fixed, adapter_bytes)
        for key, value in chosen.items():
            setattr(cfg, key, value)
    return format_plan(table, chosen, budget, f"{script} at {height}x{width} px, {cfg.dtype}, {dist.world} "
                                              f"rank{'s' if dist.world > 1 else ''}")
