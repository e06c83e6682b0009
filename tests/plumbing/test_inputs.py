"""Bad input: every case fails with one line naming the problem and the fix, before the model loads
(where it can be checked before), and leaves no run directory behind. One parametrised test per script."""
import json
import shutil
from pathlib import Path

import pytest

import opd
import sample
import teacher_rl
from model import FlowModel
from test_opd import _args as opd_args
from test_opd import _teacher


@pytest.fixture(scope="module")
def teachers(tiny_pipe_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return [_teacher(tiny_pipe_dir, root / "geneval", "geneval", 1), _teacher(tiny_pipe_dir, root / "ocr", "ocr", 2)]


@pytest.fixture(scope="module")
def odd_teachers(tiny_pipe_dir, teachers, tmp_path_factory):
    """Teacher folders as they come from elsewhere: a release-style one (no run_config.json, no base named),
    a truncated one, one of another base."""
    root = tmp_path_factory.mktemp("odd")
    release = root / "release"
    shutil.copytree(teachers[1], release)
    (release / "run_config.json").unlink()
    cfg = json.loads((release / "adapter_config.json").read_text())
    (release / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": None}))
    truncated = root / "truncated"
    shutil.copytree(teachers[1], truncated)
    weights = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(weights[:-100])
    other = Path(_teacher(tiny_pipe_dir, root / "other", "aesthetic", 3))
    run_cfg = json.loads((other / "run_config.json").read_text())
    (other / "run_config.json").write_text(json.dumps({**run_cfg, "base_fingerprint": "0123456789abcdef"}))
    return {"release": str(release), "truncated": str(truncated), "other": str(other)}


@pytest.fixture
def no_model_load(monkeypatch):
    """Every case below must fail before a model loads."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")
    monkeypatch.setattr(FlowModel, "load", refuse)


def _one_line_error(call, match):
    with pytest.raises(SystemExit, match=match) as e:
        call()
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message, message


OPD_CASES = {
    "missing teacher": (lambda t, o, tmp: [t[0], str(tmp / "missing")], [], "does not exist"),
    "hub teacher offline": (lambda t, o, tmp: [t[0], "quanhaol/DiffusionOPD/AesTeacher/lora"], [],
                            "could not be fetched from the hub"),
    "one task's teachers on two prompt sets": (lambda t, o, tmp: t, ["--teacher_task", "geneval", "geneval"],
                                                "teachers of task 'geneval' name different datasets"),
    "missing dataset": (lambda t, o, tmp: t, ["--teacher_dataset", "ocr=/nonexistent/ocr"], "does not exist"),
    "teachers of two bases": (lambda t, o, tmp: [*t, o["other"]], [], "different base models"),
    "release folder without --model": (lambda t, o, tmp: [o["release"]], ["--teacher_task", "ocr",
                                                                           "--teacher_dataset", "ocr=data/toy/ocr"],
                                       "pass --model"),
    "release folder without its task": (lambda t, o, tmp: [t[0], o["release"]], [], "pass --teacher_task"),
    "truncated teacher weights": (lambda t, o, tmp: [t[0], o["truncated"]], [], "damaged"),
    "PPO-style on the ODE": (lambda t, o, tmp: t, ["--estimator", "ppo"], "needs a log-density"),
    "unknown estimator": (lambda t, o, tmp: t, ["--estimator", "dpo"], "--estimator must be"),
    "odd resolution": (lambda t, o, tmp: t, ["--height", "33"], "not divisible"),
    "zero prompts": (lambda t, o, tmp: t, ["--prompts_per_batch", "0"], "--prompts_per_batch must be > 0"),
    "zero save period": (lambda t, o, tmp: t, ["--save_every", "0"], "--save_every must be > 0"),
    "zero eval period": (lambda t, o, tmp: t, ["--eval_every", "0"], "--eval_every must be > 0"),
    "negative noise": (lambda t, o, tmp: t, ["--noise_level", "-0.1"], "--noise_level must be >= 0"),
    "no trained step": (lambda t, o, tmp: t, ["--timestep_fraction", "0"], "--timestep_fraction must be in"),
    "trained step out of range": (lambda t, o, tmp: t, ["--train_steps", "7"], "outside 0..2"),
    "unknown dtype": (lambda t, o, tmp: t, ["--dtype", "float16"], "--dtype must be"),
    "guidance not a number": (lambda t, o, tmp: t, ["--teacher_cfg", "ocr=high"], "must be a number"),
    "override of no teacher's task": (lambda t, o, tmp: t, ["--teacher_cfg", "art=2"], "unknown task"),
    "unknown recipe": (lambda t, o, tmp: t, ["--recipe", "fast"], "--recipe must be"),
    "cuda without a GPU": (lambda t, o, tmp: t, ["--device", "cuda"], "no CUDA device"),
    "unknown device": (lambda t, o, tmp: t, ["--device", "tpu"], "--device must be"),
    "EMA decay of 1": (lambda t, o, tmp: t, ["--ema_decay", "1"], "--ema_decay must be in"),
}


@pytest.mark.parametrize("case", sorted(OPD_CASES))
def test_opd_bad_inputs(case, teachers, odd_teachers, tmp_path, no_model_load):
    if case == "cuda without a GPU":
        pytest.importorskip("torch").cuda.is_available() and pytest.skip("this machine has a GPU")
    make, extra, match = OPD_CASES[case]
    args = opd_args(make(teachers, odd_teachers, tmp_path), tmp_path / "run", *extra)
    _one_line_error(lambda: opd.main(args), match)
    assert not (tmp_path / "run").exists()


def test_opd_run_directory_errors(teachers, tmp_path, monkeypatch):
    """An --out that is a file, holds another run, or holds this run without --resume."""
    (tmp_path / "file").write_text("x")
    _one_line_error(lambda: opd.main(opd_args(teachers, tmp_path / "file", "--steps", "1")), "is a file")
    opd.main(opd_args(teachers, tmp_path / "run", "--steps", "1"))
    _one_line_error(lambda: opd.main(opd_args(teachers, tmp_path / "run", "--steps", "1")), "pass --resume")
    _one_line_error(lambda: opd.main(opd_args(teachers, tmp_path / "run", "--steps", "1", "--seed", "1")),
                    r"different run \(config differs in \['seed'\]\)")
    _one_line_error(lambda: opd.main(opd_args(teachers, tmp_path / "run", "--steps", "1", "--seed", "1", "--resume")),
                    r"was trained with other values; resume it with --seed 0, or choose another --out")
    moved = tmp_path / "moved"
    (tmp_path / "run").rename(moved)  # a moved run directory resumes
    opd.main(opd_args(teachers, moved, "--steps", "2", "--resume"))
    assert json.loads((moved / "checkpoint" / "run_config.json").read_text())["step"] == 2


def _grpo_args(model, out, *extra):
    return ["--model", model, "--task", "geneval", "--dataset", "data/toy/geneval", "--reward", "jpeg_incompressibility=1", "--out", str(out),
            "--batch", "8", "--group_size", "4", "--num_steps", "3", "--height", "0", "--width", "0", *extra]


GRPO_CASES = {
    "missing model": (["--model", "/nonexistent/model"], "does not exist"),
    "not a pipeline folder": (["--model", "."], "no model_index.json"),
    "missing dataset": (["--dataset", "/nonexistent/data"], "does not exist"),
    "unknown reward": (["--reward", "beauty=1"], "unknown reward"),
    "group of one": (["--group_size", "1"], "--group_size must be >= 2"),
    "group not dividing the batch": (["--group_size", "3"], "does not divide"),
    "updates not dividing the batch": (["--updates_per_rollout", "3"], "does not split into 3 updates"),
    "deterministic sampler": (["--noise_level", "0"], "--noise_level must be > 0"),
    "unknown ratio": (["--ratio_logp", "max"], "--ratio_logp must be"),
    "odd resolution": (["--height", "33"], "not divisible"),
    "zero save period": (["--save_every", "0"], "--save_every must be > 0"),
    "zero batch": (["--batch", "0"], "--batch must be > 0"),
    "fraction above 1": (["--timestep_fraction", "1.5"], "--timestep_fraction must be in"),
    "negative KL weight": (["--kl_beta", "-1"], "--kl_beta must be >= 0"),
    "missing init adapter": (["--init_lora", "/nonexistent/lora"], "has no adapter_config.json"),
    "cuda without a GPU": (["--device", "cuda"], "no CUDA device"),
    "zero steps": (["--num_steps", "0"], "--num_steps must be > 0"),
}


@pytest.mark.parametrize("case", sorted(GRPO_CASES))
def test_teacher_rl_bad_inputs(case, tiny_pipe_dir, tmp_path, no_model_load):
    if case == "cuda without a GPU":
        pytest.importorskip("torch").cuda.is_available() and pytest.skip("this machine has a GPU")
    extra, match = GRPO_CASES[case]
    _one_line_error(lambda: teacher_rl.main(_grpo_args(tiny_pipe_dir, tmp_path / "run", *extra)), match)
    assert not (tmp_path / "run").exists()


SAMPLE_CASES = {
    "missing LoRA": (["--lora", "/nonexistent/lora"], "has no adapter_config.json"),
    "missing output folder": (["--out", "/nonexistent/dir/grid.png"], "does not exist"),
    "not a PNG": (["--out", "grid.jpg"], "ending in .png"),
    "odd resolution": (["--height", "33"], "not divisible"),
    "missing model": (["--model", "/nonexistent/model"], "does not exist"),
    "zero steps": (["--num_steps", "0"], "--num_steps must be > 0"),
}


@pytest.mark.parametrize("case", sorted(SAMPLE_CASES))
def test_sample_bad_inputs(case, tiny_pipe_dir, tmp_path, no_model_load, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra, match = SAMPLE_CASES[case]
    _one_line_error(lambda: sample.main(["--model", tiny_pipe_dir, "--prompts", "a cat", *extra]), match)
    assert not list(tmp_path.iterdir())


def test_sample_without_a_prompt_says_how_to_give_one(tiny_pipe_dir, tmp_path, no_model_load, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _one_line_error(lambda: sample.main(["--model", tiny_pipe_dir]), "no prompt given: --prompts")
    assert not list(tmp_path.iterdir())
