"""A memory planner for a student-training step: peak device memory predicted before anything loads.

Out-of-memory is the most common complaint of Flow-GRPO's users; nothing in this field estimates it
before a run. `plan` predicts the peak of one OPD round (paper section 7's layout: per task batch a
rollout, the teacher targets and the student's forward+backward) for each candidate setting, picks the
fastest that fits the budget and refuses, with the numbers, when none does. Nothing is loaded: every
module is built on PyTorch's meta device from the model's config files, which costs no memory and no
FLOPs, and one forward of the transformer there records what autograd would keep for the backward.

The model of the peak (bytes; B prompts per task batch and rank, K trained steps, w = 2 for the CFG pair):
    persistent  = weights (transformer in its dtype; text encoders in theirs; VAE float32)
                + student LoRA in float32 x 5 (weights, gradients, two AdamW moments, EMA shadow)
                + teacher LoRAs (float32) + the trajectory (B, N+1, C, h, w) in float32
    rollout     = persistent + no_grad(w B)              one guided velocity without a graph
    teacher     = persistent + no_grad(w x teacher rows)
    train       = persistent + train(w x train rows)     forward, loss and backward (or train_checkpointed)
The three activation terms are simulated, not estimated: the transformer runs on the meta device (its
config, the LoRA, the dtype, the resolution; no memory, no FLOPs) under a dispatch mode that counts every
op's output bytes from its creation until its storage is freed, so the peak includes what autograd keeps
for the backward, the backward's own temporaries and gradient checkpointing's recomputation. Each is a
line in the number of rows, from simulations at 2 and 4 rows. scaled_dot_product_attention is counted as
a fused kernel keeps it (q, k, v, output and a float32 log-sum-exp, no n x n matrix), which is what runs
on CUDA and on CPU.

Not modelled: the CUDA caching allocator's fragmentation and workspaces (cuBLAS, cuDNN), the CUDA
context (~0.5 GiB), and memory of other processes. tests/test_memory.py checks the simulation against
the PyTorch profiler's memory timeline on CPU with a tiny model to 10%; on GPU the comparison with
measured peaks is one command in docs/bench.md (not yet run: no GPU was lent).

Departures: none from the paper (it gives no memory model).

Run:
    python memory.py --model stabilityai/stable-diffusion-3.5-medium --height 512 --width 512 \\
        --prompts_per_rank 3 --max_memory_gb 24          # the table of settings and the choice
"""
from __future__ import annotations

import argparse
import contextlib
import json
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from model import LORA_TARGETS, repo_path, t5_length

GiB = 2**30
DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


@dataclass(frozen=True)
class Setting:
    train_chunk: int            # (step, prompt) rows per student forward+backward, per rank (0: all K x B)
    teacher_chunk: int          # rows per teacher forward (0: all at once)
    grad_checkpointing: bool

    def describe(self) -> str:
        chunk = "all trained steps at once" if self.train_chunk == 0 else \
            f"{self.train_chunk} rows per backward"
        return f"{chunk}{', gradient checkpointing' if self.grad_checkpointing else ''}"


@dataclass
class Footprint:
    """Bytes of one model at one resolution (see the module docstring): weights, one LoRA adapter in
    float32, one latent in float32, and for each kind of transformer call the peak of live activation
    bytes as a line in the number of rows, (bytes at 0 rows, bytes per row)."""
    weights: int
    lora: int
    latent: int
    train: tuple[float, float]              # forward + backward
    train_checkpointed: tuple[float, float]  # the same with gradient checkpointing
    no_grad: tuple[float, float]            # a forward without a graph (rollout, teacher)

    @staticmethod
    def at(line: tuple[float, float], rows: int) -> int:
        return int(line[0] + line[1] * rows)


# ---------------------------------------------------------------------- configs and meta-device modules
def _configs(path: str) -> dict[str, dict]:
    """The JSON configs of a local SD3 pipeline folder (transformer, vae, text encoders)."""
    root = Path(repo_path(path))
    if not (root / "transformer" / "config.json").is_file():
        raise FileNotFoundError(f"memory planner: {path} has no transformer/config.json (a hub model "
                                "must be in the local cache; or plan with --max_memory_gb 0)")
    return {name: json.loads((root / name / "config.json").read_text())
            for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
            if (root / name / "config.json").is_file()}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


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
    """The peak of live tensor bytes while it is active: every op's outputs counted once per storage
    from their creation until the last tensor on that storage is freed."""

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
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage()._cdata
                if key not in self.refs:
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


