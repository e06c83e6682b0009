"""sample.py against independent references: torch.distributions, float64 closed forms, Monte Carlo."""
import math

import pytest
import torch

from helpers import f32_atol
from sample import gaussian_kl, gaussian_logprob, make_noise, rollout, sde_step, time_grid


def test_time_grid_is_sd3_shifted_sigmas():
    from diffusers import FlowMatchEulerDiscreteScheduler
    grid = time_grid(FlowMatchEulerDiscreteScheduler(shift=3.0), 10)
    # independent float64 formula: u = linspace(1, shifted(1/1000), N); t = 3u / (1 + 2u); then 0
    shift = 3.0
    u_min = shift * 1e-3 / (1 + (shift - 1) * 1e-3)
    u = torch.linspace(1, u_min, 10, dtype=torch.float64)
    ref = torch.cat([shift * u / (1 + (shift - 1) * u), torch.zeros(1, dtype=torch.float64)])
    torch.testing.assert_close(grid.double(), ref, atol=1e-6, rtol=0)


def test_logprob_equals_torch_normal():
    torch.manual_seed(0)
    mean, x_next = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    std = torch.rand(4) + 0.1
    logp_sum, logp_mean = gaussian_logprob(x_next, mean, std)
    ref = torch.distributions.Normal(mean.double(), std.double().view(4, 1, 1, 1)).log_prob(x_next.double())
    # float32 sums of 75 per-dim terms against float64: the tolerance scales with the terms summed
    size = ref.abs().flatten(1)
    torch.testing.assert_close(logp_sum.double(), ref.flatten(1).sum(1), atol=f32_atol(size.sum(1)), rtol=0)
    torch.testing.assert_close(logp_mean.double(), ref.flatten(1).mean(1), atol=f32_atol(size.mean(1)), rtol=0)


def _step_reference_float64(x, v, t, t_next, a, t_guard):
    """Eqs. 5-9 written out in float64 scalars."""
    tt = t_guard if t == 1 else t
    s = a * math.sqrt(t / (1 - tt))
    dt = t_next - t
    mean = x * (1 + s**2 / (2 * t) * dt) + v * (1 + s**2 * (1 - t) / (2 * t)) * dt
    return mean, s * math.sqrt(-dt)


@pytest.mark.parametrize("t,t_next", [(1.0, 0.96), (0.6, 0.46), (0.28, 0.0)])
def test_sde_step_matches_float64_formula(t, t_next):
    torch.manual_seed(1)
    x, v = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, 4, 3, 3, dtype=torch.float64)
    _, mean, std = sde_step(x, v, t, t_next, 0.7, t_guard=0.96, noise=torch.zeros_like(x))
    ref_mean, ref_std = _step_reference_float64(x, v, t, t_next, 0.7, 0.96)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(std, torch.full((2,), ref_std, dtype=torch.float64))


def test_sde_with_vanishing_noise_is_the_ode_step():
    torch.manual_seed(2)
    x, v, eps = torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 8)
    ode_next, ode_mean, ode_std = sde_step(x, v, 0.7, 0.5, 0.0, t_guard=0.9)
    torch.testing.assert_close(ode_next, x + v * (0.5 - 0.7))  # Euler: x + v dt
    assert (ode_std == 0).all()
    sde_next, _, _ = sde_step(x, v, 0.7, 0.5, 1e-6, t_guard=0.9, noise=eps)
    torch.testing.assert_close(sde_next, ode_next, atol=1e-5, rtol=0)


def test_sde_draws_have_the_returned_mean_and_std():
    torch.manual_seed(3)
    n, d = 200_000, 2
    x, v = torch.randn(1, d).expand(n, d), torch.randn(1, d).expand(n, d)
    x_next, mean, std = sde_step(x, v, 0.8, 0.6, 0.7, t_guard=0.96, noise=torch.randn(n, d))
    torch.testing.assert_close(x_next.mean(0), mean[0], atol=4 * std[0].item() / math.sqrt(n), rtol=0)
    torch.testing.assert_close(x_next.std(0), std[:d], rtol=0.01, atol=0)


def test_closed_form_kl_matches_monte_carlo():
    torch.manual_seed(4)
    d, n = 6, 400_000
    mu_p, mu_q, sbar = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64), 0.8
    kl = gaussian_kl(mu_p[None], mu_q[None], sbar**2)
    x = mu_p + sbar * torch.randn(n, d, dtype=torch.float64)  # x ~ p
    p = torch.distributions.Normal(mu_p, sbar)
    q = torch.distributions.Normal(mu_q, sbar)
    mc = (p.log_prob(x) - q.log_prob(x)).sum(1)
    assert abs(mc.mean().item() - kl.item()) < 4 * mc.std().item() / math.sqrt(n), (mc.mean(), kl)


def test_noise_is_per_sample():
    a, _ = make_noise([5, 6, 7], (2, 3), 4, 0.7)
    b, _ = make_noise([7], (2, 3), 4, 0.7)
    assert torch.equal(a[2], b[0]) and not torch.equal(a[0], a[1])


@pytest.mark.parametrize("noise_level", [0.0, 0.7])
def test_rollout_shapes_and_determinism(tiny_model, noise_level):
    embeds = tiny_model.encode_prompts(["a red cat", "the dog", "a photo"])
    kw = dict(num_steps=4, guidance=4.5, noise_level=noise_level, height=32, width=32)
    tr1 = rollout(tiny_model, embeds, [0, 1, 2], **kw)
    tr2 = rollout(tiny_model, embeds[1:], [1, 2], **kw)
    assert tr1.latents.shape == (3, 5, 8, 16, 16) and tr1.t.shape == (5,)
    assert tr1.logp_sum.shape == (3, 4) and tr1.sbar.shape == (4,) and tr1.images.shape == (3, 3, 32, 32)
    assert 0 <= tr1.images.min() and tr1.images.max() <= 1
    # sample i depends on seed i only (batches of 3 and 2: other float32 sums, the same latents)
    torch.testing.assert_close(tr1.latents[1:], tr2.latents, atol=f32_atol(tr1.latents), rtol=0)
    assert not torch.allclose(tr1.latents[0, -1], tr1.latents[1, -1])
    if noise_level > 0:
        # the stored log-prob is the density of the stored next state under the stored step
        j = 2
        v = tiny_model.velocity(tr1.latents[:, j], tr1.t[j], embeds, 4.5)
        _, mean, std = sde_step(tr1.latents[:, j], v, tr1.t[j].item(), tr1.t[j + 1].item(), 0.7, tr1.t[1].item(),
                                torch.zeros_like(v))
        torch.testing.assert_close(tr1.logp_sum[:, j], gaussian_logprob(tr1.latents[:, j + 1], mean, std)[0])
    else:
        assert (tr1.sbar == 0).all()


def test_sample_cli_writes_grid(tiny_pipe_dir, tmp_path):
    from PIL import Image
    from sample import main
    out = tmp_path / "grid.png"
    main(["--model", tiny_pipe_dir, "--prompts", "a red cat", "the dog", "--num_steps", "2",
          "--out", str(out), "--scale", "2"])
    assert Image.open(out).size[0] > 32
