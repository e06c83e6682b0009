"""study/instruments.py: the SFT baseline against a flow-matching hand computation, the held-out distance
against a float64 re-derivation (and 0 for the teacher itself), the gradient-variance command."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import opd
from data import load_prompts
from helpers import f32_atol
from study import instruments
from teachers import by_task, load_teachers, resolve_teachers
from test_opd import _args, _teacher
from plumbing.config import parse_config
from plumbing.dist import Dist


@pytest.fixture(scope="module")
def teachers(tiny_pipe_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return [_teacher(tiny_pipe_dir, root / "geneval", "geneval", 1), _teacher(tiny_pipe_dir, root / "ocr", "ocr", 2)]


def test_variance_command_prints_a_ratio_and_writes_nothing(teachers, tmp_path, capsys):
    res = instruments.main(_args(teachers, tmp_path / "variance", "--noise_level", "0.7", "--variance_rollouts", "3",
                                 "--train_steps", "1", "2"))
    assert res["ratio"] > 1 and "gradient variance ratio" in capsys.readouterr().err
    assert not (tmp_path / "variance").exists()


def _student_equal_to(model, teacher_dir):
    """Copy a saved teacher's LoRA into the student adapter (so the two make identical means)."""
    sd = load_file(Path(teacher_dir) / "adapter_model.safetensors")
    named = dict(model.transformer.named_parameters())
    with torch.no_grad():
        for k, v in sd.items():
            named[k.removeprefix("base_model.model.").replace(".weight", ".student.weight")].copy_(v)


def test_held_out_distance_is_the_mean_matching_loss_and_zero_for_the_teacher_itself(tiny_pipe_dir, teachers):
    from model import FlowModel
    from sample import rollout, transition_mean
    cfg = parse_config(instruments.InstrumentsConfig, _args(teachers, "unused", "--distance_prompts", "2"))
    base, specs = resolve_teachers(cfg)
    model = FlowModel.load(base)
    loaded = load_teachers(model, specs, Dist("cpu"))
    model.add_student_lora(rank=4, alpha=8)
    cfg.guidance = 2.0  # the teachers' guidance
    ocr = loaded[1]
    far = instruments.distance_to_teacher(cfg, model, ocr, Dist("cpu"))
    # independent: the student's own ODE states, the teacher's Euler mean at each, float64
    prompts = load_prompts(ocr.task.dataset, "test")[0][:2]
    traj = rollout(model, model.encode_prompts(prompts), [0, 1], 3, 2.0, 0.0, adapter="student", decode=False)
    total = 0.0
    with model.adapter(ocr.adapter):
        for j in range(3):
            v = model.velocity(traj.latents[:, j], traj.t[j], model.encode_prompts(prompts), 2.0)
            mu_t = transition_mean(traj.latents[:, j].double(), v.double(), traj.t[j].item(), traj.t[j + 1].item(),
                                   0.0, traj.t[1].item())
            total += (0.5 * (traj.latents[:, j + 1].double() - mu_t) ** 2).mean(dim=(1, 2, 3)).sum().item()
    assert far == pytest.approx(total / 6, rel=1e-4) and far > 0
    _student_equal_to(model, teachers[1])
    assert instruments.distance_to_teacher(cfg, model, ocr, Dist("cpu")) < 1e-12


