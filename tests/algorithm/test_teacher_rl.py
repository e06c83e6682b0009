"""teacher_rl.py: advantages, the PPO-clip gradient, 1 vs 2 ranks, exact resume, input errors."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import stage1
import teacher_rl
from sample import gaussian_logprob, trained_steps



def test_group_advantages_zero_mean_per_group_and_equal_groups_contribute_nothing():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0, 0.0, 1.0, 0.0, 3.0])
    adv, zero = stage1.group_advantages(r, 4, per_group_std=True, clip=5.0)
    g = adv.view(3, 4)
    torch.testing.assert_close(g.mean(1), torch.zeros(3), atol=1e-6, rtol=0)
    assert (g[1] == 0).all() and zero == pytest.approx(1 / 3)
    ref = (r[:4] - r[:4].mean()) / (r[:4].std(unbiased=False) + 1e-4)
    torch.testing.assert_close(g[0], ref)
    adv_global, _ = stage1.group_advantages(r, 4, per_group_std=False, clip=5.0)
    ref_global = (r[:4] - r[:4].mean()) / (r.std(unbiased=False) + 1e-4)
    torch.testing.assert_close(adv_global.view(3, 4)[0], ref_global)
    assert stage1.group_advantages(r * 100, 4, True, clip=1.0)[0].abs().max() <= 1.0


def test_ppo_clip_gradient_is_reinforce_for_a_gaussian_policy():
    """1-D Gaussian policy a ~ N(theta, sigma^2), on-policy: grad of the loss = -mean A (a - theta) / sigma^2."""
    torch.manual_seed(0)
    theta, sigma = torch.tensor([0.3], requires_grad=True), torch.tensor([0.5])
    a = (theta.detach() + sigma * torch.randn(256, 1))
    adv = torch.randn(256)
    logp = gaussian_logprob(a, theta.expand(256, 1), sigma.expand(256))[0]
    loss, ratio = teacher_rl.ppo_clip_loss(logp, logp.detach(), adv, clip_range=1e-4)
    loss.mean().backward()
    analytic = -(adv * (a[:, 0] - 0.3) / 0.25).mean()
    assert torch.allclose(ratio, torch.ones(256))
    torch.testing.assert_close(theta.grad[0], analytic, rtol=1e-5, atol=1e-6)
    # off-policy beyond the clip range, the clipped side carries no gradient
    theta.grad = None
    logp = gaussian_logprob(a, theta.expand(256, 1), sigma.expand(256))[0]
    loss, _ = teacher_rl.ppo_clip_loss(logp, logp.detach() - 1.0, torch.ones(256), clip_range=1e-4)
    loss.mean().backward()
    assert theta.grad.abs().item() == 0


def _args(model, out, *extra):
    return ["--model", model, "--task", "geneval", "--dataset", "data/toy/geneval", "--reward", "jpeg_incompressibility=1", "--out", str(out),
            "--batch", "8", "--group_size", "4", "--num_steps", "3", "--rollout_batch", "4", "--train_batch", "4",
            "--lora_rank", "4", "--lora_alpha", "8", "--eval_every", "100", "--eval_prompts", "2",
            "--eval_steps", "2", "--ema_every", "1", "--kl_beta", "0.01", "--timestep_fraction", "0.67",
            "--height", "0", "--width", "0", *extra]


def _weights(out):
    return load_file(Path(out) / "checkpoint" / "raw_weights.safetensors")


def test_resume_reproduces_the_uninterrupted_run(tiny_pipe_dir, tmp_path):
    teacher_rl.main(_args(tiny_pipe_dir, tmp_path / "full", "--steps", "3", "--save_every", "1"))
    teacher_rl.main(_args(tiny_pipe_dir, tmp_path / "cut", "--steps", "2", "--save_every", "1"))
    teacher_rl.main(_args(tiny_pipe_dir, tmp_path / "cut", "--steps", "3", "--save_every", "1", "--resume"))
    full, cut = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(full[k], cut[k]) for k in full)
    ema_full = load_file(tmp_path / "full" / "checkpoint" / "ema_weights.safetensors")
    ema_cut = load_file(tmp_path / "cut" / "checkpoint" / "ema_weights.safetensors")
    assert all(torch.equal(ema_full[k], ema_cut[k]) for k in ema_full)
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]
    cfg = json.loads((tmp_path / "full" / "checkpoint" / "run_config.json").read_text())
    assert cfg["task"] == "geneval" and cfg["base_model"] == tiny_pipe_dir and cfg["step"] == 3


@pytest.mark.parametrize("extra,message", [
    (["--reward", "nope=1"], "nope"),
    (["--task", "nonexistent_task", "--dataset", ""], "dataset folder dataset/nonexistent_task does not exist.*"
                                                     "python -m data fetch flowgrpo"),
    (["--group_size", "3"], "does not divide"),
])
def test_bad_input_fails_before_any_rollout(tiny_pipe_dir, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        teacher_rl.main(_args(tiny_pipe_dir, tmp_path / "x", *extra))
    assert not (tmp_path / "x" / "metrics.jsonl").exists()


def test_missing_or_empty_prompt_file(tiny_pipe_dir, tmp_path):
    (tmp_path / "ds").mkdir()
    with pytest.raises(SystemExit, match="train.txt does not exist"):
        teacher_rl.main(_args(tiny_pipe_dir, tmp_path / "x", "--dataset", str(tmp_path / "ds")))
    (tmp_path / "ds" / "train.txt").write_text("\n")
    with pytest.raises(SystemExit, match="has no prompts"):
        teacher_rl.main(_args(tiny_pipe_dir, tmp_path / "x", "--dataset", str(tmp_path / "ds")))


def test_init_lora_from_another_base_and_foreign_output_dir(tiny_pipe_dir, tmp_path):
    from model import FlowModel
    from toy.pipeline import TinySD3Config, build_tiny_pipeline
    other = FlowModel(build_tiny_pipeline(TinySD3Config(), seed=1))  # same shapes, other weights
    other.add_student_lora(rank=4, alpha=8)
    other.save_student(tmp_path / "foreign")
    with pytest.raises(SystemExit, match="another base model"):
        teacher_rl.main(_args(tiny_pipe_dir, tmp_path / "x", "--init_lora", str(tmp_path / "foreign")))
    teacher_rl.main(_args(tiny_pipe_dir, tmp_path / "run", "--steps", "1"))
    with pytest.raises(SystemExit, match="holds a different run"):
        teacher_rl.main(_args(tiny_pipe_dir, tmp_path / "run", "--steps", "1", "--lr", "1e-2"))
    with pytest.raises(SystemExit, match="--resume"):
        teacher_rl.main(_args(tiny_pipe_dir, tmp_path / "run", "--steps", "1"))
    # --resume with new weights under the same --model path: refused, not continued on another base
    base = tmp_path / "base"
    build_tiny_pipeline(TinySD3Config(), seed=0).save_pretrained(base)
    teacher_rl.main(_args(str(base), tmp_path / "moved", "--steps", "1"))
    build_tiny_pipeline(TinySD3Config(), seed=1).save_pretrained(base)
    with pytest.raises(SystemExit, match="another base model"):
        teacher_rl.main(_args(str(base), tmp_path / "moved", "--steps", "2", "--resume"))


def test_zero_advantage_samples_leave_the_mean_as_in_flow_grpo(tiny_model64):
    """The update's loss is the mean over trained steps and over the images whose advantage is not 0
    (Flow-GRPO's filter), so half a batch at zero advantage does not halve the gradient. Reference: the
    REINFORCE form of the on-policy PPO gradient, -A grad logp_mean, one image and step at a time, in float64."""
    from sample import rollout, transition_mean
    m = tiny_model64
    params = m.add_student_lora(rank=4, alpha=8)
    with torch.no_grad():
        for p in params:  # peft's gaussian init has B = 0; any non-zero LoRA will do
            p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    cfg = teacher_rl.TeacherConfig(num_steps=3, train_batch=3, kl_beta=0.0, guidance=4.5)
    prompts = ["a red cat", "the dog", "a cat", "the red dog"]
    embeds = m.encode_prompts(prompts)
    tr = rollout(m, embeds, [11, 12, 13, 14], cfg.num_steps, cfg.guidance, cfg.noise_level, adapter="student",
                 decode=False)
    # two ranks of 4 global images, one update: rank 0 holds 0, 1 and rank 1 holds 2, 3 (update_layout)
    adv_all = torch.tensor([1.5, 0.0, -0.5, 0.0], dtype=torch.float64)
    assert teacher_rl.kept_rows(adv_all, 0, 4, [0, 1]) == ([0], 2)
    assert teacher_rl.kept_rows(adv_all, 0, 4, [2, 3]) == ([0], 2)
    assert teacher_rl.kept_rows(adv_all, 1, 2, [2, 3]) == ([0], 1)  # second of two updates: images 2, 3
    rows, n_kept = teacher_rl.kept_rows(adv_all, 0, 4, [0, 1, 2, 3])
    assert (rows, n_kept) == ([0, 2], 2)
    steps = trained_steps(cfg)
    n_train = len(steps)
    stats = {"clipfrac": 0.0, "kl": 0.0, "policy_loss": 0.0, "ratio_dev": 0.0}
    teacher_rl.policy_gradient(cfg, m, rows, n_kept, tr, embeds, adv_all, steps, stats)
    grad = torch.cat([p.grad.flatten() for p in params])

    ref = torch.zeros_like(grad)
    for i in (0, 2):
        for j in steps:
            x, t, t_next = tr.latents[i:i + 1, j], tr.t[j].item(), tr.t[j + 1].item()
            mean = transition_mean(x, m.velocity(x, t, embeds[i:i + 1], cfg.guidance), t, t_next,
                                   cfg.noise_level, tr.t[1].item())
            logp_mean = gaussian_logprob(tr.latents[i:i + 1, j + 1], mean, tr.sbar[j].expand(1))[1]
            g = torch.autograd.grad((-adv_all[i] * logp_mean).sum(), params)
            ref += torch.cat([x.flatten() for x in g]) / (2 * n_train)  # mean over 2 kept images x steps
    # float64 sums of terms of size |ref|: 1e-9 of the largest leaves a wide margin above rounding;
    # a mean over all 4 images (zero-advantage ones kept) would give ref / 2
    torch.testing.assert_close(grad, ref, atol=1e-9 * ref.abs().max().item(), rtol=0)
    assert stats["ratio_dev"] < 1e-9 and stats["clipfrac"] == 0


def test_ratio_norm_brings_grpo_guards_recipe_for_every_key_not_given(tiny_pipe_dir, tmp_path, capsys):
    """--ratio_norm: GRPO-Guard's per-prompt std, clip 2e-6, lr 1e-4, no KL (its config/grpo_guard.py);
    a flag given on the command line wins; without --ratio_norm Flow-GRPO's global std stays."""
    base = ["--model", tiny_pipe_dir, "--task", "geneval", "--dataset", "data/toy/geneval", "--reward", "jpeg_incompressibility=1",
            "--recipe", "paper", "--height", "0", "--width", "0", "--out", str(tmp_path / "run"), "--dry_run"]
    guard = teacher_rl.main(base + ["--ratio_norm"])
    assert (guard.per_group_std, guard.clip_range, guard.lr, guard.kl_beta) == (True, 2e-6, 1e-4, 0.0)
    printed = capsys.readouterr().err
    assert "per_group_std = True (paper False) from recipes/grpo_guard.json: GRPO-Guard normalises" in printed
    assert "height = 0 (paper 512) from the command line" in printed  # every value that differs, with its source
    given = teacher_rl.main(base + ["--ratio_norm", "--per_group_std", "false", "--lr", "3e-4"])
    assert (given.per_group_std, given.lr, given.clip_range) == (False, 3e-4, 2e-6)
    grpo = teacher_rl.main(base)
    assert (grpo.per_group_std, grpo.clip_range, grpo.kl_beta, grpo.cfg_detach_uncond) == (False, 1e-4, 0.04, False)
    assert not (tmp_path / "run").exists()


def test_a_named_recipe_wins_over_the_bases_recipe_and_the_command_line_over_both(tiny_pipe_dir, tmp_path, capsys):
    """Precedence, later winning: the paper's default, the base's recipe, GRPO-Guard's recipe, the command line."""
    import json
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"teacher_rl": {"lr": {"value": 5e-3, "reason": "base"},
                                                 "clip_range": {"value": 3e-4, "reason": "base"},
                                                 "group_size": {"value": 2, "reason": "base"}}}))
    base = ["--model", tiny_pipe_dir, "--task", "geneval", "--dataset", "data/toy/geneval", "--reward",
            "jpeg_incompressibility=1", "--recipe", str(recipe), "--height", "0", "--width", "0",
            "--out", str(tmp_path / "run"), "--dry_run"]
    plain = teacher_rl.main(base)
    assert (plain.lr, plain.clip_range, plain.group_size) == (5e-3, 3e-4, 2)
    guard = teacher_rl.main(base + ["--ratio_norm"])
    assert (guard.lr, guard.clip_range, guard.group_size) == (1e-4, 2e-6, 2)
    flag = teacher_rl.main(base + ["--ratio_norm", "--lr", "7e-4"])
    assert (flag.lr, flag.clip_range) == (7e-4, 2e-6)
    printed = capsys.readouterr().err
    assert f"group_size = 2 (paper 24) from {recipe}: base" in printed
    assert "lr = 0.0007 (paper 0.0003) from the command line" in printed
