"""nft.py (DiffusionNFT, paper section 8c) and teacher_rl.py's GRPO-Guard (section 8b): the losses
against float64 re-derivations written here from the paper notes, their limits, the old-policy
schedule, 1 vs 2 ranks and exact resume."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import nft
import teacher_rl
from sample import gaussian_logprob, transition_mean

A_MAX = 5.0


def _reference_nft(v, v_old, v_ref, x_t, x0, t, r, beta, beta_ref):
    """Section 8c, term by term, in float64 loops over samples (an independent re-derivation)."""
    out = []
    for i in range(len(v)):
        v_pos = beta * v[i] + (1 - beta) * v_old[i]                # v+ = beta v + (1 - beta) sg(v_old)
        v_neg = (1 + beta) * v_old[i] - beta * v[i]                # v- = (1 + beta) sg(v_old) - beta v
        x0_pos, x0_neg = x_t[i] - t[i] * v_pos, x_t[i] - t[i] * v_neg   # x0-prediction x_t - t v
        w_pos = (x0_pos - x0[i]).abs().mean().detach()             # adaptive weights, detached
        w_neg = (x0_neg - x0[i]).abs().mean().detach()
        policy = A_MAX * (r[i] * ((x0_pos - x0[i]) ** 2).mean() / w_pos
                          + (1 - r[i]) * ((x0_neg - x0[i]) ** 2).mean() / w_neg) / beta
        out.append(policy + beta_ref * ((v[i] - v_ref[i]) ** 2).mean())
    return torch.stack(out)


def _inputs(seed=0, b=3):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(b, 4, 3, 3, generator=g, dtype=torch.float64), torch.randn(b, 4, 3, 3, generator=g,
                                                                                     dtype=torch.float64)
    t = torch.rand(b, generator=g, dtype=torch.float64) * 0.9 + 0.05
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps   # x_t = (1 - t) x0 + t eps
    v = torch.randn(b, 4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    v_old = torch.randn(b, 4, 3, 3, generator=g, dtype=torch.float64)
    v_ref = torch.randn(b, 4, 3, 3, generator=g, dtype=torch.float64)
    return v, v_old, v_ref, x_t, x0, t


@pytest.mark.parametrize("r_value", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_nft_loss_equals_the_section_8c_rederivation(r_value, beta):
    v, v_old, v_ref, x_t, x0, t = _inputs()
    r = torch.full((3,), r_value, dtype=torch.float64)
    cfg = replace(nft.NFTConfig(), beta=beta, ref_beta=1e-4, adv_clip=A_MAX)
    loss, _ = nft.nft_loss(v, v_old, v_ref, x_t, x0, t, r, cfg)
    ref = _reference_nft(v, v_old, v_ref, x_t, x0, t, r, beta, 1e-4)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    g, = torch.autograd.grad(loss.sum(), v)
    g_ref, = torch.autograd.grad(ref.sum(), v)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("r_value", [0.0, 0.25, 1.0])
def test_nft_gradient_as_beta_goes_to_zero(r_value):
    """beta -> 0: v+- = v_old +- beta (v - v_old), so with e = x_t - t v_old - x0 and w0 = mean |e|,
    dL/dv -> A_max 2 t (1 - 2 r) e / (w0 d): the loss moves x0(v) toward x0 for r > 1/2, away for r < 1/2."""
    v, v_old, _, x_t, x0, t = _inputs(1)
    r = torch.full((3,), r_value, dtype=torch.float64)
    cfg = replace(nft.NFTConfig(), beta=1e-10, ref_beta=0.0, adv_clip=A_MAX)  # the O(beta) rest: ~1e-8
    loss, _ = nft.nft_loss(v, v_old, None, x_t, x0, t, r, cfg)
    g, = torch.autograd.grad(loss.sum(), v)
    tt = t.view(-1, 1, 1, 1)
    e = x_t - tt * v_old - x0
    w0 = e.abs().mean((1, 2, 3), keepdim=True)
    limit = A_MAX * 2 * tt * (1 - 2 * r.view(-1, 1, 1, 1)) * e / (w0 * e[0].numel())
    torch.testing.assert_close(g, limit, rtol=1e-6, atol=1e-12)


def test_nft_gradient_at_r_1_with_old_equal_to_theta_is_the_weighted_flow_matching_gradient():
    v, _, _, x_t, x0, t = _inputs(2)
    v_old = v.detach().clone()
    r = torch.ones(3, dtype=torch.float64)
    cfg = replace(nft.NFTConfig(), beta=0.3, ref_beta=0.0, adv_clip=A_MAX)
    loss, _ = nft.nft_loss(v, v_old, None, x_t, x0, t, r, cfg)
    g, = torch.autograd.grad(loss.sum(), v)
    # the flow-matching loss on the positive sample, x0-space, weighted by w = sg(mean |x_t - t v - x0|)
    err = x_t - t.view(-1, 1, 1, 1) * v - x0
    fm = A_MAX * (err**2 / err.detach().abs().mean((1, 2, 3), keepdim=True)).mean((1, 2, 3))
    g_fm, = torch.autograd.grad(fm.sum(), v)
    torch.testing.assert_close(g, g_fm, rtol=1e-12, atol=1e-15)


def test_optimality_probability():
    adv = torch.tensor([-5.0, -2.5, 0.0, 2.5, 5.0])
    assert nft.optimality(adv, 5.0).tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_old_policy_follows_its_decay_schedule():
    geneval = nft.NFTConfig()
    assert [nft.old_decay(geneval, k) for k in (0, 1, 100, 499, 500, 10**4)] == pytest.approx(
        [0.0, 0.001, 0.1, 0.499, 0.5, 0.5])
    ocr = replace(geneval, old_decay_flat=75, old_decay_rate=0.0075, old_decay_max=0.999)
    assert [nft.old_decay(ocr, k) for k in (0, 74, 75, 76, 100, 300)] == pytest.approx(
        [0.0, 0.0, 0.0, 0.0075, 0.1875, 0.999])
    old, new = [torch.ones(3)], [torch.zeros(3)]
    nft.update_old(old, new, 0.25)       # old <- d old + (1 - d) theta
    assert old[0].tolist() == [0.25, 0.25, 0.25]


def test_training_points_are_distinct_grid_times_and_reproducible():
    grid = torch.linspace(1, 0, 11)
    t1, e1 = nft.training_points(0, 3, 5, grid, 9, (2, 2))
    t2, e2 = nft.training_points(0, 3, 5, grid, 9, (2, 2))
    assert torch.equal(t1, t2) and torch.equal(e1, e2) and len(set(t1.tolist())) == 9 and 0.0 not in t1.tolist()
    assert not torch.equal(nft.training_points(0, 3, 6, grid, 9, (2, 2))[1], e1)


# ---------------------------------------------------------------------- GRPO-Guard
def test_guard_ratio_equals_section_8b_and_is_exactly_one_on_policy():
    g = torch.Generator().manual_seed(3)
    b, d = 4, 12
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    v_old, v_new = torch.randn(b, d, generator=g, dtype=torch.float64), torch.randn(b, d, generator=g, dtype=torch.float64)
    t, t_next, a = 0.8, 0.6, 0.7
    mean_old = transition_mean(x, v_old, t, t_next, a, 0.96)
    sbar = torch.full((b,), a * (t / (1 - t)) ** 0.5 * (t - t_next) ** 0.5, dtype=torch.float64)
    x_next = mean_old + sbar.view(-1, 1) * torch.randn(b, d, generator=g, dtype=torch.float64)
    logp_old = gaussian_logprob(x_next, mean_old, sbar)[0]
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    eps = 1e-3
    # on-policy: rho = 1 exactly
    loss, rho = teacher_rl.guard_loss(mean_old, mean_old, sbar, x_next, logp_old, adv, t_next - t, eps)
    assert torch.equal(rho, torch.ones(b, dtype=torch.float64))
    torch.testing.assert_close(loss, -adv / (t - t_next))
    # off-policy: rho = exp((logp_theta - logp_old + b) sbar), logp per-dim mean, b = mean (mu - mu_old)^2 / (2 sbar^2)
    mean_new = transition_mean(x, v_new, t, t_next, a, 0.96)
    _, rho = teacher_rl.guard_loss(mean_new, mean_old, sbar, x_next, logp_old, adv, t_next - t, eps)
    for i in range(b):
        lp_new = torch.distributions.Normal(mean_new[i], sbar[i]).log_prob(x_next[i]).mean()
        lp_old = torch.distributions.Normal(mean_old[i], sbar[i]).log_prob(x_next[i]).mean()
        bias = ((mean_new[i] - mean_old[i]) ** 2).mean() / (2 * sbar[i] ** 2)
        torch.testing.assert_close(rho[i], torch.exp((lp_new - lp_old + bias) * sbar[i]))
    # the bias correction removes the mean and the sbar-scaling the spread: rho = exp(mean_dims(eps (mu - mu_old)))
    noise = (x_next - mean_old) / sbar.view(-1, 1)
    torch.testing.assert_close(rho, torch.exp((noise * (mean_new - mean_old)).mean(1)))


def test_guard_gradient_on_policy_is_a_per_step_reweighted_reinforce():
    """On-policy the gradient is -A sbar grad logp_mean / (-Delta) (section 8b)."""
    g = torch.Generator().manual_seed(4)
    theta = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64)
    t, t_next, a = 0.7, 0.5, 0.7
    mean = transition_mean(x, theta * x, t, t_next, a, 0.96)
    sbar = torch.full((3,), a * (t / (1 - t)) ** 0.5 * (t - t_next) ** 0.5, dtype=torch.float64)
    x_next = mean.detach() + sbar.view(-1, 1) * torch.randn(3, 6, generator=g, dtype=torch.float64)
    logp_old = gaussian_logprob(x_next, mean.detach(), sbar)[0]
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    loss, _ = teacher_rl.guard_loss(mean, mean.detach(), sbar, x_next, logp_old, adv, t_next - t, 1e-6)
    grad, = torch.autograd.grad(loss.sum(), theta, retain_graph=True)
    logp_mean = gaussian_logprob(x_next, mean, sbar)[1]
    ref, = torch.autograd.grad((-adv * sbar * logp_mean / (t - t_next)).sum(), theta)
    torch.testing.assert_close(grad, ref)


# ---------------------------------------------------------------------- end to end
def _nft_args(model, out, *extra):
    return ["--model", model, "--task", "geneval", "--dataset", "data/toy/geneval", "--reward", "jpeg_incompressibility=1", "--out", str(out),
            "--batch", "8", "--group_size", "4", "--num_steps", "3", "--rollout_batch", "4", "--train_batch", "4",
            "--lora_rank", "4", "--lora_alpha", "8", "--eval_every", "100", "--eval_prompts", "2", "--eval_steps", "2",
            "--height", "0", "--width", "0", "--updates_per_rollout", "2", "--old_decay_rate", "0.2", "--old_decay_max", "0.9",
            *extra]


def _state(out):
    ckpt = Path(out) / "checkpoint"
    return {f"{n}/{k}": v for n in ("raw_weights", "ema_weights", "old_weights")
            for k, v in load_file(ckpt / f"{n}.safetensors").items()}


def test_nft_resume_reproduces_the_uninterrupted_run(tiny_pipe_dir, tmp_path):
    nft.main(_nft_args(tiny_pipe_dir, tmp_path / "full", "--steps", "3", "--save_every", "1"))
    nft.main(_nft_args(tiny_pipe_dir, tmp_path / "cut", "--steps", "2", "--save_every", "1"))
    nft.main(_nft_args(tiny_pipe_dir, tmp_path / "cut", "--steps", "3", "--save_every", "1", "--resume"))
    full, cut = _state(tmp_path / "full"), _state(tmp_path / "cut")
    assert full.keys() == cut.keys() and all(torch.equal(full[k], cut[k]) for k in full)


def _guard_args(model, out, *extra):
    return ["--model", model, "--task", "geneval", "--dataset", "data/toy/geneval", "--reward", "jpeg_incompressibility=1", "--out", str(out),
            "--batch", "8", "--group_size", "4", "--num_steps", "3", "--rollout_batch", "4", "--train_batch", "4",
            "--lora_rank", "4", "--lora_alpha", "8", "--eval_every", "100", "--eval_prompts", "2", "--eval_steps", "2",
            "--ema_every", "1", "--timestep_fraction", "0.67", "--height", "0", "--width", "0", "--ratio_norm",
            "--clip_range", "2e-6", "--lr", "1e-4", "--kl_beta", "0", "--updates_per_rollout", "2", *extra]


def test_guard_resume_matches_the_uninterrupted_run(tiny_pipe_dir, tmp_path):
    """GRPO-Guard on- and off-policy (2 optimizer steps per rollout): a resumed run is the uninterrupted
    one bit for bit (its 2-rank run: tests/plumbing/test_ranks.py)."""
    teacher_rl.main(_guard_args(tiny_pipe_dir, tmp_path / "one", "--steps", "2", "--save_every", "1"))
    teacher_rl.main(_guard_args(tiny_pipe_dir, tmp_path / "cut", "--steps", "1", "--save_every", "1"))
    teacher_rl.main(_guard_args(tiny_pipe_dir, tmp_path / "cut", "--steps", "2", "--save_every", "1", "--resume"))
    one, cut = (load_file(tmp_path / n / "checkpoint" / "raw_weights.safetensors") for n in ("one", "cut"))
    assert all(torch.equal(one[k], cut[k]) for k in one)
    metrics = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["ratio_dev"] < 1e-5 and metrics[0]["grad_norm"] > 0
    batch = json.loads((tmp_path / "one" / "config.json").read_text())["batch"]
    assert [m["images"] for m in metrics] == [batch, 2 * batch]  # training images so far, all ranks
