"""Samplers with log-probs: the Flow-GRPO SDE step, the Euler ODE step, and whole rollouts.

Implements paper sections 2-4 (Eqs. 5-11): the SD3 shifted time grid, the Gaussian transition
kernel p(x_{j+1} | x_j) = N(mu_j, sbar_j^2 I), its log-density, and the closed-form KL between
two kernels of equal variance. Time convention: see model.py (t = 1 noise, t = 0 data, v = eps - x0).

Notation (paper -> code)
    t_j, t_{j+1}        t, t_next           grid values, 1 = t_0 > t_1 > ... > t_N = 0
    Delta_j             dt = t_next - t     (< 0)
    a                   noise_level         a = 0 is the deterministic ODE sampler
    s_j                 s                   diffusion coefficient a sqrt(t / (1 - t))
    mu(x_j)             mean
    sbar_j              sbar                transition std; sbar_j^2 = s_j^2 (-Delta_j)
    log p(x_{j+1}|x_j)  logp_sum            summed over all latent dims (a true log-density)

Departures from the reference code (Flow-GRPO)
1. `logp_sum` sums over latent dims; Flow-GRPO averages over dims (`logp_mean_per_dim` here),
   which is not a log-density and changes what a PPO ratio means. Both are returned, named.
2. The transition variance is the exact sbar_j^2 = s_j^2 (-Delta_j) of Eq. 10; Flow-GRPO's KL
   divides by s_j^2 alone, a per-step reweighting by (-Delta_j) (only matters for a > 0).
3. Noise is drawn per sample from its own seeded CPU generator, so sample i of a batch is
   regenerable alone, on any device and in any batch.

Run:
    python sample.py --model models/toy-sd3 --prompts 'a photo of two red circles' \\
        'a sign that says "A7"' --out grid.png                           # CPU, the embedded base
    python sample.py --model stabilityai/stable-diffusion-3.5-medium --lora ckpts/ocr --height 512 --width 512 \\
        --prompts 'a sign that says "OPD"'                                # 1 GPU, SD3.5-M + a teacher
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from model import FlowModel
from plumbing.config import option, parse_config
from plumbing.model_files import (DTYPES, SD35_MEDIUM, check_lora_folder, check_model_path, check_model_resolution,
                                  resolve_dtype)


# ---------------------------------------------------------------------- time grid
def time_grid(scheduler, num_steps: int) -> torch.Tensor:
    """The sampler's grid 1 = t_0 > ... > t_N = 0 (N+1 values): the scheduler's (shifted) sigmas.

    For SD3 (FlowMatchEulerDiscreteScheduler, shift 3.0) this is
        u_k = linspace(1, u_min, N),  t_k = shift u_k / (1 + (shift - 1) u_k),  t_N = 0,
    where u_min is the *shifted* smallest training sigma (diffusers shifts twice; kept for fidelity).
    """
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(num_steps)
    grid = sched.sigmas.detach().float().cpu()
    assert grid.shape == (num_steps + 1,) and grid[0] == 1.0 and grid[-1] == 0.0, f"unexpected grid {grid}"
    return grid


def trained_steps(cfg) -> list[int]:
    """The sampling steps j whose transitions are trained, one meaning for every script: cfg.train_steps
    when the script has that field and it is set, else Flow-GRPO's and the release's first
    K = int(N x timestep_fraction) steps 0 .. K-1 (paper: 0..8 of 10; the last step is never trained)."""
    if getattr(cfg, "train_steps", None):
        return list(cfg.train_steps)
    return list(range(max(1, int(cfg.timestep_fraction * cfg.num_steps))))


# ---------------------------------------------------------------------- one transition
def _diffusion_coefficient(t, noise_level: float, t_guard: float):
    # s_j = a sqrt(t_j / (1 - t_j)), with 1 - t_1 in the denominator at t_j = 1           (Eq. 5)
    return noise_level * torch.sqrt(t / (1 - torch.where(t >= 1, torch.full_like(t, t_guard), t)))


def _as_column(t, x):
    """A float or (B,) tensor of times as (B, 1, ..., 1) in x's dtype and device."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.reshape(-1, *[1] * (x.dim() - 1))


