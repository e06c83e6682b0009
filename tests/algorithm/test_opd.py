"""opd.py: the loss against analytic references, estimator agreement/variance, routing, 1 vs 2 ranks,
exact resume and input errors."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import opd
import opd_inputs
from teachers import by_task, load_teachers, resolve_teachers
from helpers import f32_atol
from sample import sde_step
from plumbing.dist import Dist



def test_sde_loss_equals_analytic_gaussian_kl():
    torch.manual_seed(0)
    mean_s, mean_t = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 4, 5, dtype=torch.float64)
    sbar = torch.rand(3, dtype=torch.float64) + 0.1
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mean_s, sbar.view(3, 1, 1)),
                                            torch.distributions.Normal(mean_t, sbar.view(3, 1, 1))).flatten(1).sum(1)
    torch.testing.assert_close(opd.closed_form_loss(mean_s, mean_t, sbar, ode=False), ref)


def test_ode_loss_is_delta_squared_velocity_mse_and_sde_identity():
    torch.manual_seed(1)
    x, v_s, v_t = (torch.randn(2, 8, dtype=torch.float64) for _ in range(3))
    t, t_next = 0.7, 0.45
    mu_s, mu_t = sde_step(x, v_s, t, t_next, 0.0, 0.96)[1], sde_step(x, v_t, t, t_next, 0.0, 0.96)[1]
    ode = opd.closed_form_loss(mu_s, mu_t, None, ode=True)
    torch.testing.assert_close(ode, 0.5 * (t_next - t) ** 2 * (v_s - v_t).square().sum(1))
    # SDE: (-Delta) c^2 / (2 s^2) ||v_S - v_T||^2 with c = 1 + s^2 (1 - t) / (2 t)  (paper section 4)
    a = 0.7
    _, mu_s, sbar = sde_step(x, v_s, t, t_next, a, 0.96, torch.zeros_like(x))
    _, mu_t, _ = sde_step(x, v_t, t, t_next, a, 0.96, torch.zeros_like(x))
    s2 = a**2 * t / (1 - t)
    c = 1 + s2 * (1 - t) / (2 * t)
    ref = -(t_next - t) * c**2 / (2 * s2) * (v_s - v_t).square().sum(1)
    torch.testing.assert_close(opd.closed_form_loss(mu_s, mu_t, sbar, ode=False), ref)


def test_estimators_agree_in_expectation_and_closed_form_has_lower_variance():
    """Linear velocity v_S = theta * x at R random states, one per row; each row's estimate of the gradient
    is taken against its own copy of theta (so one backward gives all R); same rollouts for both."""
    torch.manual_seed(2)
    d, R, a, t, t_next = 4, 4000, 0.7, 0.8, 0.6
    theta = torch.randn(d, dtype=torch.float64)
    w_teacher = torch.randn(d, dtype=torch.float64)
    x, eps = torch.randn(R, d, dtype=torch.float64), torch.randn(R, d, dtype=torch.float64)
    x_next = sde_step(x, theta * x, t, t_next, a, 0.96, eps)[0]  # the student's own samples
    mu_t = sde_step(x, w_teacher * x, t, t_next, a, 0.96, torch.zeros_like(x))[1]
    grads = {}
    for name in ("closed", "ppo"):
        rows = theta.repeat(R, 1).requires_grad_(True)             # (R, d): row r's copy of theta
        _, mu_s, sbar = sde_step(x, rows * x, t, t_next, a, 0.96, torch.zeros_like(x))
        loss = (opd.closed_form_loss(mu_s, mu_t, sbar, ode=False) if name == "closed"
                else opd.ppo_style_loss(mu_s, mu_t, sbar, x_next))  # (R,), row r depends on rows[r] only
        grads[name] = torch.autograd.grad(loss.sum(), rows)[0]     # (R, d) per-row gradients
    g_cf, g_ppo = grads["closed"], grads["ppo"]
    se = (g_ppo - g_cf).std(0) / R**0.5
    assert ((g_ppo.mean(0) - g_cf.mean(0)).abs() < 4 * se).all(), (g_ppo.mean(0), g_cf.mean(0), se)
    assert g_ppo.var(0).sum() > 2 * g_cf.var(0).sum()


# ---------------------------------------------------------------------- with a tiny model and teachers
def _teacher(tiny_pipe_dir, path, task, seed, base=None, guidance=2.0):
    from model import FlowModel
    m = FlowModel.load(tiny_pipe_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.add_student_lora(rank=4, alpha=8):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    m.save_student(path, {"task": task, "dataset": f"data/toy/{task}", "reward": "jpeg_incompressibility=1", "guidance": guidance,
                          "base_model": base or tiny_pipe_dir})
    return str(path)


@pytest.fixture(scope="module")
def teachers(tiny_pipe_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return [_teacher(tiny_pipe_dir, root / "geneval", "geneval", 1), _teacher(tiny_pipe_dir, root / "ocr", "ocr", 2)]


def _args(teachers, out, *extra):
    return ["--teachers", *teachers, "--out", str(out), "--prompts_per_batch", "4", "--num_steps", "3",
            "--lora_rank", "4", "--lora_alpha", "8", "--eval_every", "100", "--eval_prompts", "2",
            "--eval_steps", "2", "--ema_every", "1", "--lr", "1e-3", "--height", "0", "--width", "0", *extra]


def test_routing_sends_each_batch_to_its_teacher_and_teachers_get_no_gradient(tiny_pipe_dir, teachers):
    from data import load_prompts
    cfg = opd.parse_config(opd.OPDConfig, _args(teachers, "unused"))
    base, specs = resolve_teachers(cfg)
    assert base == tiny_pipe_dir and [s["task"].name for s in specs] == ["geneval", "ocr"]
    from model import FlowModel
    model = FlowModel.load(base)
    loaded = load_teachers(model, specs, Dist("cpu"))
    params = model.add_student_lora(rank=4, alpha=8)
    prompts_by_task = {s["task"].name: load_prompts(s["task"].dataset, "train")[0] for s in specs}
    batches = list(opd.round_batches(cfg, by_task(loaded), 0, Dist("cpu"), prompts_by_task))
    assert [b.task.name for b in batches] == ["geneval", "ocr"]
    for b in batches:
        assert [(w, t.task.name) for w, t in b.teachers] == [(1.0, b.task.name)]  # Algorithm 1: its own teacher
        assert set(b.prompts) <= set(prompts_by_task[b.task.name])
    # the student copied from teacher "ocr" has zero loss against it and not against "geneval"
    sd = load_file(Path(teachers[1]) / "adapter_model.safetensors")
    named = dict(model.transformer.named_parameters())
    with torch.no_grad():
        for k, v in sd.items():
            named[k.removeprefix("base_model.model.").replace(".weight", ".student.weight")].copy_(v)
    cfg.guidance = 2.0  # the teachers' guidance, so that identical weights give identical means
    losses = {b.task.name: opd.batch_gradient(cfg, model, b.teachers, b.prompts, b.seeds, [0, 1, 2], 1.0)
              for b in batches}
    assert losses["ocr"].abs().max() < 1e-8 and losses["geneval"].min() > 1e-6
    teacher_params = [p for n, p in named.items() if ".teacher_" in n]
    assert teacher_params and all(p.grad is None for p in teacher_params)
    assert all(p.grad is not None for p in params) and sum(p.grad.abs().sum() for p in params) > 0


def test_detached_uncond_branch_changes_the_gradient_not_the_loss(teachers):
    """--cfg_detach_uncond reaches the student's training forward: same loss (the guided velocity's value
    is unchanged), a different gradient (model.py's test checks it is w grad v_c)."""
    from data import load_prompts
    from model import FlowModel
    cfg = opd.parse_config(opd.OPDConfig, _args(teachers, "unused"))
    base, specs = resolve_teachers(cfg)
    model = FlowModel.load(base)
    teacher = load_teachers(model, specs[:1], Dist("cpu"))[0]
    params = model.add_student_lora(rank=4, alpha=8)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in params:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    prompts = load_prompts(specs[0]["task"].dataset, "train")[0][:2]
    out = {}
    for detach in (False, True):
        cfg.cfg_detach_uncond = detach
        for p in params:
            p.grad = None
        loss = opd.batch_gradient(cfg, model, [(1.0, teacher)], prompts, [11, 12], [0, 1], 1.0)
        out[detach] = loss, torch.cat([p.grad.flatten() for p in params])
    torch.testing.assert_close(out[True][0], out[False][0], atol=f32_atol(out[False][0]), rtol=0)
    assert (out[True][1] - out[False][1]).norm() > 0.1 * out[False][1].norm()


def test_resume_reproduces_the_uninterrupted_run(teachers, tmp_path):
    extra = ["--noise_level", "0.7", "--save_every", "1"]
    opd.main(_args(teachers, tmp_path / "full", "--steps", "3", *extra))
    opd.main(_args(teachers, tmp_path / "cut", "--steps", "2", *extra))
    opd.main(_args(teachers, tmp_path / "cut", "--steps", "3", "--resume", *extra))
    full = load_file(tmp_path / "full" / "checkpoint" / "raw_weights.safetensors")
    cut = load_file(tmp_path / "cut" / "checkpoint" / "raw_weights.safetensors")
    assert all(torch.equal(full[k], cut[k]) for k in full)
    config = json.loads((tmp_path / "full" / "config.json").read_text())  # student rollouts so far, all tasks
    metrics = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [m["images"] for m in metrics] == [(k + 1) * config["prompts_per_batch"] * len(teachers) for k in range(3)]


def test_bad_inputs(tiny_pipe_dir, teachers, tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        opd.main(_args([teachers[0], str(tmp_path / "missing")], tmp_path / "x"))
    with pytest.raises(SystemExit, match="could not be fetched from the hub"):  # tests run with HF_HUB_OFFLINE=1
        opd.main(_args([teachers[0], "quanhaol/DiffusionOPD/AesTeacher/lora"], tmp_path / "x"))
    with pytest.raises(SystemExit, match="the teachers of task 'geneval' name different datasets"):
        opd.main(_args(teachers, tmp_path / "x", "--teacher_task", "geneval", "geneval"))
    with pytest.raises(SystemExit, match="does not exist"):
        opd.main(_args(teachers, tmp_path / "x", "--teacher_dataset", f"ocr={tmp_path / 'nope'}"))
    other = _teacher(tiny_pipe_dir, tmp_path / "other", "aesthetic", 3)
    run_cfg = json.loads((Path(other) / "run_config.json").read_text())
    (Path(other) / "run_config.json").write_text(json.dumps({**run_cfg, "base_fingerprint": "0123456789abcdef"}))
    with pytest.raises(SystemExit, match="different base models"):
        opd.main(_args([*teachers, other], tmp_path / "x"))
    with pytest.raises(SystemExit, match="needs a log-density"):
        opd.main(_args(teachers, tmp_path / "x", "--estimator", "ppo"))
    two_ranks = Dist("cpu")
    two_ranks.world = 2
    cfg = opd.parse_config(opd.OPDConfig, _args(teachers, tmp_path / "x", "--prompts_per_batch", "3"))
    with pytest.raises(SystemExit, match="does not divide over 2 ranks"):
        opd_inputs.check_inputs(cfg, two_ranks)
    assert not (tmp_path / "x").exists()
