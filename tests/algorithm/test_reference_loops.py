"""The training loops against independent computations, not against themselves: each quantity a loop
computes around its loss, re-derived here from the paper and the references' code (float64 where it is a
number), so that a mistake common to 1 rank and N ranks, or to a run and its resume, still fails.

- the EMA of every script, step by step over 40 optimizer steps, against a float64 transcription of each
  reference's schedule and call pattern (Flow-GRPO's EMAModuleWrapper and the loops that call it);
- the weight of every row of an OPD round in the gradient: 1 / (M K B d) (the release's scale);
- Algorithm 1's routing through opd_round itself: batch m gets task m's teachers and prompts, weight 1 / M;
- several teachers of one task: the batch's loss is the sum of its losses against each (the release);
- GRPO's KL to the base at kl_beta > 0 against torch.distributions, with the base's velocity as reference;
- NFT's training rows: x_t = (1 - t) x0 + t eps at training_points' (t, eps), each weighted by the mean
  over the update's images and points;
- opd.py --init_lora starts the student from a teacher.
"""
import math
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import nft
import opd
import teacher_rl
from helpers import f32_atol
from sample import rollout
from student import StudentTrainer, no_phase
from teachers import by_task, load_teachers, resolve_teachers
from test_nft import _nft_args
from test_opd import _args as opd_args
from test_opd import _teacher
from plumbing.dist import Dist


# ---------------------------------------------------------------------- the EMA
def _wrapper_step(ema, weights, s, interval, decay):
    """flow_grpo/ema.py (ac4c86e) EMAModuleWrapper.step(parameters, optimization_step)."""
    one_minus_decay = 1 - min((1 + s) / (10 + s), decay)
    if (s + 1) % interval == 0:
        ema += one_minus_decay * (weights - ema)


def flow_grpo_ema(w, micro_batches, interval, decay):
    """scripts/train_sd3.py (ac4c86e): ema.step(params, global_step) after every training micro-batch;
    global_step += 1 once the accumulation of `micro_batches` is synced, i.e. before its last micro-batch's
    call. The release's loop is the same with one call per task batch (paper section 7). w[k]: the weights
    after k optimizer steps."""
    ema, global_step = w[0].clone(), 0
    for _ in range(len(w) - 1):
        for i in range(micro_batches):
            if i == micro_batches - 1:
                global_step += 1
            _wrapper_step(ema, w[global_step], global_step, interval, decay)
    return ema


def nvlabs_ema(w, interval, decay):
    """scripts/train_nft_sd3.py (NVlabs 24af555): global_step += 1 at each optimizer step, then
    ema.step(params, global_step) when the accumulation completed."""
    ema = w[0].clone()
    for global_step in range(1, len(w)):
        _wrapper_step(ema, w[global_step], global_step, interval, decay)
    return ema


class _Model:
    """The part of FlowModel a StudentTrainer touches: a fresh "LoRA" of two tensors."""

    def add_student_lora(self, rank, alpha, seed=0):
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(8, 3, generator=g).requires_grad_(), torch.randn(5, generator=g).requires_grad_()]


@pytest.mark.parametrize("reference,calls,every", [("flow_grpo", 8, 8), ("release", 3, 8), ("nvlabs", 1, 1)])
def test_the_ema_follows_each_references_schedule_step_by_step(reference, calls, every):
    cfg = Namespace(full_finetune=False, init_lora="", lora_rank=4, lora_alpha=8, seed=0, lr=0.05, weight_decay=0.0,
                    ema_decay=0.9, ema_every=every, grad_clip=1e9, max_skipped_steps=5)
    trainer = StudentTrainer(_Model(), cfg, Dist("cpu"), None, ema_calls=calls)
    g = torch.Generator().manual_seed(1)
    weights = [torch.cat([p.detach().flatten() for p in trainer.params]).double()]
    for step in range(40):
        for p in trainer.params:
            p.grad = torch.randn(p.shape, generator=g)
        trainer.update(step, torch.zeros(1))
        weights.append(torch.cat([p.detach().flatten() for p in trainer.params]).double())
        ref = flow_grpo_ema(weights, calls, every, 0.9) if reference != "nvlabs" else nvlabs_ema(weights, every, 0.9)
        mine = torch.cat([s.flatten() for s in trainer.ema.shadow]).double()
        torch.testing.assert_close(mine, ref, atol=f32_atol(*weights), rtol=0, msg=f"optimizer step {step + 1}")
    assert trainer.optimizer_steps == 40