def test_sft_fits_the_teachers_own_samples_by_flow_matching(tiny_pipe_dir, teachers, tmp_path):
    from model import FlowModel
    from sample import rollout, time_grid
    cfg = parse_config(instruments.InstrumentsConfig, _args(teachers, "unused", "--baseline", "sft"))
    base, specs = resolve_teachers(cfg)
    model = FlowModel.load(base)
    loaded = load_teachers(model, specs, Dist("cpu"))
    params = model.add_student_lora(rank=4, alpha=8)
    b = next(opd.round_batches(cfg, by_task(loaded), 0, Dist("cpu"), {
        s["task"].name: load_prompts(s["task"].dataset, "train")[0] for s in specs}))
    ((_, teacher),), prompts, seeds = b.teachers, b.prompts, b.seeds
    loss = instruments.sft_gradient(cfg, model, b.teachers, prompts, seeds, [0, 1], 1.0)
    # independent: the teacher's ODE sample, then ||v_S(x_t, t) - (eps - x0)||^2 at t_0 and t_1 with the same noise
    x0 = rollout(model, model.encode_prompts(prompts), seeds, 3, teacher.task.guidance, 0.0,
                 adapter=teacher.adapter, decode=False).latents[:, -1]
    grid = time_grid(model.pipe.scheduler, 3)
    ref = torch.zeros(len(seeds))
    for i, s in enumerate(seeds):
        eps = torch.randn((2, *x0.shape[1:]), generator=torch.Generator().manual_seed(int(s) + instruments.SFT_NOISE_STREAM))
        for k in range(2):
            t = grid[k]
            x_t = (1 - t) * x0[i:i + 1] + t * eps[k:k + 1]
            with torch.no_grad():
                v = model.velocity(x_t, t, model.encode_prompts([prompts[i]]), 1.0)
            ref[i] += (v - (eps[k:k + 1] - x0[i:i + 1])).square().sum()
    torch.testing.assert_close(loss, ref, atol=f32_atol(ref), rtol=0)  # other batch shapes, one quantity
    assert all(p.grad is not None for p in params)
    instruments.main(_args(teachers, tmp_path / "sft", "--baseline", "sft", "--steps", "2", "--distance_prompts", "2"))
    metrics = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] > 0 and "eval/ocr/distance" in metrics[-1]




def test_sft_caption_dropout_fits_the_empty_prompt_for_the_drawn_samples(tiny_pipe_dir, teachers):
    """--sft_caption_dropout p: sample i is fitted with the empty prompt when a draw of its seed's own
    stream is < p (the teacher still samples it from its prompt); the others as without dropout."""
    from model import FlowModel
    cfg = parse_config(instruments.InstrumentsConfig, _args(teachers, "unused", "--baseline", "sft",
                                                            "--sft_caption_dropout", "0.5"))
    base, specs = resolve_teachers(cfg)
    model = FlowModel.load(base)
    loaded = load_teachers(model, specs, Dist("cpu"))
    model.add_student_lora(rank=4, alpha=8)
    b = next(opd.round_batches(cfg, by_task(loaded), 0, Dist("cpu"), {
        s["task"].name: load_prompts(s["task"].dataset, "train")[0] for s in specs}))
    ((_, teacher),), prompts, seeds = b.teachers, b.prompts, b.seeds
    import dataclasses
    draws = sorted(torch.rand((), generator=torch.Generator().manual_seed(int(s) + instruments.SFT_DROPOUT_STREAM)).item()
                   for s in seeds)
    p = (draws[len(draws) // 2 - 1] + draws[len(draws) // 2]) / 2  # half the batch drawn under p
    cfg = dataclasses.replace(cfg, sft_caption_dropout=p)
    drop = [torch.rand((), generator=torch.Generator().manual_seed(int(s) + instruments.SFT_DROPOUT_STREAM)).item() < p
            for s in seeds]
    assert any(drop) and not all(drop), drop  # the batch has both kinds
    with_dropout = instruments.sft_gradient(cfg, model, [(1.0, teacher)], prompts, seeds, [0, 1], 1.0)
    # independent: the same loss without dropout, with the dropped samples' text encoded as ""
    plain = dataclasses.replace(cfg, sft_caption_dropout=0.0)
    real_encode = model.encode_prompts
    calls = []

    def encode(texts):  # the teacher's encoding (first call) keeps the prompts; the student's sees ""
        calls.append(texts)
        return real_encode(texts if len(calls) == 1 else ["" if d else t for t, d in zip(texts, drop)])
    model.encode_prompts = encode
    try:
        reference = instruments.sft_gradient(plain, model, [(1.0, teacher)], prompts, seeds, [0, 1], 1.0)
    finally:
        model.encode_prompts = real_encode
    torch.testing.assert_close(with_dropout, reference, atol=f32_atol(reference), rtol=0)
    without = instruments.sft_gradient(plain, model, [(1.0, teacher)], prompts, seeds, [0, 1], 1.0)
    assert not torch.allclose(with_dropout[torch.tensor(drop)], without[torch.tensor(drop)])
    with pytest.raises(SystemExit, match="--sft_caption_dropout needs --baseline sft"):
        instruments.main(_args(teachers, "unused", "--sft_caption_dropout", "0.1"))
