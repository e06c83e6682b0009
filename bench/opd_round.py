"""Where every second of OPD goes: phase timers, network evaluations (NFEs), FLOPs, MFU, levers.

The cost of OPD (paper sections 4-7, Algorithm 1) is almost all network evaluations: per task batch
of B prompts (per rank), N sampling steps, K trained steps and CFG w:
    rollout   N forwards of 2B rows (B rows when w = 1)                       no grad, student
    teacher   K*B rows in ceil(K*B / teacher_chunk) forwards, x2 if the teacher uses CFG
    train     K*B rows (x2 CFG) in ceil(K*B / train_chunk) forward+backward passes
A round is one batch per task and one optimizer step. Everything outside the transformer is
overhead; the overhead ratio = round wall time / seconds inside transformer forwards and backwards.
The round itself is opd.py's (round_batches, batch_gradient, StudentTrainer.update), imported.

Measured per variant (mean over the timed rounds, per rank):
    sec/{rollout,teacher,train,optimizer,other,total}   train = student forward + backward
    nfe/{rollout,teacher,train}/{calls,rows}            every transformer forward is counted (module hooks)
    encode/{calls,prompts}                              text-encoder calls (once per prompt?)
    net_sec, overhead_ratio, images_per_sec, tflop, tflops, peak_mem_mb (CPU: the process's maxrss),
    setup_sec (build + warm-up of the variant's model: the one-time cost, compilation included)
    mfu/{rollout,teacher,train,round} = model FLOPs / phase seconds / the dense matmul rate measured
    in the same run (CUDA: bfloat16, CPU: float32); CUDA with --max_batch: the largest batch that fits.
Levers are `key=value[,key=value]` overrides of this config (or teacher_per_step / train_per_step,
one forward per timestep as the reference code does). Every variant runs in the same process,
interleaved round by round with the baseline, so a drifting machine load hits them alike; levers
that change the model (dtype, compile) get their own copy, built and warmed up before the timing.
Also measured: one batched CFG forward vs two forwards (cfg_pair), scoring overlapped with the
next rollout via ComposedReward.submit (overlap), one evaluation (eval), optional GRPO steps.

Departures / conventions
1. FLOPs are counted from the model config (`mmdit_flops`, exact against FlopCounterMode): model
   FLOPs, so gradient checkpointing's recomputation is not counted (MFU, not HFU). The backward is
   that of a LoRA student on a frozen base (input gradients + LoRA weight gradients).
2. Network time includes each `.backward()` call whole (the loss's own backward is negligible).
   On CUDA it is GPU time between events, so the measurement adds no synchronisation.
3. --sd35m-random builds the SD3.5-Medium transformer from its published config with random
   weights (no download) beside tiny stand-in text encoders and VAE with the real output shapes
   (77 CLIP + text_len T5 tokens of width 4096, pooled 2048, 16 latent channels, VAE factor 8), and
   random teacher LoRAs (PEFT's init, B = 0: same cost as trained ones) for the three paper tasks.

Run:
    python -m bench.opd_round --levers teacher_per_step train_per_step dtype=bfloat16 --grpo_steps 2   # CPU, toy, ckpts/*
    python -m bench.opd_round --sd35m-random --layers 2 --height 64 --width 64 --text_len 8 \\
        --prompts_per_batch 1 --num_steps 2 --rounds 1                                      # CPU smoke test
    # 1 GPU, SD3.5-M at 512 px, the paper's per-GPU recipe (3 prompts, 10 steps, 9 trained, LoRA r 32);
    # `make bench-gpu` runs the GPU measurements of docs/bench.md (bench/gpu_check.sh)
    R="--sd35m-random --device cuda --dtype bfloat16 --height 512 --width 512 --prompts_per_batch 3
       --train_chunk 3 --train_steps 0 1 2 3 4 5 6 7 8"
    python -m bench.opd_round $R --rounds 1 --levers teacher_per_step train_chunk=0,grad_checkpointing=true
    python -m bench.opd_round $R --rounds 1 --warmup 0 --train_chunk 0 --grad_checkpointing true --max_batch
    python -m bench.opd_round $R --rounds 2 --levers compile=true              # compilation takes minutes (setup_sec)
    torchrun --nproc_per_node=8 -m bench.opd_round ...      # per-rank numbers; the world size divides the batch
"""
from __future__ import annotations

import dataclasses
import gc
import json
import resource
import sys
import tempfile
import time
import types
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

import opd
import opd_inputs
from data import load_prompts, load_task
from evaluate import EVAL_GUIDANCE, evaluate_task
from model import LORA_TARGETS, STUDENT, FlowModel
from sample import rollout, trained_steps
from student import Phases, StudentTrainer
from teachers import by_task, load_teachers, resolve_teachers
from toy.pipeline import TinySD3Config, build_tiny_pipeline
from plumbing.config import apply_recipe, given_keys, option, parse_config
from plumbing import memory
from plumbing.dist import Dist
from plumbing.footprint import Footprint, footprint_of_pipeline
from plumbing.model_files import weights_dtype