def test_the_scripts_call_the_ema_as_their_references_do(monkeypatch, tiny_pipe_dir, tmp_path):
    import stage1
    made = {}
    real = StudentTrainer.__init__

    def spy(self, model, cfg, dist, run, ema_calls=1, init_lora=None):
        made[type(cfg).__name__] = ema_calls
        real(self, model, cfg, dist, run, ema_calls, init_lora)
    monkeypatch.setattr(StudentTrainer, "__init__", spy)
    from test_teacher_rl import _args as grpo_args
    teacher_rl.main(grpo_args(tiny_pipe_dir, tmp_path / "grpo", "--steps", "1"))
    nft.main(_nft_args(tiny_pipe_dir, tmp_path / "nft", "--steps", "1"))
    teachers = [_teacher(tiny_pipe_dir, tmp_path / "g", "geneval", 1), _teacher(tiny_pipe_dir, tmp_path / "o", "ocr", 2)]
    opd.main(opd_args(teachers, tmp_path / "opd", "--steps", "1"))
    assert stage1 and made == {"TeacherConfig": 8, "NFTConfig": 1, "OPDConfig": 2}


def test_a_16_round_opd_run_with_the_papers_ema_saves_most_of_what_it_learned(tiny_pipe_dir, tmp_path):
    """--ema_decay 0.9 --ema_every 8: with the warm-up the saved (EMA) student carries most of the LoRA
    the raw weights learned (a constant 0.9 every 8 rounds kept 0.15 of it)."""
    teachers = [_teacher(tiny_pipe_dir, tmp_path / "g", "geneval", 1), _teacher(tiny_pipe_dir, tmp_path / "o", "ocr", 2)]
    opd.main(opd_args(teachers, tmp_path / "run", "--steps", "16", "--ema_decay", "0.9", "--ema_every", "8"))
    from model import FlowModel
    checkpoint = tmp_path / "run" / "checkpoint"
    ema, raw = load_file(checkpoint / "ema_weights.safetensors"), load_file(checkpoint / "raw_weights.safetensors")
    model = FlowModel.load(tiny_pipe_dir)
    model.add_student_lora(4, 8)
    names = [n for n, _ in model.transformer.named_parameters() if ".student." in n]  # the order of p{i}
    b_ema, b_raw = (torch.cat([w[f"p{i}"].flatten() for i, n in enumerate(names) if "lora_B" in n]).norm()
                    for w in (ema, raw))
    saved = load_file(checkpoint / "adapter_model.safetensors")  # the folder a user loads is the EMA
    assert torch.cat([saved[k].flatten() for k in sorted(saved) if "lora_B" in k]).norm() == pytest.approx(float(b_ema), rel=1e-6)
    assert b_ema >= 0.45 * b_raw > 0, (b_ema / b_raw).item()


# ---------------------------------------------------------------------- OPD rounds
@pytest.fixture(scope="module")
def setup64(tiny_pipe_dir, tmp_path_factory):
    """A float64 tiny model, two tasks' teachers (one of them twice over, for the teacher axis), their
    prompts, a random student LoRA. Its latents stay float32 (the rollout's seeded noise): comparisons
    allow float32 rounding of the magnitudes compared (tests/helpers.py), 1000x below the factors of 2 a
    wrong weight gives."""
    from data import load_prompts
    from model import FlowModel
    root = tmp_path_factory.mktemp("loops")
    teachers = [_teacher(tiny_pipe_dir, root / "g", "geneval", 1), _teacher(tiny_pipe_dir, root / "o", "ocr", 2),
                _teacher(tiny_pipe_dir, root / "g2", "geneval", 3)]
    model = FlowModel.load(tiny_pipe_dir, dtype=torch.float64)
    cfg = opd.parse_config(opd.OPDConfig, opd_args(teachers, root / "unused", "--prompts_per_batch", "2",
                                                   "--train_steps", "0", "1"))
    _, specs = resolve_teachers(cfg)
    loaded = load_teachers(model, specs, Dist("cpu"), torch.float64)
    params = model.add_student_lora(rank=4, alpha=8)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in params:
            p.copy_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    prompts = {s["task"].name: load_prompts(s["task"].dataset, "train")[0] for s in specs}
    return Namespace(model=model, cfg=cfg, teachers=loaded, params=params, prompts=prompts)


class _Grab:
    """A trainer whose update keeps the round's accumulated gradient instead of stepping."""

    def __init__(self, params):
        self.params, self.grads = params, None

    def update(self, step, loss):
        self.grads = [p.grad.clone() for p in self.params]
        for p in self.params:
            p.grad = None
        return 0.0, False


