"""The memory planner: the peak device memory of every script, predicted before anything loads, and the
fastest setting that fits.

Out-of-memory is the most common complaint of Flow-GRPO's users; nothing in this field estimates it
before a run. `plan` predicts, per rank, the peak of each phase of a script's step (teacher_rl.py,
nft.py and opd.py training, study.table's evaluation), for each candidate setting, picks the fastest
that fits the budget (--max_memory_gb, or the GPU's memory on CUDA) for every knob the command line and
the recipe leave free, and refuses, with the numbers, when none fits. Nothing is loaded: every module is
built on PyTorch's meta device from the model's config files (a local folder, or a hub id's configs
from the hub cache, fetched alone on a machine with internet), which costs no memory and no FLOPs.

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
The activation terms are simulated, not estimated: the transformer (and the VAE decoder) run on the meta
device (its config, the LoRA, the dtype, the resolution) under a dispatch mode that counts every op's
output bytes from its creation until its storage is freed, so the peak includes what autograd keeps for
the backward, the backward's own temporaries and gradient checkpointing's recomputation. An op whose
output is a view of an existing storage (a frozen weight's transpose saved for the backward, a slice of
the position-embedding buffer) adds nothing. Each is a line in the number of rows, from simulations at 2
and 4 rows (the VAE: 1 and 2 images). scaled_dot_product_attention is counted as a fused kernel keeps it
(q, k, v, output and a float32 log-sum-exp, no n x n matrix), which is what runs on CUDA and on CPU.

What the model leaves to CUDA_RESERVED and MARGIN (stated, not simulated): the CUDA context, cuBLAS and
NCCL workspaces (CUDA_RESERVED = 1.5 GiB), the caching allocator's fragmentation and the reward models'
and text encoders' activations (small next to the transformer's: MARGIN = 5% of the peak).
tests/test_memory.py checks the simulation against the PyTorch profiler's memory timeline on CPU to 10%,
and the real-size plans of docs/sd35.md's commands on SD3.5-Medium's configuration (tests/fixtures).

Departures: none from the paper (it gives no memory model).

Run:
    python memory.py --model stabilityai/stable-diffusion-3.5-medium --max_memory_gb 24   # OPD's table
    python opd.py ... --dry_run --device cuda --max_memory_gb 79.6    # any script: its plan for an 80 GB
                                                                      # card, from a machine without a GPU
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from model import DTYPES, LORA_TARGETS, TEXT_ENCODERS
from plumbing.model_files import config_folder, t5_length

GiB = 2**30
CUDA_RESERVED = int(1.5 * GiB)   # CUDA context (~0.5 GiB), cuBLAS/cuDNN and NCCL workspaces
MARGIN = 0.05                    # allocator fragmentation, reward and text-encoder activations


@dataclass
class Footprint:
    """Bytes of one model at one resolution (module docstring): its components' weights, one LoRA adapter
    in float32, one latent and one decoded image in float32, and for each kind of call the peak of live
    activation bytes as a line in the number of rows, (bytes at 0 rows, bytes per row)."""
    transformer: int                        # weights and buffers, in the run's dtype
    text_encoders: int                      # the three text encoders, in the run's dtype
    vae: int                                # float32
    lora: int
    latent: int
    image: int
    train: tuple[float, float]              # transformer forward + backward
    train_checkpointed: tuple[float, float]  # the same with gradient checkpointing
    no_grad: tuple[float, float]            # a transformer forward without a graph (rollout, teacher)
    decode: tuple[float, float]             # the VAE decoder, per image

    @staticmethod
    def at(line: tuple[float, float], rows: int) -> int:
        return int(line[0] + line[1] * rows)


# ---------------------------------------------------------------------- configs and meta-device modules
def _configs(path: str) -> dict[str, dict]:
    """The JSON configs of an SD3 pipeline (a local folder, or a hub id's configs in the hub cache)."""
    root = config_folder(path)
    if root is None or not (Path(root) / "transformer" / "config.json").is_file():
        raise FileNotFoundError(f"memory planner: no transformer/config.json for {path} (a hub model's "
                                "configs must be in the hub cache, or fetchable)")
    return {name: json.loads((Path(root) / name / "config.json").read_text())
            for name in ("transformer", "vae", *TEXT_ENCODERS) if (Path(root) / name / "config.json").is_file()}


def _bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (each storage once: tied weights count once)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _build_transformer(config: dict, dtype: torch.dtype, lora_rank: int):
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig
    with torch.device("meta"):
        public = {k: v for k, v in config.items() if not k.startswith("_")}
        tr = SD3Transformer2DModel.from_config(public).to(dtype)
    tr.requires_grad_(False)
    if lora_rank:
        tr.add_adapter(LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=list(LORA_TARGETS)))
        for name, p in tr.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()   # the student trains in float32 (model.FlowModel._cast_lora)
                p.requires_grad_(True)
    return tr


