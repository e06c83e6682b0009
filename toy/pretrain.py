"""Pretrain the embedded tiny text-to-image base model on the toy world (toy/world.py), from scratch, on CPU.

Builds an SD3-architecture pipeline (toy.pipeline.build_tiny_pipeline: SD3Transformer2DModel with
SD3.5-Medium's dual-attention blocks and RMS qk-norm (--sd35, the default), AutoencoderKL, two CLIP
text encoders and a T5 encoder, all tiny) and trains it in two phases:
  A. the VAE (32x32 RGB -> 16x16x8 latents) on toy renders: L1 + a small KL term;
  B. the transformer and the text encoders jointly with the rectified-flow loss of paper section 2,
         x_t = (1 - t) x_0 + t eps,   L = E || v_theta(x_t, t, c) - (eps - x_0) ||^2,
     t ~ logit-normal(0, 1) as in SD3, with 10% caption dropout to "" so that CFG works.
The result is a diffusers StableDiffusion3Pipeline folder (safetensors) that model.FlowModel.load
reads exactly like stabilityai/stable-diffusion-3.5-medium, with the shipped base's recipe.json (the
training scripts' toy-scale values, models/toy-sd3/recipe.json: their one copy) copied in. Held-out test
prompts of every toy task are never used for pretraining.

Batches mix the toy tasks in the integer shares of `--task_weights` (default geneval 3 : ocr 4 :
aesthetic 2; OCR is the slowest to learn). `--init FOLDER` starts phase B from an existing pipeline folder instead (its
VAE and tokenizers kept, phase A skipped): a second stage, e.g. more steps on one task.

Departures from SD3 training
1. Text encoders are trained from scratch with the transformer (SD3 freezes pretrained ones).
2. The EMA of the trained weights (decay `ema`, with warm-up) is what gets saved.

Resume is exact: a checkpoint holds the weights, the EMA, the optimizer, the schedule and torch's
global RNG (the T5 encoder's dropout draws from it); each batch is a pure function of (seed, step).

Run (CPU; the measured time is in docs/toy-world.md; it checkpoints and `--resume` continues exactly):
    python -m toy.pretrain --out models/toy-sd3
    python -m toy.pretrain --out /tmp/toy --vae_steps 50 --steps 50     # smoke test
    python -m toy.pretrain --init models/toy-sd3 --task_weights ocr=1 --steps 500 --out /tmp/toy-ocr
    python -m toy.pretrain --vae models/toy-sd3 --out runs/toy-sd3   # the shipped base's command: its VAE
                                                                      # (phase A of an earlier world) kept
    python -m toy.pretrain --world toy.framed --init models/toy-sd3 --steps 2000 --out runs/toy3-sd3a
                                            # the candidate world's base A (docs/toy-world.md); base B adds
                                            # --init runs/toy3-sd3a --zoom_weights 1.0=2,1.6=1,2.0=1
`--world` names the world's module (toy.world, or the candidate toy.framed, whose framings
`--zoom_weights` weights); the base's recipe.json names that world's prompt sets.
"""
from __future__ import annotations

import copy
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from toy import world
from toy.pipeline import TinySD3Config, build_tiny_pipeline
from plumbing.config import option, parse_config
from plumbing.durable import publish_dir, write_atomic
from plumbing.jsonfiles import read_jsonl
from plumbing.reporting import Trackers, parse_report_to

RECIPE = Path(__file__).resolve().parents[1] / "models/toy-sd3/recipe.json"  # toy-scale values (apply_recipe)


@dataclass
class PretrainConfig:
    """Pretrain the tiny toy-world base model."""
    out: str = "models/toy-sd3"
    seed: int = 0
    vae_steps: int = option(800, "phase A")
    vae_lr: float = 1e-3
    vae_kl: float = option(1e-6, "weight of the VAE's KL term")
    steps: int = option(4500, "phase B")
    batch: int = 64
    lr: float = option(2e-3, "at 6e-4 no glyph was learned (docs/toy-world.md)")
    warmup: int = 200
    ema: float = 0.999
    caption_dropout: float = 0.1
    layers: int = 4
    heads: int = 4
    head_dim: int = 32
    text_dim: int = 64
    latent_channels: int = 8
    save_every: int = 500
    task_weights: str = option("geneval=3,ocr=4,aesthetic=2", "integer shares of the toy tasks in each batch")
    world: str = option("toy.world", "the world's module: toy.world (shipped) or toy.framed (the candidate)")
    zoom_weights: str = option("", 'toy.framed: integer shares of its framings, e.g. "1.0=2,1.6=1,2.0=1" ("": '
                                   "uniform)")
    sd35: bool = option(True, "SD3.5-M's blocks: dual attention in the first half, RMS qk-norm")
    init: str = option("", "start phase B from this pipeline folder (VAE kept, phase A skipped)")
    vae: str = option("", "take this pipeline folder's VAE (phase A skipped), train the rest anew")
    resume: bool = False
    threads: int = 2
    report_to: str = option("none", "none | tensorboard | wandb | tensorboard,wandb (metrics.jsonl always)")
    wandb_project: str = "diffusion-opd"