def transition_mean(x, v, t, t_next, noise_level: float, t_guard: float):
    """mu(x_j) of the Gaussian transition p(x_{j+1} | x_j) = N(mu, sbar^2 I) (Eq. 7), the quantity both
    OPD losses compare; a = 0 gives the Euler ODE step x + v Delta.

    x, v: (B, ...) state and velocity at time t; t, t_next: floats or (B,) tensors.
    t_guard: the grid's t_1, used in place of t in (1 - t) when t = 1 (the t = 1 guard).
    """
    t = _as_column(t, x)
    dt = _as_column(t_next, x).reshape_as(t) - t  # Delta_j < 0
    s = _diffusion_coefficient(t, noise_level, t_guard)
    # mu = x (1 + s^2 / (2 t) Delta) + v (1 + s^2 (1 - t) / (2 t)) Delta                  (Eq. 7)
    return x * (1 + s**2 / (2 * t) * dt) + v * (1 + s**2 * (1 - t) / (2 * t)) * dt


def transition_std(t, t_next, noise_level: float, t_guard: float, batch: int | None = None):
    """sbar_j = s_j sqrt(-Delta_j), the transition's standard deviation (Eq. 8); 0 for the ODE.
    t, t_next: floats or (B,) tensors; returns (B,) (a float time is expanded to `batch` rows)."""
    t = torch.as_tensor(t, dtype=torch.float64).flatten()
    t_next = torch.as_tensor(t_next, dtype=t.dtype, device=t.device).flatten()
    # sbar = s sqrt(-Delta)                                                               (Eq. 8)
    sbar = _diffusion_coefficient(t, noise_level, t_guard) * torch.sqrt(t - t_next)
    return sbar.expand(batch) if batch is not None and sbar.numel() == 1 else sbar


def sde_step(x, v, t, t_next, noise_level: float, t_guard: float, noise=None):
    """One step of the Flow-GRPO SDE (Eqs. 5-9); noise_level a = 0 gives the Euler ODE step.

    noise: (B, ...) standard normal draws; required when noise_level > 0.
    Returns (x_next, mean, sbar): mean = transition_mean(...), sbar (B,) = transition_std(...).
    """
    mean = transition_mean(x, v, t, t_next, noise_level, t_guard)
    sbar = transition_std(t, t_next, noise_level, t_guard, x.shape[0]).to(x.device, x.dtype)
    if noise_level == 0:
        return mean, mean, sbar
    if not (noise is not None and noise.shape == x.shape):
        raise ValueError("the SDE step needs standard-normal noise of x's shape")
    # x_{j+1} = mu + sbar eps                                                             (Eq. 9)
    return mean + _as_column(sbar, x) * noise, mean, sbar


def gaussian_logprob(x_next, mean, sbar):
    """log N(x_next; mean, sbar^2 I) per sample, summed over all dims, and its per-dim mean.

    Returns (logp_sum, logp_mean_per_dim), each (B,). sbar: (B,), must be > 0 (no density for the ODE).
    """
    if not (sbar > 0).all():
        raise ValueError("the ODE step (noise level 0) has no transition density")
    sbar = _as_column(sbar, x_next)
    # log p = -(x - mu)^2 / (2 sbar^2) - log sbar - log(2 pi) / 2, per dim
    per_dim = -((x_next - mean) ** 2) / (2 * sbar**2) - torch.log(sbar) - 0.5 * math.log(2 * math.pi)
    logp_sum = per_dim.flatten(1).sum(1)
    return logp_sum, logp_sum / per_dim[0].numel()