def _ode_row_loss(s, teacher, x, t, t_next, embed):
    """Eq. 12 at one state, by hand: 1/2 ||mu_S - mu_T||^2 with mu = x + v Delta (the Euler step)."""
    v_s = s.model.velocity(x, t, embed, s.cfg.guidance)
    with torch.no_grad(), s.model.adapter(teacher.adapter):
        v_t = s.model.velocity(x, t, embed, teacher.task.guidance)
    return 0.5 * ((x + v_s * (t_next - t)) - (x + v_t * (t_next - t))).square().sum()


def test_every_row_of_an_opd_round_weighs_one_over_m_k_b_d_in_the_gradient(setup64):
    """M = 2 task batches (one with two teachers), K = 2 trained steps, B = 2 samples, d latent dims: the
    round's gradient is that of sum_m sum_teachers sum_k sum_b L_row / (M K B d)."""
    s = setup64
    routes = by_task(s.teachers)
    grab = _Grab(s.params)
    opd.opd_round(s.cfg, s.model, routes, grab, 0, Dist("cpu"), s.prompts, no_phase)
    M, K, B = len(routes), 2, 2
    total = 0.0
    for b in opd.round_batches(s.cfg, routes, 0, Dist("cpu"), s.prompts):
        teachers, prompts, seeds = [t for _, t in b.teachers], b.prompts, b.seeds
        embeds = s.model.encode_prompts(prompts)
        traj = rollout(s.model, embeds, seeds, s.cfg.num_steps, s.cfg.guidance, 0.0, adapter="student", decode=False)
        d = traj.latents[0, 0].numel()
        for teacher in teachers:
            for j in (0, 1):
                for b in range(B):
                    row = _ode_row_loss(s, teacher, traj.latents[b:b + 1, j], traj.t[j], traj.t[j + 1], embeds[b:b + 1])
                    total = total + row / (M * K * B * d)
    total.backward()
    assert (M, [len(r) for r in routes]) == (2, [2, 1])
    grads = [p.grad for p in s.params]
    for p in s.params:
        p.grad = None
    assert max(g.abs().max() for g in grads) > 0
    for mine, ref in zip(grab.grads, grads):
        torch.testing.assert_close(mine, ref, rtol=0, atol=f32_atol(ref))


def test_opd_round_routes_batch_m_to_task_ms_teachers_and_prompts_with_weight_one_over_m(setup64):
    s = setup64
    routes = by_task(s.teachers)
    calls = []

    def record(cfg, model, teachers, prompts, seeds, steps, scale, phase):
        calls.append((teachers, prompts, seeds, scale))
        return torch.zeros(len(seeds))
    opd.opd_round(s.cfg, s.model, routes, _Grab([]), 3, Dist("cpu"), s.prompts, no_phase, gradient=record)
    assert len(calls) == 2
    for m, (teachers, prompts, seeds, scale) in enumerate(calls):
        task = ("geneval", "ocr")[m]
        assert [(w, t.task.name) for w, t in teachers] == [(1.0, task)] * (2 if task == "geneval" else 1)
        assert [t for _, t in teachers] == [t for t in s.teachers if t.task.name == task]
        # task m's prompts, drawn as Algorithm 1 draws them: its own generator of (seed, round, m)
        idx = np.random.default_rng([s.cfg.seed, 3, m]).choice(len(s.prompts[task]), 2, replace=False)
        assert prompts == [s.prompts[task][i] for i in idx] and scale == 0.5
        assert len(set(seeds)) == 2 and not set(seeds) & set(calls[1 - m][2])


def test_a_tasks_teachers_are_summed_in_its_loss(setup64):
    """The release's teacher axis: the batch's loss and gradient against [T1, T2] are those against T1
    plus those against T2."""
    s = setup64
    geneval = [t for t in s.teachers if t.task.name == "geneval"]
    prompts, seeds = s.prompts["geneval"][:2], [5, 6]
    out = []
    for p in s.params:
        p.grad = None
    for teachers in (geneval, geneval[:1], geneval[1:]):
        loss = opd.batch_gradient(s.cfg, s.model, [(1.0, t) for t in teachers], prompts, seeds, [0, 1], 1.0)
        out.append((loss, [p.grad.clone() for p in s.params]))
        for p in s.params:
            p.grad = None
    torch.testing.assert_close(out[0][0], out[1][0] + out[2][0], rtol=0, atol=f32_atol(out[1][0], out[2][0]))
    for both, one, two in zip(out[0][1], out[1][1], out[2][1]):
        torch.testing.assert_close(both, one + two, rtol=0, atol=f32_atol(one, two))
    assert (out[1][0] - out[2][0]).abs().min() > 1e-6  # two different teachers


