"""What one SD3 model needs in device memory at one resolution, from its config files alone (the memory
planner's input, plumbing/memory.py): its components' weights, one LoRA adapter, and the activation peak
of each kind of call as a line in the number of rows.

Nothing is loaded: every module is built on PyTorch's meta device from the model's config files (a local
folder, or a hub id's configs from the hub cache, fetched alone on a machine with internet), which costs
no memory and no FLOPs. The activation terms are simulated, not estimated: the transformer (and the VAE
decoder) run on the meta device (its config, the LoRA, the dtype, the resolution) under a dispatch mode
that counts every op's output bytes from its creation until its storage is freed, so the peak includes
what autograd keeps for the backward, the backward's own temporaries and gradient checkpointing's
recomputation. An op whose output is a view of an existing storage (a frozen weight's transpose saved for
the backward, a slice of the position-embedding buffer) adds nothing. Each is a line in the number of
rows, from simulations at 2 and 4 rows (the VAE: 1 and 2 images). scaled_dot_product_attention is counted
as a fused kernel keeps it (q, k, v, output and a float32 log-sum-exp, no n x n matrix), which is what
runs on CUDA and on CPU. tests/plumbing/test_memory.py checks the simulation against the PyTorch
profiler's memory timeline on CPU to 10%.

Run: a library (plumbing/memory.py, bench/opd_round.py).
"""
from __future__ import annotations

import contextlib
import functools
import json
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from plumbing.model_files import TEXT_ENCODERS, config_folder, t5_length

GiB = 2**30



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


def _build_transformer(config: dict, dtype: torch.dtype, lora_rank: int, lora_targets: tuple[str, ...]):
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig
    with torch.device("meta"):
        public = {k: v for k, v in config.items() if not k.startswith("_")}
        tr = SD3Transformer2DModel.from_config(public).to(dtype)
    tr.requires_grad_(False)
    if lora_rank:
        tr.add_adapter(LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=list(lora_targets)))
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
               text_len: int, lora_targets: tuple[str, ...]) -> Footprint:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    cfgs = json.loads(configs_json)
    vae_scale = 2 ** (len(cfgs["vae"]["block_out_channels"]) - 1)
    tr = _build_transformer(cfgs["transformer"], dtype, lora_rank, lora_targets)
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


def footprint(path: str, height: int, width: int, dtype: torch.dtype, lora_rank: int, text_len: int,
              lora_targets: tuple[str, ...]) -> Footprint:
    """The bytes of model `path` (a pipeline folder or a hub id) at one resolution, from its configs alone,
    with a LoRA of `lora_rank` on the modules `lora_targets` (model.LORA_TARGETS). Computed once per
    process for each (configs, resolution, dtype, LoRA rank, text length, targets)."""
    return _footprint(json.dumps(_configs(path), sort_keys=True), height, width, dtype, lora_rank, text_len,
                      tuple(lora_targets))


def footprint_of_pipeline(pipe, height: int, width: int, dtype: torch.dtype, lora_rank: int, text_len: int,
                          lora_targets: tuple[str, ...]) -> Footprint:
    """footprint() of a pipeline already built (bench/opd_round.py's stand-ins), from its configs."""
    cfgs = {name: dict(getattr(pipe, name).config) for name in ("transformer", "vae")}
    for name in TEXT_ENCODERS:
        if getattr(pipe, name, None) is not None:
            cfgs[name] = getattr(pipe, name).config.to_dict()
    return _footprint(json.dumps(cfgs, sort_keys=True, default=str), height, width, dtype, lora_rank, text_len,
                      tuple(lora_targets))


def text_length(path: str) -> int:
    """Tokens per prompt of an SD3 pipeline: CLIP's 77 + T5's min(128, its tokenizer's limit)."""
    return 77 + t5_length(path)