# SD3.5-Medium's transformer (stabilityai/stable-diffusion-3.5-medium, transformer/config.json)
SD35M = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
             attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
             caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
             dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
PAPER_TEACHER_CFG = {"geneval": 1.0, "ocr": 4.5, "aesthetic": 4.5}  # paper section 7
PHASES = ("rollout", "teacher", "train", "optimizer", "other")
# settings that need their own copy of the model; the other levers switch on a shared one
MODEL_KEYS = ("dtype", "compile", "sd35m_random", "layers", "text_len", "lora_rank", "lora_alpha", "model",
              "teacher_dtype")


@dataclass
class BenchConfig(opd.OPDConfig):
    """Benchmark DiffusionOPD rounds: seconds per phase, NFEs, images/s, memory, overhead, MFU, levers."""
    out: str = option("bench.json", "the JSON report (the OPD run directory is a temporary folder)")
    rounds: int = option(3, "timed rounds per variant")
    warmup: int = option(1, "untimed rounds per variant first")
    levers: list[str] = option(factory=list, help='"key=value[,key=value]", teacher_per_step, train_per_step')
    eval_prompts: int = option(8, "one evaluation per task, timed (0: skip)")
    eval_steps: int = 10
    overlap_batches: int = option(4, "batches of the scoring-overlap measurement (0: skip)")
    cfg_pair_reps: int = option(5, "repetitions of the one-vs-two-forwards CFG measurement (0: skip)")
    grpo_steps: int = option(0, "also time this many teacher_rl.py (Flow-GRPO) steps")
    grpo_batch: int = 16
    grpo_group_size: int = 4
    max_batch: bool = option(False, "CUDA: double prompts_per_batch until out of memory")
    max_batch_limit: int = option(96, "prompts per rank at most")
    sd35m_random: bool = option(False, "SD3.5-Medium transformer, random weights, no download")
    layers: int = option(24, "transformer layers of --sd35m-random")
    text_len: int = option(128, "T5 tokens of --sd35m-random (paper recipe: 128)")


# ---------------------------------------------------------------------- FLOPs of the SD3 MMDiT
def mmdit_flops(c: dict, n_img: int, n_txt: int, lora_rank: int = 0) -> tuple[int, int]:
    """(forward, backward) FLOPs of SD3Transformer2DModel for ONE sample; backward of a LoRA student.

    A matmul (m x k) @ (k x q) costs 2 m k q. D = heads * head_dim, n = n_img + n_txt tokens, r = LoRA
    rank on the 8 attention projections (LORA_TARGETS), p = patch, L layers, last layer context_pre_only:
      embed    2 n_img C p^2 D + 2 n_txt J D + 2 (256 + P) D + 2 * 2 D^2      (patch, caption, t, pooled)
      block    adaLN 2 D (6|9) D + 2 D (6|2) D;  q,k,v,out: 4 x 2 n_img D^2;  add_q,k,v(,out): 3(4) x 2 n_txt D^2
               joint attention 4 n^2 D;  FF 16 n_img D^2 (+ 16 n_txt D^2);  LoRA 4 m D r per projection
               dual-attention layers add 4 x 2 n_img D^2 + 4 n_img^2 D (image self-attention)
      final    2 D 2D + 2 n_img D p^2 C_out
    Backward with the base frozen and the inputs constant: input gradients (= forward FLOPs) of every
    matmul downstream of the first LoRA, attention x2 (dQ, dK, dV, dP), none for adaLN (temb is
    constant); per LoRA projection 4 m D r (dA, dB, input grads), 3 m D r in layer 0's q,k,v (no
    input grad) where the image self-attention of a dual layer has no gradient at all.
    """
    D = c["num_attention_heads"] * c["attention_head_dim"]
    L, p, r = c["num_layers"], c["patch_size"], lora_rank
    dual = set(c.get("dual_attention_layers") or ())
    n = n_img + n_txt

    def mm(m, k, q):
        return 2 * m * k * q

    fwd = mm(n_img, c["in_channels"] * p * p, D) + mm(n_txt, c["joint_attention_dim"], D)
    fwd += mm(1, 256, D) + mm(1, c["pooled_projection_dim"], D) + 2 * mm(1, D, D)
    fwd += mm(1, D, 2 * D) + mm(n_img, D, p * p * c["out_channels"])
    bwd = mm(n_img, D, p * p * c["out_channels"])
    for i in range(L):
        first, last = i == 0, i == L - 1
        qkv = [n_img] * 3 + [n_txt] * 3          # rows of to_q, to_k, to_v, add_q, add_k, add_v
        outs = [n_img] + ([] if last else [n_txt])  # to_out.0, to_add_out
        ff = [n_img] + ([] if last else [n_txt])
        fwd += mm(1, D, (9 if i in dual else 6) * D) + mm(1, D, (2 if last else 6) * D)
        fwd += sum(mm(m, D, D) + 2 * mm(m, D, r) for m in qkv + outs) + 2 * mm(n, D, n)
        fwd += sum(2 * mm(m, D, 4 * D) for m in ff)
        bwd += sum(3 * mm(m, D, r) if first else mm(m, D, D) + 4 * mm(m, D, r) for m in qkv)
        bwd += sum(mm(m, D, D) + 4 * mm(m, D, r) for m in outs) + 4 * mm(n, D, n)
        bwd += sum(2 * mm(m, D, 4 * D) for m in ff)
        if i in dual:
            fwd += 4 * mm(n_img, D, D) + 2 * mm(n_img, D, n_img)
            bwd += 0 if first else 4 * mm(n_img, D, D) + 4 * mm(n_img, D, n_img)
    return fwd, bwd