def _line(tr, grad, *shape) -> tuple[float, float]:
    """(a, b) of peak(rows) = a + b rows, from simulations at 2 and 4 rows (one and two CFG pairs)."""
    two, four = _simulate(tr, 2, grad, *shape), _simulate(tr, 4, grad, *shape)
    return two - (four - two), (four - two) / 2


def footprint(path: str, height: int, width: int, dtype: torch.dtype, lora_rank: int,
              text_len: int) -> Footprint:
    """The bytes of model `path` (a local pipeline folder) at one resolution, from its configs alone."""
    cfgs = _configs(path)
    vae_scale = 2 ** (len(cfgs["vae"]["block_out_channels"]) - 1)
    tr = _build_transformer(cfgs["transformer"], dtype, lora_rank)
    weights = sum(p.numel() * DTYPE_BYTES[p.dtype] for n, p in tr.named_parameters() if "lora_" not in n)
    lora = sum(p.numel() * 4 for n, p in tr.named_parameters() if "lora_" in n)
    weights += _text_and_vae_bytes(cfgs, dtype)
    shape = (height, width, text_len, vae_scale)
    train, no_grad = _line(tr, True, *shape), _line(tr, False, *shape)
    tr.enable_gradient_checkpointing()
    train_checkpointed = _line(tr, True, *shape)
    c = cfgs["transformer"]
    latent = c["in_channels"] * (height // vae_scale) * (width // vae_scale) * 4
    return Footprint(weights, lora, latent, train, train_checkpointed, no_grad)


def footprint_of_pipeline(pipe, height: int, width: int, dtype: torch.dtype, lora_rank: int,
                          text_len: int) -> Footprint:
    """footprint() of a pipeline already built (bench/opd_round.py's stand-ins): its configs written to a
    temporary folder first."""
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        for name in ("transformer", "vae"):
            getattr(pipe, name).save_config(f"{folder}/{name}")
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).config.save_pretrained(f"{folder}/{name}")
        return footprint(folder, height, width, dtype, lora_rank, text_len)