def gaussian_kl(mean_p, mean_q, sbar2):
    """KL(N(mean_p, sbar2 I) || N(mean_q, sbar2 I)) = ||mean_p - mean_q||^2 / (2 sbar2)  (Eqs. 10-11).

    mean_p, mean_q: (B, ...); sbar2: (B,) or scalar, > 0. Returns (B,), summed over dims.
    """
    sq = ((mean_p - mean_q) ** 2).flatten(1).sum(1)
    return sq / (2 * torch.as_tensor(sbar2, dtype=sq.dtype, device=sq.device))


# ---------------------------------------------------------------------- rollouts
@dataclass
class Trajectory:
    """A batch of denoising trajectories, everything index-aligned per sample."""
    latents: torch.Tensor    # (B, N+1, C, h, w): x_0 (noise) ... x_N (clean)
    t: torch.Tensor          # (N+1,): the grid t_0 = 1 ... t_N = 0
    logp_sum: torch.Tensor   # (B, N): log p(x_{j+1} | x_j) summed over dims; NaN-free, 0 for the ODE
    sbar: torch.Tensor       # (N,): sbar_j, the transition std of each step (0 for the ODE)
    seeds: list[int]
    images: torch.Tensor | None = None  # (B, 3, H, W) in [0, 1]
    means: torch.Tensor | None = None   # (B, N, C, h, w): mu(x_j) of each step, with keep_means

    @staticmethod
    def cat(parts: list["Trajectory"]) -> "Trajectory":
        """Trajectories of one grid rolled out in several batches, as one batch (in order)."""
        def join(name):
            return None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts])
        return Trajectory(join("latents"), parts[0].t, join("logp_sum"), parts[0].sbar,
                          [seed for p in parts for seed in p.seeds], join("images"), join("means"))


def make_noise(seeds, shape, num_steps: int, noise_level: float):
    """Per-sample standard normals from each sample's own generator: x_0 and one draw per SDE step.

    Returns (x0 (B, *shape), step_noise (B, N, *shape) or None for the ODE).
    """
    x0, steps = [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(int(seed))
        x0.append(torch.randn(shape, generator=g))
        if noise_level > 0:
            steps.append(torch.randn((num_steps, *shape), generator=g))
    return torch.stack(x0), (torch.stack(steps) if steps else None)


@torch.no_grad()
def rollout(model, embeds, seeds, num_steps: int, guidance: float, noise_level: float = 0.0,
            height: int | None = None, width: int | None = None, adapter=None, decode=True,
            keep_means=False) -> Trajectory:
    """Sample N steps from seeded noise under no-grad with `adapter`'s weights (None = base model).

    embeds: TextEmbeds for B prompts; seeds: B ints (sample i depends on seeds[i] alone).
    """
    height = height or model.default_resolution()
    width = width or model.default_resolution()
    shape = model.latent_shape(height, width)
    if len(seeds) != len(embeds):
        raise ValueError(f"{len(seeds)} seeds for {len(embeds)} prompts")
    t = time_grid(model.pipe.scheduler, num_steps)
    x, noise = make_noise(seeds, shape, num_steps, noise_level)
    x = x.to(model.device)
    latents, logps, sbars, means = [x], [], [], []
    with model.adapter(adapter):
        for j in range(num_steps):
            v = model.velocity(x, t[j], embeds, guidance)
            eps = noise[:, j].to(model.device) if noise is not None else None
            x_next, mean, sbar = sde_step(x, v, t[j].item(), t[j + 1].item(), noise_level, t[1].item(), eps)
            logps.append(gaussian_logprob(x_next, mean, sbar)[0] if noise_level > 0
                         else torch.zeros(len(seeds)))
            sbars.append(sbar[0])
            if keep_means:
                means.append(mean)
            x = x_next
            latents.append(x)
    images = model.decode(x) if decode else None
    return Trajectory(torch.stack(latents, 1), t, torch.stack(logps, 1).cpu(), torch.stack(sbars).cpu(),
                      list(seeds), images, torch.stack(means, 1) if keep_means else None)


# ---------------------------------------------------------------------- images
def save_grid(images: torch.Tensor, path: str, nrow: int | None = None, scale: int = 1) -> None:
    """Write (B, 3, H, W) images in [0, 1] as one PNG grid (nearest-neighbour upscaled by `scale`)."""
    import numpy as np
    from PIL import Image
    B, _, H, W = images.shape
    nrow = nrow or math.ceil(math.sqrt(B))
    rows = math.ceil(B / nrow)
    grid = torch.ones(3, rows * (H + 2), nrow * (W + 2))
    for i, img in enumerate(images.float().cpu()):
        r, c = divmod(i, nrow)
        grid[:, r * (H + 2) + 1:r * (H + 2) + 1 + H, c * (W + 2) + 1:c * (W + 2) + 1 + W] = img
    arr = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST).save(path)


