"""Runs that survive a kill at any instant of a checkpoint save, damaged checkpoints refused with one
line, and non-finite losses that never reach the weights (rundir.RunDir, student.StudentTrainer)."""
import json
import os
import shutil

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file

import opd
import student
import teacher_rl
from plumbing import dist
from plumbing import rundir


def _grpo_args(model, out, *extra):
    return ["--model", model, "--task", "geneval", "--dataset", "data/toy/geneval", "--reward", "jpeg_incompressibility=1", "--out", str(out),
            "--batch", "8", "--group_size", "4", "--num_steps", "3", "--rollout_batch", "4", "--train_batch", "4",
            "--lora_rank", "4", "--lora_alpha", "8", "--eval_every", "100", "--eval_prompts", "2", "--eval_steps", "2",
            "--ema_every", "1", "--timestep_fraction", "0.67", "--height", "0", "--width", "0", "--steps", "3",
            "--save_every", "1", "--updates_per_rollout", "1", *extra]


def _state(run):
    """Everything a finished run leaves that resume must reproduce: weights, EMA, adapter, metrics."""
    ckpt = run / "checkpoint"
    out = {f"{name}/{k}": v for name in ("raw_weights", "ema_weights", "adapter_model")
           for k, v in load_file(ckpt / f"{name}.safetensors").items()}
    metrics = [{k: v for k, v in json.loads(line).items() if not k.startswith("sec/")}
               for line in (run / "metrics.jsonl").read_text().splitlines()]
    return out, metrics


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing in the scripts catches it."""


DISK_OPS = [(safetensors.torch, "save_file"), (rundir, "save_file"), (torch, "save"), (os, "replace"),
            (shutil, "rmtree")]


def _kill_at(monkeypatch, k: int, during_step: int):
    """Patch every disk operation of a checkpoint save; raise Killed before the k-th one of the save of
    `during_step` (k past the last: right after that save returns). Returns the op counter."""
    count = {"n": 0, "armed": False}
    real_save = rundir.RunDir.save

    def save(self, step, *args, **kwargs):
        count["armed"] = step == during_step
        real_save(self, step, *args, **kwargs)
        if count["armed"] and count["n"] + 1 == k:
            raise Killed(f"after the save of step {step}")
        count["armed"] = False

    def wrap(fn):
        def op(*args, **kwargs):
            if count["armed"]:
                count["n"] += 1
                if count["n"] == k:
                    raise Killed(f"before disk op {k} ({fn.__name__})")
            return fn(*args, **kwargs)
        return op
    for module, name in DISK_OPS:
        monkeypatch.setattr(module, name, wrap(getattr(module, name)))
    monkeypatch.setattr(rundir.RunDir, "save", save)
    return count


def test_a_kill_at_any_point_of_a_save_resumes_to_the_uninterrupted_run_bit_for_bit(tiny_pipe_dir, tmp_path,
                                                                                   monkeypatch):
    """The last save of a 2-step run (step 2, over the complete checkpoint of step 1) is killed before
    each of its disk operations in turn, and after it; every resume ends where the uninterrupted run does."""
    steps = ("--steps", "2")
    teacher_rl.main(_grpo_args(tiny_pipe_dir, tmp_path / "full", *steps))
    full = _state(tmp_path / "full")
    with monkeypatch.context() as m:  # count the disk operations of one save
        count = _kill_at(m, 10**9, during_step=2)
        teacher_rl.main(_grpo_args(tiny_pipe_dir, tmp_path / "count", *steps))
    n_ops = count["n"]
    assert n_ops >= 8  # student files, raw, EMA, trainer state, manifest rename, two publishing renames, cleanup
    for k in range(1, n_ops + 2):
        run = tmp_path / f"kill{k}"
        with monkeypatch.context() as m:
            _kill_at(m, k, during_step=2)
            with pytest.raises(Killed):
                teacher_rl.main(_grpo_args(tiny_pipe_dir, run, *steps))
        teacher_rl.main(_grpo_args(tiny_pipe_dir, run, *steps, "--resume"))
        weights, metrics = _state(run)
        assert metrics == full[1], f"kill before disk op {k}: metrics differ"
        assert weights.keys() == full[0].keys()
        assert all(torch.equal(weights[key], full[0][key]) for key in weights), f"kill before disk op {k}"
        assert not any((run / slot).exists() for slot in ("checkpoint.tmp", "checkpoint.old"))


def test_a_damaged_checkpoint_is_refused_in_one_line_and_nothing_is_cut_or_deleted(tiny_pipe_dir, tmp_path):
    run = tmp_path / "run"
    teacher_rl.main(_grpo_args(tiny_pipe_dir, run, "--steps", "2"))
    metrics = (run / "metrics.jsonl").read_text()
    for name in ("trainer_state.pt", "raw_weights.safetensors"):
        victim = run / "checkpoint" / name
        saved = victim.read_bytes()
        victim.write_bytes(saved[:len(saved) // 2])  # truncated
        with pytest.raises(SystemExit, match=f"no complete checkpoint.*{name}") as e:
            teacher_rl.main(_grpo_args(tiny_pipe_dir, run, "--resume"))
        assert "\n" not in str(e.value)
        assert (run / "metrics.jsonl").read_text() == metrics and victim.stat().st_size == len(saved) // 2
        victim.write_bytes(saved)


def test_an_older_complete_checkpoint_is_used_when_the_newest_is_damaged(tiny_pipe_dir, tmp_path):
    """checkpoint/ damaged by hand, checkpoint.old complete (as a kill can leave it): resume from the
    older one, keep the damaged one aside, and finish exactly like the uninterrupted run."""
    teacher_rl.main(_grpo_args(tiny_pipe_dir, tmp_path / "full"))
    run = tmp_path / "run"
    teacher_rl.main(_grpo_args(tiny_pipe_dir, run, "--steps", "1"))
    shutil.copytree(run / "checkpoint", tmp_path / "step1")
    teacher_rl.main(_grpo_args(tiny_pipe_dir, run, "--steps", "2", "--resume"))
    shutil.copytree(tmp_path / "step1", run / "checkpoint.old")
    (run / "checkpoint" / "ema_weights.safetensors").write_bytes(b"junk")
    teacher_rl.main(_grpo_args(tiny_pipe_dir, run, "--resume"))
    assert (run / "checkpoint.damaged" / "ema_weights.safetensors").read_bytes() == b"junk"
    weights, metrics = _state(run)
    full_weights, full_metrics = _state(tmp_path / "full")
    def training(ms):  # a run cut at --steps 1 also evaluated at its last step
        return [{k: v for k, v in m.items() if not k.startswith("eval/")} for m in ms]
    assert training(metrics) == training(full_metrics)
    assert all(torch.equal(weights[k], full_weights[k]) for k in weights)


# ---------------------------------------------------------------------- non-finite steps
def test_update_skips_a_non_finite_gradient_without_touching_weights_moments_or_ema(tiny_model, tmp_path):
    import dataclasses
    cfg = dataclasses.replace(opd.OPDConfig(), lora_rank=4, lora_alpha=8, ema_every=1, max_skipped_steps=3,
                              out=str(tmp_path / "r"))
    trainer = student.StudentTrainer(tiny_model, cfg, dist.Dist("cpu"), None)
    for p in trainer.params:
        p.grad = torch.ones_like(p)
    trainer.update(0, torch.ones(2))  # one good step: moments and EMA exist
    before = ([p.detach().clone() for p in trainer.params], [s.clone() for s in trainer.ema.shadow],
              {k: v.clone() for k, v in trainer.opt.state[trainer.params[0]].items()})
    for p in trainer.params:
        p.grad = torch.ones_like(p)
    trainer.params[0].grad[0, 0] = float("nan")
    norm, skipped = trainer.update(1, torch.ones(2))
    assert skipped and not torch.isfinite(torch.tensor(norm))
    trainer.params[1].grad = torch.ones_like(trainer.params[1])
    _, skipped = trainer.update(2, torch.tensor([1.0, float("inf")]))  # a finite gradient, a non-finite loss
    assert skipped
    assert all(torch.equal(p, q) for p, q in zip(trainer.params, before[0]))
    assert all(torch.equal(s, q) for s, q in zip(trainer.ema.shadow, before[1]))
    assert all(torch.equal(trainer.opt.state[trainer.params[0]][k], v) for k, v in before[2].items())
    assert all(p.grad is None for p in trainer.params)
    trainer.params[0].grad = torch.full_like(trainer.params[0], float("nan"))
    with pytest.raises(student.NonFiniteError, match="consecutive"):
        trainer.update(3, torch.ones(2))


def _nan_at(calls: set[int], fn):
    count = {"n": 0}

    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        count["n"] += 1
        if count["n"] not in calls:
            return out
        return (out[0] * float("nan"), *out[1:]) if isinstance(out, tuple) else out * float("nan")
    return wrapped


def _finite_checkpoint(run):
    for name in ("raw_weights", "ema_weights", "adapter_model", "pytorch_lora_weights"):
        assert all(torch.isfinite(v).all() for v in load_file(run / "checkpoint" / f"{name}.safetensors").values())


def test_teacher_rl_skips_a_nan_step_and_stops_after_too_many(tiny_pipe_dir, tmp_path, monkeypatch):
    calls, real = 4, teacher_rl.grpo_loss  # per step: 2 chunks of 4 images x int(0.67 x 3) = 2 trained steps
    monkeypatch.setattr(teacher_rl, "grpo_loss", _nan_at({calls + 1}, real))  # step 1
    teacher_rl.main(_grpo_args(tiny_pipe_dir, tmp_path / "one"))
    metrics = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped_nonfinite"] for m in metrics] == [0, 1, 0]
    _finite_checkpoint(tmp_path / "one")
    monkeypatch.setattr(teacher_rl, "grpo_loss", _nan_at(set(range(calls + 1, 100)), real))
    with pytest.raises(SystemExit, match="2 consecutive steps .*skipped") as e:
        teacher_rl.main(_grpo_args(tiny_pipe_dir, tmp_path / "many", "--max_skipped_steps", "2", "--steps", "5"))
    assert "\n" not in str(e.value)
    saved = json.loads((tmp_path / "many" / "checkpoint" / "run_config.json").read_text())
    assert saved["step"] == 2  # the last save before the stop; its weights never saw a NaN
    _finite_checkpoint(tmp_path / "many")


@pytest.fixture(scope="module")
def teachers(tiny_pipe_dir, tmp_path_factory):
    from test_opd import _teacher
    root = tmp_path_factory.mktemp("teachers")
    return [_teacher(tiny_pipe_dir, root / "geneval", "geneval", 1), _teacher(tiny_pipe_dir, root / "ocr", "ocr", 2)]


def test_opd_skips_a_nan_step_and_never_saves_a_nan(teachers, tmp_path, monkeypatch):
    from test_opd import _args
    real = opd.closed_form_loss
    monkeypatch.setattr(opd, "closed_form_loss", _nan_at({3}, real))  # round 1, first task batch (2 per round)
    opd.main(_args(teachers, tmp_path / "one", "--steps", "3", "--save_every", "1"))
    metrics = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped_nonfinite"] for m in metrics] == [0, 1, 0]
    _finite_checkpoint(tmp_path / "one")
    monkeypatch.setattr(opd, "closed_form_loss", _nan_at(set(range(3, 100)), real))
    with pytest.raises(SystemExit, match="consecutive"):
        opd.main(_args(teachers, tmp_path / "many", "--steps", "6", "--save_every", "1", "--max_skipped_steps", "3"))
    assert json.loads((tmp_path / "many" / "checkpoint" / "run_config.json").read_text())["step"] == 3
    _finite_checkpoint(tmp_path / "many")