def _text_and_vae_bytes(cfgs: dict, dtype: torch.dtype) -> int:
    """Text encoders in the transformer's dtype (model.FlowModel), the VAE in float32."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    total = 0
    with torch.device("meta"):
        vae = AutoencoderKL.from_config({k: v for k, v in cfgs["vae"].items() if not k.startswith("_")})
        total += _count(vae) * 4
        for name, (config_cls, model_cls) in {"text_encoder": (CLIPTextConfig, CLIPTextModelWithProjection),
                                              "text_encoder_2": (CLIPTextConfig, CLIPTextModelWithProjection),
                                              "text_encoder_3": (T5Config, T5EncoderModel)}.items():
            if name in cfgs:
                total += _count(model_cls(config_cls(**cfgs[name]))) * DTYPE_BYTES[dtype]
    return total


# ---------------------------------------------------------------------- the peak and the choice
def predict(fp: Footprint, setting: Setting, prompts: int, trained_steps: int, num_steps: int, teachers: int,
            cfg_pair: bool = True) -> dict[str, int]:
    """Predicted peak bytes of each phase of one task batch of `prompts` prompts (per rank)."""
    w = 2 if cfg_pair else 1
    persistent = fp.weights + 5 * fp.lora + teachers * fp.lora + prompts * (num_steps + 1) * fp.latent
    rows_all = trained_steps * prompts               # (trained step, prompt) rows of one task batch
    train_rows = w * (setting.train_chunk or rows_all)
    teacher_rows = w * (setting.teacher_chunk or rows_all)
    train = fp.train_checkpointed if setting.grad_checkpointing else fp.train
    return {"rollout": persistent + Footprint.at(fp.no_grad, w * prompts),
            "teacher": persistent + Footprint.at(fp.no_grad, teacher_rows),
            "train": persistent + Footprint.at(train, train_rows),
            "persistent": persistent}


def text_length(path: str) -> int:
    """Tokens per prompt of an SD3 pipeline folder: CLIP's 77 + T5's min(128, its tokenizer's limit)."""
    return 77 + t5_length(path)


def candidates(prompts: int) -> list[Setting]:
    """Settings, fastest first (docs/bench.md): all trained steps in one backward, then one step's
    prompts per backward, then one row; the same with gradient checkpointing after them."""
    out = []
    for ckpt in (False, True):
        for chunk in (0, prompts, 1):
            s = Setting(chunk, 0 if chunk == 0 else chunk, ckpt)
            if s not in out:
                out.append(s)
    return out


def plan(fp: Footprint, budget: float, prompts: int, trained_steps: int, num_steps: int, teachers: int,
         cfg_pair: bool = True, fixed: dict | None = None) -> tuple[Setting, list[tuple[Setting, int]]]:
    """(the fastest setting whose predicted peak fits `budget` bytes, [(setting, peak)] of all). Keys of
    `fixed` (set by the user) are not chosen. ValueError with the numbers when none fits."""
    import dataclasses
    settings = [dataclasses.replace(s, **(fixed or {})) for s in candidates(prompts)]
    settings = list(dict.fromkeys(settings))
    table = [(s, max(predict(fp, s, prompts, trained_steps, num_steps, teachers, cfg_pair).values()))
             for s in settings]
    for s, peak in table:
        if peak <= budget:
            return s, table
    smallest = min(table, key=lambda r: r[1])
    raise ValueError(f"no setting fits {budget / GiB:.1f} GiB: the smallest predicted peak is "
                     f"{smallest[1] / GiB:.1f} GiB ({smallest[0].describe()}); use fewer prompts per rank "
                     f"(more GPUs), a lower resolution, --dtype bfloat16, or a larger --max_memory_gb")


def format_table(table: list[tuple[Setting, int]], chosen: Setting | None, budget: float) -> str:
    limit = "none" if budget == float("inf") else f"{budget / GiB:.1f} GiB"
    lines = [f"memory plan (budget {limit}; predicted peak per GPU process):"]
    lines += [f"  {'->' if s == chosen else '  '} {peak / GiB:6.2f} GiB  {s.describe()}" for s, peak in table]
    return "\n".join(lines)


def plan_round(cfg, dist, given: set[str], n_teachers: int, dtype: torch.dtype, steps: list[int],
               always: bool = False) -> str:
    """opd.py's plan, before anything loads: predict the peak memory of a round for each setting, set on
    `cfg` the fastest that fits the budget (--max_memory_gb, or the GPU's memory on CUDA) for the chunk
    sizes and checkpointing the command line did not set (`given`). Returns the plan's table to print
    ("" without a budget, unless `always`: then every setting's predicted peak with no budget; or a line
    saying why it was skipped); a ValueError naming the numbers when nothing fits, or when
    --max_memory_gb is given for a model without local configs."""
    budget = cfg.max_memory_gb * GiB
    if not budget and dist.device.type == "cuda":
        budget = torch.cuda.get_device_properties(dist.device).total_memory
    if not budget and not always:
        return ""
    budget = budget or float("inf")
    from model import resolution_rule
    try:
        rule = resolution_rule(cfg.model)
        if rule is None:
            raise FileNotFoundError(f"{cfg.model} has no local configs to plan from")
        height, width = cfg.height or rule[1], cfg.width or rule[1]
        fp = footprint(cfg.model, height, width, dtype, cfg.lora_rank, text_length(cfg.model))
    except FileNotFoundError as e:
        if cfg.max_memory_gb:
            raise ValueError(f"--max_memory_gb: {e}") from None
        return f"memory plan skipped ({e})"
    prompts = cfg.prompts_per_batch // dist.world
    fixed = {k for k in ("train_chunk", "teacher_chunk", "grad_checkpointing") if k in given}
    chosen, table = plan(fp, budget, prompts, len(steps), cfg.num_steps, n_teachers,
                         fixed={k: getattr(cfg, k) for k in fixed})
    for key in ("train_chunk", "teacher_chunk", "grad_checkpointing"):
        setattr(cfg, key, getattr(chosen, key))
    return format_table(table, chosen, budget)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Predict the peak memory of an OPD round for each setting.")
    ap.add_argument("--model", required=True, help="SD3 pipeline folder (or a cached hub id)")
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--lora_rank", type=int, default=32)
    ap.add_argument("--prompts_per_rank", type=int, default=3)
    ap.add_argument("--trained_steps", type=int, default=9)
    ap.add_argument("--num_steps", type=int, default=10)
    ap.add_argument("--teachers", type=int, default=3)
    ap.add_argument("--max_memory_gb", type=float, default=24)
    args = ap.parse_args(argv)
    fp = footprint(args.model, args.height, args.width, getattr(torch, args.dtype), args.lora_rank,
                   text_length(args.model))
    budget = args.max_memory_gb * GiB
    try:
        chosen, table = plan(fp, budget, args.prompts_per_rank, args.trained_steps, args.num_steps,
                             args.teachers)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(format_table(table, chosen, budget))
    return chosen, table


if __name__ == "__main__":
    main()