@dataclass
class SampleConfig:
    """Sample a PNG grid from an SD3-family model (+ LoRA)."""
    model: str = option(SD35_MEDIUM, "pipeline folder or hub id (the paper's SD3.5-M)")
    lora: str = option("", "a PEFT LoRA folder to apply")
    prompts: list[str] = option(factory=list, help="one or more prompts, each quoted")
    images_per_prompt: int = 1
    num_steps: int = option(40, "sampling steps N (the evaluation's 40)")
    guidance: float = option(4.5, "CFG scale w")
    noise_level: float = option(0.0, "a in Eq. 5; 0 = ODE")
    seed: int = option(0, "image i uses seed + i")
    height: int = option(0, "0 = the model's default resolution")
    width: int = option(0, "0 = the model's default resolution")
    scale: int = option(4, "upscale factor of the PNG")
    out: str = "grid.png"
    device: str = option("auto", "auto: cuda if available, else cpu")
    dtype: str = option("auto", "transformer and text encoders (auto: bfloat16 on CUDA, float32 on CPU); VAE float32")


def main(argv=None):
    args = parse_config(SampleConfig, argv)
    try:  # every input checked before the model loads
        if not args.prompts:
            raise ValueError("no prompt given: --prompts 'a photo of a cat' ...")
        for name in ("images_per_prompt", "num_steps", "scale"):
            if getattr(args, name) <= 0:
                raise ValueError(f"--{name} must be > 0")
        if args.noise_level < 0:
            raise ValueError("--noise_level must be >= 0")
        if args.dtype not in ("auto", *DTYPES):
            raise ValueError(f"--dtype must be auto, float32 or bfloat16, got {args.dtype!r}")
        out = Path(args.out)
        if out.suffix.lower() != ".png":
            raise ValueError(f"--out {args.out}: the grid is written as PNG; give a path ending in .png")
        if not out.parent.is_dir():
            raise FileNotFoundError(f"--out {args.out}: folder {out.parent} does not exist")
        args.device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: no CUDA device is available here; use --device cpu")
        check_model_path(args.model)
        if args.lora:
            check_lora_folder(args.lora)
        check_model_resolution(args.model, args.height, args.width)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    device = torch.device(args.device)
    model = FlowModel.load(args.model, device=device, dtype=DTYPES[resolve_dtype(args.dtype, device)])
    adapter = None
    if args.lora:
        adapter = "adapter"
        model.load_lora(args.lora, adapter)
    prompts = [p for p in args.prompts for _ in range(args.images_per_prompt)]
    try:
        size = model.default_resolution()
        model.latent_shape(args.height or size, args.width or size)
    except ValueError as e:  # a hub model: its sizes are known only now
        raise SystemExit(f"error: {e}") from None
    traj = rollout(model, model.encode_prompts(prompts), [args.seed + i for i in range(len(prompts))],
                   args.num_steps, args.guidance, args.noise_level, args.height or None, args.width or None,
                   adapter=adapter)
    save_grid(traj.images, args.out, nrow=args.images_per_prompt if args.images_per_prompt > 1 else None,
              scale=args.scale)
    print(f"wrote {args.out} ({len(prompts)} images)")


if __name__ == "__main__":
    main()