def test_soft_routing_is_one_function_and_weights_each_teachers_loss(setup64, monkeypatch):
    """The routing's fork point (opd.supervisors): a fork that supervises every batch by a weighted mix of
    all teachers changes that function only; a batch's loss and gradient are then the weighted sum of
    those against each teacher alone."""
    s = setup64
    routes = by_task(s.teachers)
    weights = [0.25, 0.75, 0.5]  # one per teacher, over the routes in order
    everyone = [t for route in routes for t in route]
    monkeypatch.setattr(opd, "supervisors", lambda routes, m: list(zip(weights, everyone)))
    b = next(opd.round_batches(s.cfg, routes, 0, Dist("cpu"), s.prompts))
    assert [t for _, t in b.teachers] == everyone and b.task.name == "geneval"
    out = []
    for teachers in (b.teachers, *([(1.0, t)] for t in everyone)):
        for p in s.params:
            p.grad = None
        loss = opd.batch_gradient(s.cfg, s.model, teachers, b.prompts, b.seeds, [0, 1], 1.0)
        out.append((loss, [p.grad.clone() for p in s.params]))
    mixed = sum(w * loss for w, (loss, _) in zip(weights, out[1:]))
    torch.testing.assert_close(out[0][0], mixed, rtol=0, atol=f32_atol(*(loss for loss, _ in out[1:])))
    for k, g in enumerate(out[0][1]):
        want = sum(w * grads[k] for w, (_, grads) in zip(weights, out[1:]))
        torch.testing.assert_close(g, want, rtol=0, atol=f32_atol(*(grads[k] for _, grads in out[1:])))
    assert (out[0][0] - out[1][0]).abs().max() > 1e-6  # the mix is not the first teacher alone


# ---------------------------------------------------------------------- GRPO's KL to the base
def test_grpo_kl_to_the_base_against_torch_distributions(setup64):
    """Per row: max(-A rho, -A clip(rho)) + beta KL(N(mu_theta, sbar^2) || N(mu_ref, sbar^2)) / d, mu_ref
    from the base (adapters off), the SDE mean of Eq. 7 written out here."""
    s = setup64
    cfg = teacher_rl.TeacherConfig(kl_beta=20.0, noise_level=0.7, num_steps=3, guidance=s.cfg.guidance, train_batch=2)
    prompts, seeds = s.prompts["ocr"][:2], [21, 22]
    embeds = s.model.encode_prompts(prompts)
    traj = rollout(s.model, embeds, seeds, 3, cfg.guidance, 0.7, adapter="student", decode=False)
    adv = torch.tensor([0.7, -1.3], dtype=torch.float64)
    stats = {"clipfrac": 0.0, "kl": 0.0, "policy_loss": 0.0, "ratio_dev": 0.0}
    losses = teacher_rl.policy_gradient(cfg, s.model, [0, 1], 2, traj, embeds, adv, [0, 1], stats)
    for p in s.params:
        p.grad = None
    d, t1 = traj.latents[0, 0].numel(), traj.t[1].item()
    expected, kls = [], []
    with torch.no_grad():
        for j in (0, 1):
            rows = []
            for b in (0, 1):
                x, x_next, t, dt = traj.latents[b:b + 1, j], traj.latents[b:b + 1, j + 1], traj.t[j].item(), \
                    (traj.t[j + 1] - traj.t[j]).item()
                sq = 0.7 ** 2 * t / (1 - (t1 if t >= 1 else t))                        # s_j^2 (Eq. 5)

                def mean(v):                                                           # Eq. 7
                    return x * (1 + sq / (2 * t) * dt) + v * (1 + sq * (1 - t) / (2 * t)) * dt
                mu = mean(s.model.velocity(x, t, embeds[b:b + 1], cfg.guidance))
                with s.model.adapter(None):
                    mu_ref = mean(s.model.velocity(x, t, embeds[b:b + 1], cfg.guidance))
                sbar = math.sqrt(sq * -dt)
                p, q = torch.distributions.Normal(mu, sbar), torch.distributions.Normal(mu_ref, sbar)
                kl = torch.distributions.kl_divergence(p, q).sum()
                rho = torch.exp(p.log_prob(x_next).mean() - traj.logp_sum[b, j] / d)
                ppo = torch.maximum(-adv[b] * rho, -adv[b] * rho.clamp(1 - cfg.clip_range, 1 + cfg.clip_range))
                rows.append(ppo + cfg.kl_beta * kl / d)
                kls.append(kl)
            expected.append(torch.stack(rows))
    kl_terms = cfg.kl_beta * torch.stack(kls) / d
    for mine, ref in zip(losses, expected):  # float32 rounding of the two terms each row sums
        torch.testing.assert_close(mine, ref, rtol=0, atol=f32_atol(adv, kl_terms))
    # the KL term is far above that rounding (a flipped sign or a zero KL is seen), and its mean is logged
    assert kl_terms.min() > 0.05 * adv.abs().max() and stats["kl"] == pytest.approx(float(sum(kls)) / 4, rel=1e-3)