def vocabulary(n: int = 4000, seed: int = 123) -> list[str]:
    """Whole words of the toy prompts (the T5 tokenizer keeps them as single tokens)."""
    rng = np.random.default_rng(seed)
    words = set()
    for task in world.TASKS:
        for _ in range(n // len(world.TASKS)):
            prompt, _ = world.sample_scene(task, rng)
            words.update(w for w in prompt.replace('"', " ").split() if w.isalpha() and w.islower())
    return sorted(words)


def task_shares(spec: str) -> tuple[str, ...]:
    """"geneval=1,ocr=2" -> ("geneval", "ocr", "ocr"): world.sample_batch draws tasks uniformly from it."""
    shares = []
    for item in spec.split(","):
        name, _, weight = item.partition("=")
        if name not in world.TASKS or not weight.isdigit():
            raise SystemExit(f"error: --task_weights {spec!r}: expected task=integer with tasks in {world.TASKS}")
        shares += [name] * int(weight)
    if not shares:
        raise SystemExit(f"error: --task_weights {spec!r} gives every task weight 0")
    return tuple(shares)


def world_module(name: str):
    """The world's module (--world): toy.world or a candidate with the same sample_batch/held_out_prompts."""
    import importlib
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        raise SystemExit(f"error: --world {name}: {e}; expected toy.world or toy.framed") from None
    if not all(hasattr(module, f) for f in ("sample_batch", "held_out_prompts", "DATA")):
        raise SystemExit(f"error: --world {name} is not a toy world (no sample_batch/held_out_prompts/DATA)")
    return module


def zoom_shares(spec: str, module=world):
    """"1.0=2,1.6=1" -> (1.0, 1.0, 1.6): the world's sample_batch draws framings uniformly from it;
    "" -> its ZOOMS (None for a world without framings)."""
    zooms = getattr(module, "ZOOMS", None)
    if not spec:
        return zooms
    if zooms is None:
        raise SystemExit(f"error: --zoom_weights needs a world with framings (--world toy.framed), not {module.__name__}")
    shares = []
    for item in spec.split(","):
        zoom, _, weight = item.partition("=")
        try:
            z = float(zoom)
        except ValueError:
            z = None
        if z not in zooms or not weight.isdigit():
            raise SystemExit(f"error: --zoom_weights {spec!r}: expected zoom=integer with zooms in {zooms}")
        shares += [z] * int(weight)
    if not shares:
        raise SystemExit(f"error: --zoom_weights {spec!r} gives every framing weight 0")
    return tuple(shares)


def batch_at(cfg, step: int, exclude: set[str]):
    """The training batch of `step`, a pure function of (seed, step) so resume is exact."""
    rng = np.random.default_rng([cfg.seed, step])
    module = world_module(cfg.world)
    zooms = zoom_shares(cfg.zoom_weights, module)
    images, prompts, _ = module.sample_batch(cfg.batch, rng, tasks=task_shares(cfg.task_weights),
                                             exclude_prompts=exclude, **({"zooms": zooms} if zooms else {}))
    drop = rng.random(cfg.batch) < cfg.caption_dropout
    return images, ["" if d else p for p, d in zip(prompts, drop)], rng


def train_vae(pipe, cfg, exclude, ckpt: Path):
    """Phase A: VAE with L1 reconstruction + KL; then the latent shift/scale from data statistics."""
    vae = pipe.vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    for step in tqdm(range(cfg.vae_steps), desc="vae"):
        images, _, _ = batch_at(cfg, 10**6 + step, exclude)
        post = vae.encode(images * 2 - 1).latent_dist
        recon = vae.decode(post.sample(), return_dict=False)[0]
        # L = |x - D(z)|_1 + beta KL(q(z|x) || N(0, I))
        loss = (recon - (images * 2 - 1)).abs().mean() + cfg.vae_kl * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = torch.cat([vae.encode(batch_at(cfg, 2 * 10**6 + i, exclude)[0] * 2 - 1).latent_dist.mean
                       for i in range(8)])
    # SD3 convention: x = (z - shift_factor) * scaling_factor has zero mean and unit std
    vae.register_to_config(shift_factor=z.mean().item(), scaling_factor=1.0 / z.std().item())
    recon_l1 = (vae.decode(vae.encode(images * 2 - 1).latent_dist.mean, return_dict=False)[0]
                - (images * 2 - 1)).abs().mean().item()
    print(f"vae: L1 {recon_l1:.4f} on [-1, 1], shift {vae.config.shift_factor:.4f}, scale {vae.config.scaling_factor:.4f}")
    torch.save(vae.state_dict(), ckpt / "vae.pt")


def main(argv=None):
    cfg = parse_config(PretrainConfig, argv)
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    ckpt = out.with_name(out.name + ".ckpt")  # training state, outside the shipped model folder
    module = world_module(cfg.world)
    zoom_shares(cfg.zoom_weights, module)  # bad framings fail before any compute
    exclude = module.held_out_prompts()
    dual = tuple(range(cfg.layers // 2)) if cfg.sd35 else ()  # SD3.5-M: layers 0-12 of 24
    tiny = TinySD3Config(layers=cfg.layers, heads=cfg.heads, head_dim=cfg.head_dim, text_dim=cfg.text_dim,
                         clip_dim=cfg.text_dim // 2, clip_max_len=24, t5_max_len=24,
                         latent_channels=cfg.latent_channels, image_size=world.IMAGE_SIZE,
                         words=tuple(vocabulary()), pieces=world.T5_PIECES,
                         dual_attention_layers=dual, qk_norm="rms_norm" if cfg.sd35 else None)
    for flag in ("init", "vae"):
        folder = getattr(cfg, flag)
        if folder and not (Path(folder) / "model_index.json").exists():
            raise SystemExit(f"error: --{flag} {folder}: not a pipeline folder (no model_index.json)")
    if cfg.init and cfg.vae:
        raise SystemExit("error: --init keeps its own VAE; pass --init or --vae, not both")
    task_shares(cfg.task_weights)  # bad weights fail before any compute
    try:
        parse_report_to(cfg.report_to)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if cfg.init:  # a second stage: continue a pretrained pipeline, its VAE and tokenizers unchanged
        from diffusers import StableDiffusion3Pipeline
        pipe = StableDiffusion3Pipeline.from_pretrained(cfg.init)
        torch.manual_seed(cfg.seed)  # the T5 encoder's dropout (build_tiny_pipeline seeds the other path)
        if not cfg.resume:
            shutil.rmtree(ckpt, ignore_errors=True)
        ckpt.mkdir(parents=True, exist_ok=True)
    else:
        pipe = build_tiny_pipeline(tiny, seed=cfg.seed)
        if cfg.resume and (ckpt / "vae.json").exists():  # phase A finished before the interruption
            pipe.vae.load_state_dict(torch.load(ckpt / "vae.pt", weights_only=True))
            pipe.vae.register_to_config(**json.loads((ckpt / "vae.json").read_text()))
        else:
            shutil.rmtree(ckpt, ignore_errors=True)
            ckpt.mkdir(parents=True)
            if cfg.vae:  # phase A skipped: that pipeline's VAE, its latent shift and scale included
                from diffusers import AutoencoderKL
                trained = AutoencoderKL.from_pretrained(cfg.vae, subfolder="vae")
                pipe.vae.load_state_dict(trained.state_dict())
                pipe.vae.register_to_config(shift_factor=trained.config.shift_factor,
                                            scaling_factor=trained.config.scaling_factor)
                torch.save(pipe.vae.state_dict(), ckpt / "vae.pt")
            else:
                train_vae(pipe, cfg, exclude, ckpt)
            (ckpt / "vae.json").write_text(json.dumps({k: pipe.vae.config[k] for k in ("shift_factor", "scaling_factor")}))
    vae = pipe.vae.eval().requires_grad_(False)
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor

    # Phase B: transformer + text encoders with the rectified-flow loss.
    nets = torch.nn.ModuleDict({"transformer": pipe.transformer, "text_encoder": pipe.text_encoder,
                                "text_encoder_2": pipe.text_encoder_2, "text_encoder_3": pipe.text_encoder_3})
    nets.train().requires_grad_(True)
    ema = copy.deepcopy(nets).eval().requires_grad_(False)
    opt = torch.optim.AdamW(nets.parameters(), lr=cfg.lr, weight_decay=0.01)
    # linear warm-up, then linear decay to 0 at the last step
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / cfg.warmup, max(0.0, (cfg.steps - s) / (cfg.steps - cfg.warmup))))
    start = 0
    if cfg.resume and (ckpt / "state.pt").exists():
        state = torch.load(ckpt / "state.pt", weights_only=True)
        nets.load_state_dict(state["nets"]), ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"]), sched.load_state_dict(state["sched"])
        torch.set_rng_state(state["torch_rng"])  # the T5 encoder's dropout draws from it
        start = state["step"]
    metrics = ckpt / "metrics.jsonl"
    kept = [r for r in read_jsonl(metrics, "pretraining metrics", torn_tail_ok=True) if r["step"] < start] \
        if metrics.exists() else []
    write_atomic(metrics, "".join(json.dumps(r) + "\n" for r in kept))  # lines past the checkpoint go; kill-safe
    log = open(metrics, "a")
    trackers = Trackers(parse_report_to(cfg.report_to), ckpt, vars(cfg), start, True)
    bar = tqdm(range(start, cfg.steps), desc="flow", initial=start, total=cfg.steps)
    for step in bar:
        t0 = time.perf_counter()
        images, prompts, rng = batch_at(cfg, step, exclude)
        with torch.no_grad():
            x0 = (vae.encode(images * 2 - 1).latent_dist.mean - shift) * scale  # (B, C, h, w)
        g = torch.Generator().manual_seed(int(rng.integers(2**31)))
        eps = torch.randn(x0.shape, generator=g)
        t = torch.sigmoid(torch.randn(x0.shape[0], generator=g))  # logit-normal(0, 1)
        tt = t.view(-1, 1, 1, 1)
        # x_t = (1 - t) x_0 + t eps;  target v = eps - x_0
        x_t = (1 - tt) * x0 + tt * eps
        seq, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device="cpu",
                                               do_classifier_free_guidance=False, max_sequence_length=24)
        v = pipe.transformer(hidden_states=x_t, timestep=1000 * t, encoder_hidden_states=seq,
                             pooled_projections=pooled, return_dict=False)[0]
        loss = (v - (eps - x0)).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(nets.parameters(), 1.0)
        opt.step()
        sched.step()
        # EMA with warm-up: decay_k = min(ema, (1 + k) / (10 + k)), so early weights fade out quickly
        decay = min(cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), nets.parameters()):
                pe.lerp_(p, 1 - decay)
        record = {"step": step, "loss": loss.item(), "grad_norm": grad_norm.item(), "sec": time.perf_counter() - t0}
        log.write(json.dumps(record) + "\n")
        trackers.log(record)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            log.flush()
            tmp = ckpt / "state.tmp"
            tmp.mkdir(exist_ok=True)
            torch.save({"nets": nets.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "step": step + 1, "torch_rng": torch.get_rng_state()},
                       tmp / "state.pt")
            (tmp / "state.pt").replace(ckpt / "state.pt")
            tmp.rmdir()
    log.close()
    trackers.close()

    # Save the EMA weights as a diffusers pipeline folder, atomically.
    nets.load_state_dict(ema.state_dict())
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.eval().requires_grad_(False)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    command = "python -m toy.pretrain " + " ".join(sys.argv[1:] if argv is None else argv)
    (tmp / "PRETRAIN.json").write_text(json.dumps({"config": vars(cfg), "command": command}, indent=2))
    shutil.copy(metrics, tmp / "pretrain_metrics.jsonl")  # loss and seconds of every flow step
    recipe = json.loads(RECIPE.read_text())  # the toy world's recipe travels with its base, naming its prompt sets
    recipe["datasets"]["value"] = {name: f"{module.DATA}/{name}" for name in recipe["datasets"]["value"]}
    write_atomic(tmp / RECIPE.name, json.dumps(recipe, indent=1) + "\n")
    publish_dir(tmp, out)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