class _FusedAttention(torch.autograd.Function):
    """scaled_dot_product_attention as a fused kernel keeps it for the backward: q, k, v, the output and
    a float32 log-sum-exp per query. Meta tensors only: the planner never computes."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextlib.contextmanager
def _fused_attention():
    import torch.nn.functional as F
    real = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        return _FusedAttention.apply(q, k, v)
    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


class _LiveBytes(TorchDispatchMode):
    """The peak of live tensor bytes while it is active: every op's new outputs counted once per storage
    from their creation until the last tensor on that storage is freed. An output that is a view of an
    input (the op's schema says it aliases one) adds nothing: it shares a storage that already exists."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.refs, self.size = {}, {}

    def _release(self, key):
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= self.size.pop(key)
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        aliases = any(r.alias_info is not None for r in func._schema.returns)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage()._cdata
                if key not in self.refs:
                    if aliases:  # a view of a weight, a buffer or an input made before counting began
                        continue
                    self.refs[key], self.size[key] = 0, t.untyped_storage().nbytes()
                    self.live += self.size[key]
                    self.peak = max(self.peak, self.live)
                self.refs[key] += 1
                weakref.finalize(t, self._release, key)
        return out


def _simulate(tr, rows: int, grad: bool, height: int, width: int, text_len: int, vae_scale: int) -> int:
    """Peak live activation bytes of one CFG-guided velocity of `rows` rows (pairs of uncond and cond,
    as model.FlowModel.velocity batches them) and, with `grad`, its loss's backward, on the meta device."""
    c = tr.config
    dtype = next(p.dtype for n, p in tr.named_parameters() if "lora_" not in n)
    with torch.device("meta"):
        x = torch.empty(rows, c.in_channels, height // vae_scale, width // vae_scale)
        seq = torch.empty(rows, text_len, c.joint_attention_dim, dtype=dtype)
        pooled = torch.empty(rows, c.pooled_projection_dim, dtype=dtype)
        t = torch.full((rows,), 500.0)
    tracker = _LiveBytes()
    with _fused_attention(), torch.set_grad_enabled(grad), tracker:
        out = tr(hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=seq, pooled_projections=pooled,
                 return_dict=False)[0].to(x.dtype)
        v_uncond, v_cond = out.chunk(2)
        v = v_uncond + 4.5 * (v_cond - v_uncond)
        if grad:
            v.square().mean().backward()
        del out, v, v_uncond, v_cond
    for p in tr.parameters():
        p.grad = None
    return tracker.peak


def _simulate_decode(vae, images: int, height: int, width: int, vae_scale: int) -> int:
    """Peak live activation bytes of decoding `images` latents to pixels (model.FlowModel.decode)."""
    with torch.device("meta"):
        z = torch.empty(images, vae.config.latent_channels, height // vae_scale, width // vae_scale)
    tracker = _LiveBytes()
    with _fused_attention(), torch.no_grad(), tracker:
        out = vae.decode(z, return_dict=False)[0].float()
        del out
    return tracker.peak


def _line(simulate, low: int, high: int) -> tuple[float, float]:
    """(a, b) of peak(rows) = a + b rows, from simulations at `low` and `high` rows."""
    lo, hi = simulate(low), simulate(high)
    slope = (hi - lo) / (high - low)
    return lo - slope * low, slope


@functools.lru_cache(maxsize=16)
def _footprint(configs_json: str, height: int, width: int, dtype: torch.dtype, lora_rank: int,
               text_len: int) -> Footprint:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    cfgs = json.loads(configs_json)
    vae_scale = 2 ** (len(cfgs["vae"]["block_out_channels"]) - 1)
    tr = _build_transformer(cfgs["transformer"], dtype, lora_rank)
    with torch.device("meta"):
        vae = AutoencoderKL.from_config({k: v for k, v in cfgs["vae"].items() if not k.startswith("_")})
        encoders = [model_cls(config_cls(**cfgs[name])).to(dtype) for name, (config_cls, model_cls) in {
            "text_encoder": (CLIPTextConfig, CLIPTextModelWithProjection),
            "text_encoder_2": (CLIPTextConfig, CLIPTextModelWithProjection),
            "text_encoder_3": (T5Config, T5EncoderModel)}.items() if name in cfgs]
    lora = sum(p.numel() * 4 for n, p in tr.named_parameters() if "lora_" in n)
    shape = (height, width, text_len, vae_scale)
    train = _line(lambda r: _simulate(tr, r, True, *shape), 2, 4)
    no_grad = _line(lambda r: _simulate(tr, r, False, *shape), 2, 4)
    tr.enable_gradient_checkpointing()
    train_checkpointed = _line(lambda r: _simulate(tr, r, True, *shape), 2, 4)
    decode = _line(lambda n: _simulate_decode(vae, n, height, width, vae_scale), 1, 2)
    c = cfgs["transformer"]
    return Footprint(_bytes(tr) - lora, sum(_bytes(e) for e in encoders), _bytes(vae), lora,
                     c["in_channels"] * (height // vae_scale) * (width // vae_scale) * 4, 3 * height * width * 4,
                     train, train_checkpointed, no_grad, decode)


def footprint(path: str, height: int, width: int, dtype: torch.dtype, lora_rank: int,
              text_len: int) -> Footprint:
    """The bytes of model `path` (a pipeline folder or a hub id) at one resolution, from its configs alone.
    Computed once per process for each (configs, resolution, dtype, LoRA rank, text length)."""
    return _footprint(json.dumps(_configs(path), sort_keys=True), height, width, dtype, lora_rank, text_len)


def footprint_of_pipeline(pipe, height: int, width: int, dtype: torch.dtype, lora_rank: int,
                          text_len: int) -> Footprint:
    """footprint() of a pipeline already built (bench/opd_round.py's stand-ins), from its configs."""
    cfgs = {name: dict(getattr(pipe, name).config) for name in ("transformer", "vae")}
    for name in TEXT_ENCODERS:
        if getattr(pipe, name, None) is not None:
            cfgs[name] = getattr(pipe, name).config.to_dict()
    return _footprint(json.dumps(cfgs, sort_keys=True, default=str), height, width, dtype, lora_rank, text_len)


def text_length(path: str) -> int:
    """Tokens per prompt of an SD3 pipeline: CLIP's 77 + T5's min(128, its tokenizer's limit)."""
    return 77 + t5_length(path)


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


def job(script: str, cfg, world: int, reward_bytes: int) -> Job:
    """The Job of a resolved config on `world` ranks."""
    rows = 1 if getattr(cfg, "guidance", 4.5) == 1.0 else 2
    if script == "table":
        return Job("table", 0, 0, 0, rows, reward_bytes, cfg.steps)
    from harness import trained_steps
    K = len(trained_steps(cfg))
    if script == "opd":
        return Job("opd", cfg.prompts_per_batch // world, K, cfg.num_steps, 2, reward_bytes, cfg.eval_steps,
                   full_finetune=cfg.full_finetune)
    return Job(script, cfg.batch // world, K, cfg.num_steps, rows, reward_bytes, cfg.eval_steps,
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


def plan_run(script: str, cfg, dist, fixed: set[str], reward_bytes: int, adapters: float = 0.0,
             adapter_bytes: int = 0, model: str | None = None) -> str:
    """A script's plan, before anything loads: predict the peak memory of a step of `script` (opd, grpo,
    nft, table; base `model`, default cfg.model; with `adapters` frozen LoRAs of the student's size and
    `adapter_bytes` more) for each
    setting and set on `cfg` the fastest that fits the budget (--max_memory_gb, or the GPU's memory on
    CUDA) for the knobs not in `fixed`. Without a budget (CPU and no --max_memory_gb)
    nothing changes; the dry run still prints the configured setting's peak. Returns the lines to print
    ("" when there is nothing to say); a ValueError naming the numbers when nothing fits, when the model's
    configs are not found and a budget was asked for, or when a CUDA dry run without a GPU has no budget.
    The same command plans the same way in its dry run and its run (on the same budget)."""
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
        from plumbing.model_files import resolution_rule
        rule = resolution_rule(model)
        if rule is None:
            raise FileNotFoundError(f"the configs of {model} are not found")
        height, width = height or rule[1], width or rule[1]
        fp = footprint(model, height, width, DTYPES[cfg.dtype], getattr(cfg, "lora_rank", 32), text_length(model))
    except FileNotFoundError as e:
        if budget != float("inf"):
            raise ValueError(f"--max_memory_gb: {e}") from None
        return f"memory plan skipped ({e})"
    j = job(script, cfg, dist.world, reward_bytes)
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


def main(argv=None):
    ap = argparse.ArgumentParser(description="Predict the peak memory of an OPD round for each setting.")
    ap.add_argument("--model", required=True, help="SD3 pipeline folder (or a hub id: its configs are read "
                                                   "from the hub cache, or fetched alone)")
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--lora_rank", type=int, default=32)
    ap.add_argument("--prompts_per_rank", type=int, default=3)
    ap.add_argument("--timestep_fraction", type=float, default=0.99)
    ap.add_argument("--num_steps", type=int, default=10)
    ap.add_argument("--eval_batch", type=int, default=32)
    ap.add_argument("--max_memory_gb", type=float, default=24)
    args = ap.parse_args(argv)
    cfg = argparse.Namespace(**vars(args), prompts_per_batch=args.prompts_per_rank, full_finetune=False,
                             train_chunk=0, teacher_chunk=0, grad_checkpointing=False, offload_text_encoders=False,
                             offload_rewards=False, eval_steps=40, train_steps=[], dry_run=True)
    dist = argparse.Namespace(world=1, device=torch.device("cuda"))
    try:
        print(plan_run("opd", cfg, dist, set(), 0, adapters=3))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