def clock(device: torch.device) -> float:
    """time.perf_counter() once the device's queued work is done: exact phase timers on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """The dense matmul rate of this device in `dtype`, measured now: the MFU denominator."""
    n, reps = (8192, 20) if device.type == "cuda" else (1024, 10)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    t0 = clock(device)
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (clock(device) - t0) / 1e12


# ---------------------------------------------------------------------- counting network calls
class NetMeter:
    """Counts, times and FLOP-counts every transformer forward and backward pass, through hooks (public
    torch API: module forward hooks, a tensor hook and a multi-grad hook; nothing of the model is patched).

    A forward is labelled "train" (grad enabled), "student" (the student adapter active), "teacher"
    (another adapter) or "base" (adapters off, or a separate teacher model), from the LoRA layers' own
    state. A backward through a watched transformer runs from its output's gradient (tensor hook) to
    the last gradient of its trainable weights (multi-grad hook). `watch_model` also counts the model's
    encode_prompts calls and prompts (a wrapper on the instance, while the meter is entered).
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.records, self.encodes = [], []
        self._lora = weakref.WeakKeyDictionary()  # transformer -> one of its LoRA layers (or None)
        self._handles, self._open, self._watched, self._grad_hooked = [], {}, set(), set()

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _kind_and_rank(self, tr):
        from peft.tuners.lora import LoraLayer
        if tr not in self._lora:
            self._lora[tr] = next((m for m in tr.modules() if isinstance(m, LoraLayer)), None)
        layer = self._lora[tr]
        if layer is None or layer.disable_adapters:
            return ("train" if torch.is_grad_enabled() else "base"), 0
        kind = "train" if torch.is_grad_enabled() else "student" if layer.active_adapters == [STUDENT] else "teacher"
        for name in layer.active_adapters:
            if set(tr.peft_config[name].target_modules) != set(LORA_TARGETS):
                raise ValueError(f"mmdit_flops counts LoRA on {LORA_TARGETS}; adapter {name} targets "
                                 f"{tr.peft_config[name].target_modules}")
        return kind, sum(layer.r[name] for name in layer.active_adapters)

    # ---- hooks
    def watch(self, tr) -> None:
        """Measure every forward and backward of transformer module `tr`."""
        if id(tr) in self._watched:
            return
        self._watched.add(id(tr))
        self._handles += [tr.register_forward_pre_hook(self._before, with_kwargs=True),
                          tr.register_forward_hook(self._after, with_kwargs=True)]

    def watch_model(self, model: FlowModel) -> None:
        for tr in model.transformers():
            self.watch(tr)
        encode = model.encode_prompts

        def counted_encode(prompts):
            self.encodes.append(len(prompts))
            return encode(prompts)
        model.encode_prompts = counted_encode  # an instance attribute: removed on exit
        self._handles.append(types.SimpleNamespace(remove=lambda: vars(model).pop("encode_prompts", None)))

    def watch_next_transformer(self) -> None:
        """Watch the next SD3 transformer that runs (one built inside a script, e.g. teacher_rl.main):
        a global forward pre-hook that removes itself once it has found it (that first call is not counted)."""
        from diffusers import SD3Transformer2DModel
        holder = {}

        def find(module, args):
            if isinstance(module, SD3Transformer2DModel):
                self.watch(module)
                holder["handle"].remove()
        holder["handle"] = torch.nn.modules.module.register_module_forward_pre_hook(find)
        self._handles.append(holder["handle"])

    def _before(self, tr, args, kwargs):
        x, seq = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
        kind, rank = self._kind_and_rank(tr)
        p = tr.config.patch_size
        f, b = mmdit_flops(tr.config, x.shape[-2] * x.shape[-1] // p**2, seq.shape[1], rank)
        self._open[id(tr)] = (kind, x.shape[0], x.shape[0] * f, x.shape[0] * b, self._mark())

    def _after(self, tr, args, kwargs, output):
        if id(tr) not in self._open:  # a call that began before the transformer was watched
            return
        self.records.append((*self._open.pop(id(tr)), self._mark()))
        out = output[0] if isinstance(output, tuple) else output
        if out.requires_grad:  # a backward will start at this output's gradient and end at the weights'
            if id(tr) not in self._grad_hooked:
                self._grad_hooked.add(id(tr))
                weights = [p for p in tr.parameters() if p.requires_grad]
                self._handles.append(torch.autograd.graph.register_multi_grad_hook(weights, self._backward_end))
            out.register_hook(self._backward_start)

    def _backward_start(self, grad):
        self._open["backward"] = self._mark()

    def _backward_end(self, grads):
        if "backward" in self._open:
            self.records.append(("backward", 0, 0, 0, self._open.pop("backward"), self._mark()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles, self._watched, self._grad_hooked = [], set(), set()

    def take(self) -> dict:
        """Totals since the last take, by kind: calls, rows, forward/backward FLOPs, seconds."""
        if self.cuda:
            torch.cuda.synchronize()
        out = {"encode": {"calls": len(self.encodes), "prompts": sum(self.encodes)}}
        for kind, rows, f, b, start, end in self.records:
            sec = start.elapsed_time(end) / 1e3 if self.cuda else end - start
            tot = out.setdefault(kind, {"calls": 0, "rows": 0, "fwd_flop": 0, "bwd_flop": 0, "sec": 0.0})
            for key, value in (("calls", 1), ("rows", rows), ("fwd_flop", f), ("bwd_flop", b), ("sec", sec)):
                tot[key] += value
        self.records, self.encodes = [], []
        return out


# ---------------------------------------------------------------------- the model under test
def sd35m_random_pipeline(layers: int, text_len: int, device):
    """SD3.5-Medium's transformer (random weights) with stand-in text encoders and VAE (see 3.)."""
    from diffusers import SD3Transformer2DModel
    stand_in = TinySD3Config(image_size=64, vae_channels=(8, 8, 8, 8), latent_channels=SD35M["in_channels"],
                             layers=1, heads=1, head_dim=8, text_dim=SD35M["joint_attention_dim"],
                             clip_dim=SD35M["pooled_projection_dim"] // 4, t5_max_len=text_len)
    with torch.device(device):  # random init where the weights will live (fast on a GPU)
        pipe = build_tiny_pipeline(stand_in)
        pipe.register_modules(transformer=SD3Transformer2DModel(**{**SD35M, "num_layers": layers}))
    return pipe


@dataclass
class Setup:
    model: FlowModel
    teachers: list
    trainer: StudentTrainer
    prompts_by_task: dict
    rewards: dict
    tmp: tempfile.TemporaryDirectory
    own_bytes: int = 0  # CUDA memory this setup holds between rounds (weights, optimizer state)
    setup_sec: float = 0.0  # build + warm-up rounds (compilation happens here)
    footprint: Footprint | None = None  # the planner's view of this model (plumbing/footprint.py)


def build(cfg: BenchConfig, dist: Dist) -> Setup:
    """Base model, student LoRA (StudentTrainer), teachers and prompts, as opd.main builds them."""
    if cfg.full_finetune:
        raise ValueError("bench/opd_round.py measures the LoRA recipe (mmdit_flops counts a LoRA backward)")
    tmp = tempfile.TemporaryDirectory(prefix="bench-")
    if cfg.sd35m_random:
        model = FlowModel(sd35m_random_pipeline(cfg.layers, cfg.text_len, dist.device), dist.device,
                          weights_dtype(cfg.dtype, dist), cfg.text_len, name="sd35m-random")
        # one random LoRA, saved and loaded once per task exactly as opd.py loads trained teachers
        model.add_student_lora(cfg.lora_rank, cfg.lora_alpha, seed=cfg.seed + 1)
        model.save_student(f"{tmp.name}/teacher", {"base_model": "sd35m-random"})
        model.transformer.delete_adapters(STUDENT)
        tasks = [load_task(name, f"data/toy/{name}", guidance=w) for name, w in PAPER_TEACHER_CFG.items()]
        specs = [{"path": f"{tmp.name}/teacher", "kind": "lora", "task": task} for task in tasks]
        prompts_by_task = {task.name: load_prompts(task.dataset, "train")[0] for task in tasks}
        rewards = {}
    else:
        checked = dataclasses.replace(cfg, out=f"{tmp.name}/run")  # opd.py's checks; its run dir is never written
        inputs = opd_inputs.check_inputs(checked, dist)
        specs, prompts_by_task, rewards = inputs.specs, inputs.prompts_by_task, inputs.rewards
        model = FlowModel.load(checked.model, device=dist.device, dtype=weights_dtype(cfg.dtype, dist))
    trainer = StudentTrainer(model, cfg, dist, None)
    teachers = load_teachers(model, specs, dist, model.dtype if cfg.teacher_dtype == "model" else torch.float32)
    if cfg.compile:
        model.compile_blocks()
    h, w = cfg.height or model.default_resolution(), cfg.width or model.default_resolution()
    fp = footprint_of_pipeline(model.pipe, h, w, model.dtype, cfg.lora_rank, model.negative(1).seq.shape[1],
                               LORA_TARGETS)
    return Setup(model, teachers, trainer, prompts_by_task, rewards, tmp, footprint=fp)


# ---------------------------------------------------------------------- one round, measured
def configure(model: FlowModel, cfg: BenchConfig) -> None:
    """The levers that switch on a shared model between rounds: gradient checkpointing."""
    model.transformer.disable_gradient_checkpointing()
    if cfg.grad_checkpointing:
        model.transformer.enable_gradient_checkpointing()


def opd_round(s: Setup, cfg: BenchConfig, dist: Dist, step: int, meter: NetMeter) -> dict:
    """One OPD round exactly as opd.main runs it (Algorithm 1), with seconds, NFEs and FLOPs."""
    configure(s.model, cfg)
    if meter.cuda:  # peak of this variant alone: its own memory + this round's transient peak
        held = torch.cuda.memory_allocated(dist.device)
        torch.cuda.reset_peak_memory_stats(dist.device)
    train_steps = trained_steps(cfg)
    meter.take()
    phases = Phases(dist.device)
    start = clock(dist.device)
    images, losses = 0, []
    routes = by_task(s.teachers)
    for b in opd.round_batches(cfg, routes, step, dist, s.prompts_by_task):
        loss = opd.batch_gradient(cfg, s.model, b.teachers, b.prompts, b.seeds, train_steps, 1.0 / len(routes), phases)
        dist.all_gather(loss.to(dist.device)).mean().item()  # opd.main logs it
        losses.append(loss)
        images += len(b.prompts)
    with phases("optimizer"):
        s.trainer.update(step, torch.cat(losses))
    sec = {**dict.fromkeys(PHASES, 0.0), **phases.sec, "total": clock(dist.device) - start}
    sec["other"] = sec["total"] - sum(sec[k] for k in PHASES if k != "other")
    net = meter.take()
    out = {"sec": sec, "images": images, "net": net}
    out["peak_mem_mb"] = (torch.cuda.max_memory_allocated(dist.device) - held + s.own_bytes if meter.cuda else
                          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    # the planner's round phases (allocated bytes: no margin, no CUDA context), as max_memory_allocated counts
    job = memory.Job("opd", cfg.prompts_per_batch // dist.world, len(train_steps), cfg.num_steps, 2, 0, 0)
    setting = {"train_chunk": cfg.train_chunk, "teacher_chunk": cfg.teacher_chunk,
               "grad_checkpointing": cfg.grad_checkpointing, "eval_batch": 1}
    teachers = len(s.teachers) * s.footprint.lora * (0.5 if cfg.teacher_dtype == "model" else 1)
    peaks = memory.phases(s.footprint, job, setting, int(teachers))
    out["predicted_peak_mem_mb"] = max(peaks[k] for k in ("rollout", "teacher", "train")) / 2**20
    return out


def summarise(rounds: list[dict], peak_tflops: float) -> dict:
    """Means over the timed rounds; NFEs and FLOPs per round by phase; MFU."""
    n = len(rounds)
    sec = {k: sum(r["sec"][k] for r in rounds) / n for k in rounds[0]["sec"]}
    net = rounds[0]["net"]  # NFEs are identical every round
    kinds = {"rollout": ("student",), "teacher": ("teacher", "base"), "train": ("train",)}
    nfe = {ph: {k: sum(net.get(kind, {}).get(k, 0) for kind in ks) for k in ("calls", "rows")} for ph, ks in kinds.items()}
    flop = {ph: sum(net.get(kind, {}).get("fwd_flop", 0) for kind in ks) for ph, ks in kinds.items()}
    flop["train"] += net.get("train", {}).get("bwd_flop", 0)
    net_sec = sum(sum(r["net"][k]["sec"] for k in r["net"] if k != "encode") for r in rounds) / n
    out = {"sec": sec, "nfe": nfe, "encode": net["encode"], "net_sec": net_sec,
           "overhead_ratio": sec["total"] / net_sec, "images_per_round": rounds[0]["images"],
           "images_per_sec": rounds[0]["images"] / sec["total"],
           "tflop": {**{k: v / 1e12 for k, v in flop.items()}, "round": sum(flop.values()) / 1e12},
           "peak_mem_mb": max(r["peak_mem_mb"] for r in rounds),
           "predicted_peak_mem_mb": rounds[0]["predicted_peak_mem_mb"]}
    out["tflops"] = out["tflop"]["round"] / sec["total"]
    out["mfu"] = {k: out["tflop"][k] / sec[k if k != "round" else "total"] / peak_tflops for k in out["tflop"]}
    return out


# ---------------------------------------------------------------------- variants and levers
def variants(cfg: BenchConfig, argv: list[str], dist: Dist) -> dict[str, BenchConfig]:
    """The baseline and one config per lever: the command line plus the lever's overrides."""
    per_step = cfg.prompts_per_batch // dist.world  # rows of one timestep (before the CFG pair)
    alias = {"teacher_per_step": f"teacher_chunk={per_step}", "train_per_step": f"train_chunk={per_step}",
             "reference": f"teacher_chunk={per_step},train_chunk={per_step}"}  # the release's per-timestep loop
    out = {"baseline": cfg}
    for lever in cfg.levers:
        extra = [f"--{kv}" for kv in alias.get(lever, lever).split(",")]
        if not all("=" in e for e in extra):
            raise ValueError(f"lever {lever!r} is not key=value[,key=value] or {sorted(alias)}")
        out[lever] = parse_config(BenchConfig, argv + extra)
    for name, c in out.items():  # the recipe opd.py would use (toy on the toy base), before any timing
        if c.sd35m_random:
            c.recipe = "paper"
        else:
            c.model = c.model or resolve_teachers(c)[0]
            apply_recipe(c, given_keys(BenchConfig, argv + ([] if name == "baseline" else
                                                         [f"--{kv}" for kv in alias.get(name, name).split(",")])),
                         c.model, "opd")
    return out


def setups_for(cfgs: dict, dist: Dist, meter: NetMeter) -> dict[str, Setup]:
    """One setup per distinct model (MODEL_KEYS), each built and warmed up alone: {name: setup}."""
    by_key, of = {}, {}
    for name, c in cfgs.items():
        key = tuple(getattr(c, k) for k in MODEL_KEYS)
        if key not in by_key:
            before = torch.cuda.memory_allocated(dist.device) if meter.cuda else 0
            t0 = clock(dist.device)
            by_key[key] = build(c, dist)
            for model in (by_key[key].model, *(t.model for t in by_key[key].teachers if t.model is not None)):
                meter.watch_model(model)
            for n in (n for n, other in cfgs.items() if tuple(getattr(other, k) for k in MODEL_KEYS) == key):
                for _ in range(cfgs[n].warmup):
                    opd_round(by_key[key], cfgs[n], dist, 0, meter)
            by_key[key].own_bytes = torch.cuda.memory_allocated(dist.device) - before if meter.cuda else 0
            by_key[key].setup_sec = clock(dist.device) - t0
        of[name] = by_key[key]
    return of


def time_variants(cfgs: dict, setups: dict, dist: Dist, meter: NetMeter, peak_tflops: float) -> dict:
    """All variants interleaved round by round (a drifting machine load hits them alike)."""
    rounds = {name: [] for name in cfgs}
    for r in range(cfgs["baseline"].rounds):
        for name, c in cfgs.items():
            rounds[name].append(opd_round(setups[name], c, dist, 1 + r, meter))
    return {name: {**summarise(rounds[name], peak_tflops), "setup_sec": setups[name].setup_sec} for name in cfgs}


def max_batch(s: Setup, cfg: BenchConfig, dist: Dist, meter: NetMeter, peak_tflops: float) -> dict:
    """Double the prompts per rank until CUDA runs out of memory; the largest that fit, measured.
    The setup is alone on the GPU."""
    best, per_rank = {}, cfg.prompts_per_batch // dist.world
    while per_rank <= cfg.max_batch_limit:
        big = dataclasses.replace(cfg, prompts_per_batch=per_rank * dist.world)
        try:
            opd_round(s, big, dist, 0, meter)  # warm-up at this size
            s.own_bytes = torch.cuda.memory_allocated(dist.device)
            best = {"prompts_per_rank": per_rank, **summarise([opd_round(s, big, dist, 1, meter)], peak_tflops)}
            if dist.is_main:  # a line per size that fits, so a run stopped early still tells
                print(f"max_batch: {per_rank} prompts/rank fit: {best['images_per_sec']:.2f} img/s, "
                      f"MFU train {best['mfu']['train']:.1%}, peak {best['peak_mem_mb']:.0f} MB", flush=True)
        except torch.OutOfMemoryError:
            s.trainer.opt.zero_grad(set_to_none=True)
            meter.take()
            break
        finally:
            torch.cuda.empty_cache()
        per_rank *= 2
    return best


# ---------------------------------------------------------------------- the other measurements
@torch.no_grad()
def cfg_pair(s: Setup, cfg: BenchConfig, dist: Dist) -> dict:
    """Seconds of one CFG velocity: uncond+cond in ONE forward of 2B rows (FlowModel.velocity) vs
    two forwards of B rows; rollout-shaped inputs, interleaved repetitions."""
    m, B = s.model, cfg.prompts_per_batch // dist.world
    shape = m.latent_shape(cfg.height or m.default_resolution(), cfg.width or m.default_resolution())
    x, t = torch.randn(B, *shape, device=dist.device), torch.full((B,), 0.5, device=dist.device)
    embeds = m.encode_prompts(next(iter(s.prompts_by_task.values()))[:B])
    neg = m.negative(B)
    ways = {"one_forward": lambda: m.velocity(x, t, embeds, cfg.guidance),
            "two_forwards": lambda: [m.velocity(x, t, neg, 1.0), m.velocity(x, t, embeds, 1.0)]}
    sec = dict.fromkeys(ways, 0.0)
    with m.adapter(STUDENT):
        for way in ways.values():  # warm-up
            way()
        for _ in range(cfg.cfg_pair_reps):
            for name, way in ways.items():
                t0 = clock(dist.device)
                way()
                sec[name] += (clock(dist.device) - t0) / cfg.cfg_pair_reps
    return {**sec, "speedup": sec["two_forwards"] / sec["one_forward"]}


def overlap(s: Setup, cfg: BenchConfig, dist: Dist) -> dict:
    """Rollout+decode+score of `overlap_batches` batches: scoring after each rollout (serial) vs
    ComposedReward.submit, scoring batch i while batch i+1 is sampled (what teacher_rl/eval could do)."""
    task = s.teachers[0].task
    prompts, metas = load_prompts(task.dataset, "train")
    B, reward = cfg.prompts_per_batch // dist.world, s.rewards[task.name]
    sec = {}
    for how in ("serial", "overlapped", "serial", "overlapped"):  # twice, interleaved; keep the second
        t0 = clock(dist.device)
        futures = []
        for i in range(cfg.overlap_batches):
            idx = [(i * B + j) % len(prompts) for j in range(B)]
            images = rollout(s.model, s.model.encode_prompts([prompts[k] for k in idx]), idx, cfg.num_steps,
                             cfg.guidance, 0.0, cfg.height or None, cfg.width or None, adapter=STUDENT).images
            args = (images, [prompts[k] for k in idx], [metas[k] for k in idx])
            if how == "serial":
                reward(*args)
            else:
                futures.append(reward.submit(*args))
        for f in futures:
            f.result()
        sec[how] = clock(dist.device) - t0
    return {**sec, "speedup": sec["serial"] / sec["overlapped"]}


def evaluation(s: Setup, cfg: BenchConfig, dist: Dist, meter: NetMeter) -> dict:
    """One evaluation of the student on every task, as opd.main runs it every eval_every rounds."""
    meter.take()
    t0 = clock(dist.device)
    for teacher in s.teachers:
        evaluate_task(s.model, teacher.task, s.rewards[teacher.task.name], dist, STUDENT, cfg.eval_prompts,
                      cfg.eval_steps, EVAL_GUIDANCE)
    sec = clock(dist.device) - t0
    net = meter.take()
    images = sum(min(cfg.eval_prompts, len(load_prompts(t.task.dataset, "test")[0])) // dist.world for t in s.teachers)
    return {"sec": sec, "sec_per_round": sec / cfg.eval_every, "nfe_rows": net.get("student", {}).get("rows", 0),
            "images_per_sec": images / sec}


def grpo(cfg: BenchConfig, dist: Dist, meter: NetMeter) -> dict:
    """teacher_rl.main for warmup + grpo_steps + 1 steps (the last evaluates and is not timed);
    a step's wall time is the time between its metrics line and the previous one."""
    from plumbing import rundir
    import teacher_rl
    stamps, log = [], rundir.RunDir.log

    def stamped(run, metrics, images=None):
        stamps.append((clock(dist.device), metrics, meter.take()))
        log(run, metrics, images)

    if cfg.warmup < 1:
        raise ValueError("GRPO steps are timed between metrics lines: --warmup must be >= 1")
    if cfg.sd35m_random:
        raise ValueError("GRPO steps run teacher_rl.py on a model folder, not --sd35m-random")
    total = cfg.warmup + cfg.grpo_steps + 1
    with tempfile.TemporaryDirectory(prefix="bench-grpo-") as tmp:
        base, specs = resolve_teachers(cfg)
        task = specs[0]["task"]
        argv = [f"--{k}={v}" for k, v in dict(
            model=cfg.model or base, task=task.name, dataset=task.dataset, reward=task.reward, steps=total,
            batch=cfg.grpo_batch, group_size=cfg.grpo_group_size, num_steps=cfg.num_steps, height=cfg.height,
            width=cfg.width, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, device=cfg.device,
            eval_every=10**6, eval_prompts=dist.world, eval_steps=2, save_every=10**6, out=f"{tmp}/run").items()]
        rundir.RunDir.log = stamped
        try:
            meter.watch_next_transformer()  # the one teacher_rl.main loads
            teacher_rl.main(argv)
        finally:
            rundir.RunDir.log = log
    timed = range(cfg.warmup, cfg.warmup + cfg.grpo_steps)
    walls = [stamps[i][0] - stamps[i - 1][0] for i in timed]
    phases = {k.removeprefix("sec/"): sum(stamps[i][1][k] for i in timed) / len(timed)
              for k in stamps[timed.start][1] if k.startswith("sec/")}
    net = [stamps[i][2] for i in timed]
    net_sec = sum(sum(v["sec"] for k, v in n.items() if k != "encode") for n in net) / len(timed)
    wall = sum(walls) / len(walls)
    return {"argv": argv, "sec": {**phases, "other": wall - sum(phases.values()), "total": wall},
            "nfe": {k: {"calls": v["calls"], "rows": v["rows"]} for k, v in net[0].items() if k != "encode"},
            "net_sec": net_sec, "overhead_ratio": wall / net_sec, "images_per_sec": cfg.grpo_batch / dist.world / wall}


# ---------------------------------------------------------------------- report
def table(results: dict) -> str:
    head = ("| variant | " + " | ".join(PHASES) + " | total s | img/s | NFE calls (rows) r/t/tr | overhead | peak MB |"
            " planned MB | MFU train | MFU round |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results.items():
        nfe = " / ".join(f"{r['nfe'][k]['calls']} ({r['nfe'][k]['rows']})" for k in ("rollout", "teacher", "train"))
        rows.append(f"| {name} | " + " | ".join(f"{r['sec'][k]:.3f}" for k in PHASES) +
                    f" | {r['sec']['total']:.3f} | {r['images_per_sec']:.2f} | {nfe} | {r['overhead_ratio']:.3f} |"
                    f" {r['peak_mem_mb']:.0f} | {r['predicted_peak_mem_mb']:.0f} | {r['mfu']['train']:.1%} |"
                    f" {r['mfu']['round']:.1%} |")
    return "\n".join(rows)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_config(BenchConfig, argv)
    dist = Dist(cfg.device)
    cfgs = variants(cfg, argv, dist)
    cuda = dist.device.type == "cuda"
    peak_dtype = torch.bfloat16 if cuda else torch.float32
    peak = matmul_tflops(dist.device, peak_dtype)
    report = {"config": dataclasses.asdict(cfg), "device": torch.cuda.get_device_name(dist.device) if cuda else "cpu",
              "world": dist.world, "torch": torch.__version__, "peak_matmul_tflops": peak,
              "peak_matmul_dtype": str(peak_dtype).removeprefix("torch.")}
    base_cfg = dataclasses.asdict(cfg)

    def save(results):
        """The report so far, written at once: a run cut short keeps every measurement already taken."""
        base = results["baseline"]["sec"]["total"]
        for r in results.values():
            r["speedup_vs_baseline"] = base / r["sec"]["total"]
        report["variants"] = {name: {"overrides": {k: v for k, v in dataclasses.asdict(cfgs[name]).items()
                                                   if k != "levers" and v != base_cfg[k]}, **r}
                              for name, r in results.items()}
        if dist.is_main:
            Path(cfg.out).write_text(json.dumps(report, indent=2))

    with NetMeter(dist.device) as meter:
        setups = setups_for(cfgs, dist, meter)
        results = time_variants(cfgs, setups, dist, meter, peak)
        save(results)
        if dist.is_main:
            print(table(results), flush=True)
        s = setups["baseline"]
        if cfg.cfg_pair_reps:
            report["cfg_pair"] = cfg_pair(s, cfg, dist)
        if s.rewards and cfg.eval_prompts:
            report["eval"] = evaluation(s, cfg, dist, meter)
        if s.rewards and cfg.overlap_batches:
            report["overlap"] = overlap(s, cfg, dist)
        save(results)
        del s, setups
        if cfg.max_batch and cuda:  # each model alone on the GPU
            for name, c in cfgs.items():
                gc.collect()
                torch.cuda.empty_cache()
                alone = build(c, dist)
                meter.watch_model(alone.model)
                results[name]["max_batch"] = max_batch(alone, c, dist, meter, peak)
                save(results)
        if cfg.grpo_steps:
            report["grpo"] = grpo(cfg, dist, meter)
            save(results)
    if dist.is_main:
        for key in ("cfg_pair", "overlap", "eval", "grpo"):
            if key in report:
                print(f"{key}: " + json.dumps({k: v for k, v in report[key].items() if k != "argv"}))
        print(f"wrote {cfg.out}")
    dist.close()
    return report


if __name__ == "__main__":
    main()