# ---------------------------------------------------------------------- NFT's training rows
def test_nft_trains_each_image_at_its_forward_process_points_with_the_mean_weight(tiny_pipe_dir, tmp_path,
                                                                               monkeypatch):
    """Every row of nft.py's loss: x_t = (1 - t) x0 + t eps with (t, eps) = training_points(seed, step, i)
    of image i (its own generator), and d loss / d row = 1 / (images per update x K), the mean over the
    update's images and training points."""
    from sample import time_grid
    seen = []

    def recording_loss(v, v_old, v_ref, x_t, x0, t, r, cfg):
        weight = torch.ones(len(t), dtype=torch.float64, requires_grad=True)
        seen.append((x_t.detach().clone(), x0.detach().clone(), t.detach().clone(), weight))
        return weight * 1.0, {"policy_loss": torch.zeros(len(t)), "ref_dev": torch.zeros(len(t))}
    monkeypatch.setattr(nft, "nft_loss", recording_loss)
    # 8 images, 2 updates of 4 images, train_batch 3: chunks of 3 and 1 images per update, K = 2 points each
    nft.main(_nft_args(tiny_pipe_dir, tmp_path / "nft", "--steps", "1", "--train_batch", "3", "--timestep_fraction",
                       "0.67"))
    cfg = nft.parse_config(nft.NFTConfig, _nft_args(tiny_pipe_dir, tmp_path / "nft", "--steps", "1"))
    grid = time_grid(__import__("model").FlowModel.load(tiny_pipe_dir).pipe.scheduler, cfg.num_steps)
    K, per_update = 2, 4
    images = [i for u in range(2) for lo in range(u * 4, u * 4 + 4, 3) for _ in range(K)
              for i in [list(range(lo, min(lo + 3, u * 4 + 4)))]]
    assert len(seen) == len(images) == 8
    for n, ((x_t, x0, t, weight), idx) in enumerate(zip(seen, images)):
        k = n % K
        for row, i in enumerate(idx):
            t_i, eps_i = nft.training_points(cfg.seed, 0, i, grid, K, x0.shape[1:])
            assert t[row] == t_i[k]
            torch.testing.assert_close(x_t[row], (1 - t_i[k]) * x0[row] + t_i[k] * eps_i[k], rtol=0,
                                       atol=f32_atol(x0[row], eps_i[k]))
        assert torch.allclose(weight.grad, torch.full_like(weight, 1 / (per_update * K)), rtol=1e-12, atol=0)


# ---------------------------------------------------------------------- --init_lora
def test_opd_init_lora_starts_the_student_from_a_teacher_and_refuses_another_base(tiny_pipe_dir, tmp_path):
    from toy.pipeline import TinySD3Config, build_tiny_pipeline
    teachers = [_teacher(tiny_pipe_dir, tmp_path / "g", "geneval", 1), _teacher(tiny_pipe_dir, tmp_path / "o", "ocr", 2)]
    # the student starts as the OCR teacher: at round 0 its loss on OCR (same guidance) is 0, not on GenEval
    opd.main(opd_args(teachers, tmp_path / "run", "--steps", "1", "--init_lora", teachers[1], "--guidance", "2.0"))
    import json
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss/ocr"] < 1e-8 < first["loss/geneval"], first
    assert json.loads((tmp_path / "run" / "config.json").read_text())["init_lora"] == teachers[1]
    other = tmp_path / "other"
    build_tiny_pipeline(TinySD3Config(), seed=9).save_pretrained(other)
    foreign = _teacher(str(other), tmp_path / "foreign", "ocr", 4)
    with pytest.raises(SystemExit, match="was trained on another base model"):
        opd.main(opd_args(teachers, tmp_path / "refused", "--steps", "1", "--init_lora", foreign))
    assert not (tmp_path / "refused" / "checkpoint").exists()
    assert Path(teachers[1]).is_dir()
