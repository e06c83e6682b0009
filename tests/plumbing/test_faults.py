"""What a user does to a run never loses its history (run locks, crash-safe logs, every bad
input named). Each case is a tiny run; the kinds of faults:

- two processes on one --out: the second fails at once, naming the first one's PID (an OS lock on
  out/.lock that dies with its process, so a killed run leaves none behind);
- a kill at any instant of resume's rewrite of metrics.jsonl, or a torn last line from a kill mid-append:
  every earlier step's metrics survive and the next resume carries on;
- a malformed JSON or JSONL file the project reads: one line naming the file (and line);
- a bad GenEval metadata field, an unreachable reward server, an unwritable or file-blocked --out,
  --steps 0, an unknown hub id: one line before any model loads, nothing left behind;
- Ctrl-C and a full disk (torch.save's too): one line saying what was kept and the command that resumes;
  the resume is exact;
- SIGTERM (a preemption) on 1 and 2 ranks: the step it arrives in is saved, exit 143, and the printed
  command resumes; a rank that stops answering (SIGSTOP): the others end within the collective timeout,
  naming it;
- every command a stop prints runs as printed (the start again before a first checkpoint, the non-finite
  stop's lower learning rate); a resume after a recipe changed keeps the run's value; a teacher by
  another path to the same folder is the same run;
- named before anything loads: a prompt file's non-UTF-8 byte, an OCR prompt without its quoted target,
  a teacher or a table's adapter of another base, a base whose stored weights changed; a teacher's
  non-finite weights when it loads; no leftovers in a folder the run did not make;
- study.table: the same rules (nothing left behind, one line)."""
import errno
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file

import teacher_rl
from model import FlowModel
from study import table as table_cli
from plumbing import durable, rundir

DATA = "data/toy/geneval"


def _args(model, out, *extra):
    return ["--model", model, "--task", "geneval", "--dataset", DATA, "--reward", "test_brightness=1", "--out", str(out),
            "--batch", "4", "--group_size", "2", "--num_steps", "2", "--rollout_batch", "4", "--train_batch", "4",
            "--lora_rank", "4", "--lora_alpha", "8", "--eval_every", "100", "--eval_prompts", "2", "--eval_steps", "2",
            "--ema_every", "1", "--timestep_fraction", "0.5", "--height", "0", "--width", "0", "--save_every", "1",
            "--steps", "2", *extra]


def _one_line(call, match):
    with pytest.raises(SystemExit, match=match) as e:
        call()
    assert str(e.value).startswith("error: ") and "\n" not in str(e.value), e.value
    return str(e.value)


def _metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def _no_sec(records):
    """The training metrics of every step: timings and evaluations (a shorter run evaluates its last
    step, the one it stopped at) left out."""
    return [{k: v for k, v in r.items() if not k.startswith(("sec/", "eval/"))} for r in records]


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the fault was reported")
    monkeypatch.setattr(FlowModel, "load", refuse)


@pytest.fixture(scope="module")
def full_run(tiny_pipe_dir, tmp_path_factory):
    """The uninterrupted 2-step run every interrupted one must end equal to."""
    out = tmp_path_factory.mktemp("full") / "run"
    teacher_rl.main(_args(tiny_pipe_dir, out))
    return out


def _same_run(a, b):
    wa, wb = (load_file(Path(r) / "checkpoint" / "raw_weights.safetensors") for r in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert _no_sec(_metrics(a)) == _no_sec(_metrics(b))


# ---------------------------------------------------------------------- one run per folder
def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that holds the run lock of `folder`, as a run in it does."""
    folder.mkdir(parents=True, exist_ok=True)
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); print('held', flush=True); "
            "time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder / rundir.LOCK)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.parametrize("second", [[], ["--seed", "1"]], ids=["same config", "another seed"])
def test_a_second_run_on_the_same_folder_fails_at_once_naming_the_first(second, tiny_pipe_dir, tmp_path,
                                                                        no_model_load):
    holder = _hold_lock(tmp_path / "run")
    try:
        _one_line(lambda: teacher_rl.main(_args(tiny_pipe_dir, tmp_path / "run", *second)),
                  rf"--out .*run is in use by another run \(PID {holder.pid}\)")
    finally:
        holder.kill()
        holder.wait()
    assert [p.name for p in (tmp_path / "run").iterdir()] == [rundir.LOCK]  # nothing of the second run
    fd = os.open(tmp_path / "run" / rundir.LOCK, os.O_RDWR)  # the lock died with its process
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)


def test_the_run_lock_is_held_for_the_whole_run_and_gone_with_it(tiny_pipe_dir, tmp_path, monkeypatch):
    seen = []
    real = rundir.RunDir.log

    def log(self, metrics, images=None):  # during the run: another process finds the lock taken
        # exit 3: the lock exists and is held (a missing lock file is a traceback, exit 1)
        code = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR)\n"
                "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
                "except BlockingIOError:\n    sys.exit(3)")
        seen.append(subprocess.run([sys.executable, "-c", code, str(self.path / rundir.LOCK)],
                                   stderr=subprocess.DEVNULL).returncode)
        return real(self, metrics, images)
    monkeypatch.setattr(rundir.RunDir, "log", log)
    teacher_rl.main(_args(tiny_pipe_dir, tmp_path / "run", "--steps", "1"))
    assert seen == [3]
    fd = os.open(tmp_path / "run" / rundir.LOCK, os.O_RDWR)  # and free once the run has ended
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)


# ---------------------------------------------------------------------- logs that survive a kill
class Killed(BaseException):
    """Stands for SIGKILL: nothing in the scripts catches it."""


@pytest.mark.parametrize("point", range(4))
def test_a_kill_during_resumes_metrics_rewrite_loses_no_history(point, tiny_pipe_dir, full_run, tmp_path,
                                                                monkeypatch):
    """Killed before each disk operation of the rewrite (write, fsync, rename, fsync of the folder), the
    next resume still holds every earlier step and ends equal to the uninterrupted run."""
    run = tmp_path / "run"
    teacher_rl.main(_args(tiny_pipe_dir, run, "--steps", "1"))
    with open(run / "metrics.jsonl", "a") as f:  # a line past the checkpoint, which the rewrite cuts
        f.write(json.dumps({"step": 1, "reward_mean": 0.5}) + "\n")
    kept = (run / "metrics.jsonl").read_text().splitlines()[0]

    def killed_write(path, text):  # rundir.write_atomic's steps, killed before step `point`
        tmp = path.with_name(path.name + ".tmp")
        steps = [lambda: tmp.write_text(text), lambda: durable.fsync(tmp), lambda: os.replace(tmp, path),
                 lambda: durable.fsync(path.parent)]
        for k, do in enumerate(steps):
            if k == point:
                raise Killed(f"before step {k} of the rewrite")
            do()
    with monkeypatch.context() as m:
        m.setattr(rundir, "write_atomic", killed_write)
        with pytest.raises(Killed):
            teacher_rl.main(_args(tiny_pipe_dir, run, "--resume"))
        rundir._CLAIMED[-1].release()  # what the killed process's exit would do
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert lines[0] == kept  # the history survives every kill point
    teacher_rl.main(_args(tiny_pipe_dir, run, "--resume"))
    _same_run(full_run, run)


def test_a_torn_last_line_is_dropped_by_readers_and_by_resume(tiny_pipe_dir, full_run, tmp_path):
    from study.plots import read_metrics
    run = tmp_path / "run"
    teacher_rl.main(_args(tiny_pipe_dir, run, "--steps", "1"))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 1, "reward_mean": 0.5')  # a kill in the middle of the next append
    assert [r["step"] for r in read_metrics(str(run))] == [0]
    teacher_rl.main(_args(tiny_pipe_dir, run, "--resume"))
    _same_run(full_run, run)


# ---------------------------------------------------------------------- every JSON file named
def _damage(path: Path, text='{"task": "ocr", "reward": "unterminated\n'):
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def a_teacher(tiny_pipe_dir, tmp_path_factory):
    from test_opd import _teacher
    return Path(_teacher(tiny_pipe_dir, tmp_path_factory.mktemp("teacher") / "teacher", "ocr", 1))


def test_malformed_json_files_are_named_with_their_line(tiny_pipe_dir, a_teacher, tmp_path, no_model_load):
    import opd
    from test_opd import _args as opd_args
    teacher = tmp_path / "teacher"
    shutil.copytree(a_teacher, teacher)
    _damage(teacher / "run_config.json")
    _one_line(lambda: opd.main(opd_args([str(teacher)], tmp_path / "o1")),
              r"teacher file .*teacher/run_config.json is not valid JSON \(line 1 column 40.*copy the teacher")
    data = tmp_path / "data"
    shutil.copytree(DATA, data)
    _damage(data / "task.json")
    _one_line(lambda: teacher_rl.main(_args(tiny_pipe_dir, tmp_path / "o2", "--dataset", str(data), "--reward", "")),
              r"task file .*data/task.json is not valid JSON")
    shutil.copy(Path(DATA) / "task.json", data / "task.json")
    lines = (data / "train_metadata.jsonl").read_text().splitlines()
    (data / "train_metadata.jsonl").write_text("\n".join(lines[:2] + ['{"prompt": "x"'] + lines[3:]) + "\n")
    _one_line(lambda: teacher_rl.main(_args(tiny_pipe_dir, tmp_path / "o3", "--dataset", str(data))),
              r"metadata file .*train_metadata.jsonl line 3 is not valid JSON")
    pipe = tmp_path / "pipe"
    shutil.copytree(tiny_pipe_dir, pipe)
    _damage(pipe / "model_index.json")
    _one_line(lambda: teacher_rl.main(_args(str(pipe), tmp_path / "o4")), r"pipeline index .*model_index.json is not valid")
    for out in ("o1", "o2", "o3", "o4"):
        assert not (tmp_path / out).exists()


def test_a_damaged_run_config_or_manifest_is_named(tiny_pipe_dir, tmp_path):
    run = tmp_path / "run"
    teacher_rl.main(_args(tiny_pipe_dir, run, "--steps", "1"))
    manifest = run / "checkpoint" / durable.MANIFEST
    saved = manifest.read_text()
    manifest.write_text(json.dumps({"step": 1}))  # no "files"
    _one_line(lambda: teacher_rl.main(_args(tiny_pipe_dir, run, "--resume")), "lacks its 'files' or 'step' entry")
    manifest.write_text(saved)
    _damage(run / "config.json")
    _one_line(lambda: teacher_rl.main(_args(tiny_pipe_dir, run, "--resume")),
              r"the run's config .*config.json is not valid JSON.*another --out")


# ---------------------------------------------------------------------- late failures made early
def test_bad_inputs_that_used_to_fail_after_loading_fail_before(tiny_pipe_dir, tmp_path, no_model_load, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(DATA, data)
    lines = [json.loads(line) for line in (data / "train_metadata.jsonl").read_text().splitlines()]
    lines[4]["include"][0]["count"] = "2"  # a string where GenEval needs an integer
    (data / "train_metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    _one_line(lambda: teacher_rl.main(_args(tiny_pipe_dir, tmp_path / "o1", "--dataset", str(data))),
              r"train_metadata.jsonl line 5: include\[0\] 'count' must be an integer >= 1, got '2'")
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    _one_line(lambda: teacher_rl.main(_args(tiny_pipe_dir, tmp_path / "o2", "--reward", "http=1")),
              "REWARD_SERVER_URL")
    monkeypatch.setenv("REWARD_SERVER_URL", f"http://127.0.0.1:{port}")
    _one_line(lambda: teacher_rl.main(_args(tiny_pipe_dir, tmp_path / "o2", "--reward", "http=1")),
              rf"reward server http://127.0.0.1:{port} is not reachable")
    _one_line(lambda: teacher_rl.main(_args(tiny_pipe_dir, tmp_path / "o3", "--steps", "0")), "--steps must be > 0")
    (tmp_path / "file").write_text("x")
    _one_line(lambda: teacher_rl.main(_args(tiny_pipe_dir, tmp_path / "file" / "run")),
              r"--out .*file/run cannot be created or written")
    _one_line(lambda: teacher_rl.main(_args("nobody/no-such-model-here", tmp_path / "o4")),
              "model nobody/no-such-model-here is not in the local hub cache and HF_HUB_OFFLINE is set")
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **k: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only "
                        "file system")) if str(path).endswith(rundir.LOCK) else real_open(path, *a, **k))
    _one_line(lambda: teacher_rl.main(_args(tiny_pipe_dir, tmp_path / "o5")),
              r"--out .*o5 cannot be created or written \(Read-only file system\)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "file"]


# ---------------------------------------------------------------------- Ctrl-C and a full disk
def _stop_at_step(monkeypatch, step: int, error: BaseException):
    real = rundir.RunDir.log

    def log(self, metrics, images=None):
        if metrics["step"] == step:
            raise error
        return real(self, metrics, images)
    monkeypatch.setattr(rundir.RunDir, "log", log)


def test_ctrl_c_says_what_was_kept_and_how_to_resume_and_the_resume_is_exact(tiny_pipe_dir, full_run, tmp_path,
                                                                              monkeypatch, capsys):
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _stop_at_step(m, 1, KeyboardInterrupt())
        with pytest.raises(SystemExit) as e:
            teacher_rl.main(_args(tiny_pipe_dir, run))
    assert e.value.code == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("interrupted: the checkpoint of step 1 in") and line.endswith("--resume"), line
    assert "python teacher_rl.py --model" in line and "Traceback" not in line
    teacher_rl.main(_args(tiny_pipe_dir, run, "--resume"))
    _same_run(full_run, run)


def test_a_full_disk_during_a_save_says_what_was_kept_and_the_resume_is_exact(tiny_pipe_dir, full_run, tmp_path,
                                                                               monkeypatch, capsys):
    run = tmp_path / "run"
    real = safetensors.torch.save_file
    saves = {"n": 0}

    def full(tensors, path, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] > 3:  # the second checkpoint: after its first files
            raise safetensors.SafetensorError("Error while serializing: No space left on device (os error 28)")
        return real(tensors, path, *args, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(rundir, "save_file", full)
        with pytest.raises(SystemExit) as e:
            teacher_rl.main(_args(tiny_pipe_dir, run))
    assert e.value.code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("the disk is full: the checkpoint of step 1 in") and "free some space, then resume with:" \
        in line and line.endswith("--resume"), line
    teacher_rl.main(_args(tiny_pipe_dir, run, "--resume"))
    _same_run(full_run, run)


# ---------------------------------------------------------------------- study.table
TABLE_CASES = {
    "zero batch": (["--batch", "0"], "--batch must be > 0"),
    "zero prompts": (["--prompts", "0"], "--prompts must be > 0"),
    "cuda without a GPU": (["--device", "cuda"], "no CUDA device"),
    "missing adapter": (["--models", "x=models/toy-sd3+/nonexistent"], "neither a PEFT LoRA folder"),
    "unknown task": (["--tasks", "nope"], "dataset folder dataset/nope does not exist"),
    "out is a file": (["--out", "FILE"], "is a file"),
}


@pytest.mark.parametrize("case", sorted(TABLE_CASES))
def test_study_table_bad_inputs_leave_nothing(case, tiny_pipe_dir, tmp_path, no_model_load):
    if case == "cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    (tmp_path / "FILE").write_text("x")
    extra, match = TABLE_CASES[case]
    args = ["--models", f"base={tiny_pipe_dir}", "--tasks", "ocr", "--out", str(tmp_path / "out"), "--height", "0",
            "--width", "0", *(["--datasets", "ocr=data/toy/ocr"] if case != "unknown task" else []),
            *[str(tmp_path / "FILE") if a == "FILE" else a for a in extra]]
    _one_line(lambda: table_cli.main(args), match)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"]


# ---------------------------------------------------------------------- preemption, stuck ranks
REPO = Path(__file__).resolve().parents[2]
JPEG = ["--reward", "jpeg_incompressibility=1"]  # a reward any fresh `python teacher_rl.py` has


def _ranks(fault: str, argv: list[str], world: int, timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """tests/plumbing/fault_runner.py on `world` ranks started as plain processes with torchrun's environment."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, str(REPO / "tests" / "plumbing" / "fault_runner.py"), fault, *argv], cwd=REPO,
                              env={**os.environ, "WORLD_SIZE": str(world), "RANK": str(r), "LOCAL_RANK": str(r),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    return procs


def _printed_command(line: str) -> list[str]:
    """The command a one-line stop prints (after "with: "), as argv for this machine's python."""
    import shlex
    words = shlex.split(line.split("with: ", 1)[1])
    assert words[:2] == ["python", "teacher_rl.py"], words
    return [sys.executable, *words[1:]]


@pytest.mark.parametrize("world", [1, 2])
def test_sigterm_saves_the_step_it_arrives_in_and_the_printed_command_resumes_exactly(world, tiny_pipe_dir,
                                                                                      tmp_path):
    """SIGTERM (a preemption's notice) to rank 0 at the end of step 0 of a run that saves only at its end:
    every rank saves step 1 and stops (exit 143, one line); the printed command resumes to the
    uninterrupted run."""
    full, run = tmp_path / "full", tmp_path / "run"
    teacher_rl.main(_args(tiny_pipe_dir, full, "--steps", "3", "--save_every", "10", *JPEG))
    procs = _ranks("sigterm:0:0", _args(tiny_pipe_dir, run, "--steps", "3", "--save_every", "10", *JPEG), world)
    done = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert [rc for rc, _ in done] == [143] * world, done[0][1][-2000:]
    line = done[0][1].strip().splitlines()[-1]
    assert line.startswith("terminated (SIGTERM) at the end of a step: the checkpoint of step 1 in") and \
        "(it holds every step done)" in line and line.endswith("--resume"), line
    again = subprocess.run(_printed_command(line), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    if world == 1:
        _same_run(full, run)
    else:  # resumed on 1 process: the same steps, to float32 rounding of other batch shapes (test_ranks.py)
        assert [r["step"] for r in _metrics(run)] == [0, 1, 2]


def test_a_rank_that_stops_answering_ends_the_run_in_bounded_time_naming_it(tiny_pipe_dir, tmp_path):
    import time
    procs = _ranks("freeze:1:1", _args(tiny_pipe_dir, tmp_path / "run", "--steps", "3", "--collective_timeout_s", "8"),
                   2)
    start = time.perf_counter()
    try:
        rc = procs[0].wait(timeout=90)
        seconds = time.perf_counter() - start
        err = procs[0].stderr.read()
    finally:
        procs[1].kill()  # a stopped process still dies of SIGKILL, as the launcher would kill it
        procs[1].wait()
    line = err.strip().splitlines()[-1]
    assert rc == 1 and seconds < 60, (rc, seconds, err[-2000:])
    # rank 1 stopped as step 1 ended; rank 0 saved step 2 and waited for it at the save's barrier
    assert line.startswith("a collective timed out: rank 1 did not answer within --collective_timeout_s") and \
        "the checkpoint of step 2 in" in line and line.endswith("--resume"), line
    assert durable.read_manifest(tmp_path / "run" / "checkpoint")[0] == 2


# ---------------------------------------------------------------------- the printed remedies work
def test_an_interruption_before_the_first_checkpoint_prints_a_start_that_works(tiny_pipe_dir, tmp_path, monkeypatch,
                                                                               capsys):
    run = tmp_path / "new" / "run"  # its parent made by the run, too
    with monkeypatch.context() as m:
        _stop_at_step(m, 0, KeyboardInterrupt())
        with pytest.raises(SystemExit):
            teacher_rl.main(_args(tiny_pipe_dir, run, "--save_every", "10", *JPEG))
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("interrupted before the first checkpoint; start again with: python teacher_rl.py"), line
    assert not (tmp_path / "new").exists()  # what the run made is gone: the same command starts again
    again = subprocess.run(_printed_command(line.replace("start again with", "with")), cwd=REPO, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]


def test_the_non_finite_stop_prints_a_resume_with_a_lower_lr_that_works(tiny_pipe_dir, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    teacher_rl.main(_args(tiny_pipe_dir, run, "--steps", "1", "--lr", "1e-3", *JPEG))
    with monkeypatch.context() as m:  # every loss NaN from here on
        m.setattr(teacher_rl, "grpo_loss", lambda *a, **k: (a[0].flatten(1).sum(1) * float("nan"),
                                                             torch.ones(len(a[0])), None))
        line = _one_line(lambda: teacher_rl.main(_args(tiny_pipe_dir, run, "--steps", "4", "--max_skipped_steps", "2",
                                                       "--lr", "1e-3", "--resume", *JPEG)), "non-finite")
    assert "resume with a lower learning rate: python teacher_rl.py" in line and "--lr 0.0001 --resume" in line, line
    again = subprocess.run(_printed_command(line.split("learning rate: ", 1)[0] + "with: " +
                                            line.split("learning rate: ", 1)[1]), cwd=REPO, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 and "lr: 0.001 -> 0.0001" in again.stderr, again.stderr[-2000:]
    assert json.loads((run / "config.json").read_text())["lr"] == 0.0001


def test_resume_after_a_recipe_changed_keeps_the_runs_value(tiny_pipe_dir, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(tiny_pipe_dir, base)
    recipe = {"teacher_rl": {"kl_beta": {"value": 0.02, "reason": "a test"}}}
    (base / "recipe.json").write_text(json.dumps(recipe))
    args = [a for a in _args(str(base), tmp_path / "run", "--steps", "1") if a not in ("--kl_beta",)]
    teacher_rl.main(args)
    recipe["teacher_rl"]["kl_beta"]["value"] = 0.03  # the recipe changed since the run started
    (base / "recipe.json").write_text(json.dumps(recipe))
    teacher_rl.main([*args, "--steps", "2", "--resume"])
    assert "kl_beta = 0.02 kept from the run (0.03 is today's recipe or default)" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["kl_beta"] == 0.02


def test_a_teacher_by_another_path_to_the_same_folder_resumes_the_same_run(tmp_path):
    import opd
    small = ["--prompts_per_batch", "2", "--num_steps", "2", "--eval_prompts", "1", "--eval_steps", "2",
             "--save_every", "1", "--out", str(tmp_path / "run")]
    opd.main(["--teachers", "ckpts/toy-ocr", "--steps", "1", *small])
    opd.main(["--teachers", str(REPO / "ckpts" / "toy-ocr"), "--steps", "2", "--resume", *small])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["teachers"] == ["ckpts/toy-ocr"]


# ---------------------------------------------------------------------- named before anything loads
def test_inputs_named_before_anything_loads(tiny_pipe_dir, tmp_path, no_model_load):
    data = tmp_path / "data"
    shutil.copytree(DATA, data)
    (data / "train.txt").write_bytes((data / "train.txt").read_bytes().replace(b"\n", b"\ncaf\xe9\n", 1))
    _one_line(lambda: teacher_rl.main(_args(tiny_pipe_dir, tmp_path / "o1", "--dataset", str(data))),
              r"data/train.txt line 2 is not UTF-8 \(byte 0xe9\): save the file as UTF-8")
    ocr = tmp_path / "ocr"
    ocr.mkdir()
    (ocr / "train.txt").write_text('a sign that says "A7"\n')
    (ocr / "test.txt").write_text('a sign that says "B2"\na sign with no quotes\n')
    _one_line(lambda: teacher_rl.main(_args(tiny_pipe_dir, tmp_path / "o2", "--dataset", str(ocr), "--reward", "ocr=1")),
              r"ocr/test.txt line 2: 'a sign with no quotes' has no double-quoted text")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "ocr"]


def test_an_adapter_of_another_base_is_refused_before_anything_loads(tiny_pipe_dir, tmp_path, monkeypatch):
    """A teacher (opd.py) and a table's adapter (study.table) trained on another base: refused from their
    record of its stored weights, before any model loads."""
    import opd
    from test_opd import _args as opd_args
    from test_opd import _teacher
    from toy.pipeline import build_tiny_pipeline
    other = tmp_path / "other"
    build_tiny_pipeline(seed=9).save_pretrained(other)
    foreign = _teacher(str(other), tmp_path / "foreign", "ocr", 5)
    monkeypatch.setattr(FlowModel, "load", lambda *a, **k: pytest.fail("a model loaded"))
    _one_line(lambda: opd.main(opd_args([foreign], tmp_path / "o3", "--model", tiny_pipe_dir)),
              r"adapter .*foreign was trained on another base model: the stored weights of its .*transformer")
    _one_line(lambda: table_cli.main(["--models", f"x={tiny_pipe_dir}+{foreign}", "--tasks", "ocr", "--out",
                                      str(tmp_path / "o4"), "--height", "0", "--width", "0",
                                      "--datasets", "ocr=data/toy/ocr"]),
              "was trained on another base model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "other"]


def test_a_teacher_with_non_finite_weights_is_named_when_it_loads(tiny_pipe_dir, a_teacher, tmp_path):
    import opd
    from test_opd import _args as opd_args
    teacher = tmp_path / "teacher"
    shutil.copytree(a_teacher, teacher)
    weights = load_file(teacher / "adapter_model.safetensors")
    key = sorted(weights)[0]
    weights[key][0, 0] = float("nan")
    safetensors.torch.save_file(weights, teacher / "adapter_model.safetensors")
    _one_line(lambda: opd.main(opd_args([str(teacher)], tmp_path / "run")),
              rf"LoRA .*teacher' holds non-finite weights \(1 values in 1 tensors, e.g. {key.removeprefix('base_model.model.')}\)")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change", ["a block's attention weight", "every text-encoder weight"])
def test_a_resume_onto_a_base_whose_weights_changed_is_refused_naming_them(change, tiny_pipe_dir, tmp_path):
    base, run = tmp_path / "base", tmp_path / "run"
    shutil.copytree(tiny_pipe_dir, base)
    teacher_rl.main(_args(str(base), run, "--steps", "1"))
    if change == "a block's attention weight":  # as when a LoRA is merged into the base
        files, names = [base / "transformer" / "diffusion_pytorch_model.safetensors"], ["transformer"]
        edit = {"transformer_blocks.1.attn.to_q.weight": lambda w: w + 0.01}
    else:
        files = [base / n / "model.safetensors" for n in ("text_encoder", "text_encoder_2", "text_encoder_3")]
        names, edit = ["text_encoder", "text_encoder_2", "text_encoder_3"], None
    for f in files:
        weights = load_file(f)
        for k in weights:
            if edit is None or k in edit:
                weights[k] = (edit[k] if edit else (lambda w: w * 1.05))(weights[k])
        safetensors.torch.save_file(weights, f)
    message = _one_line(lambda: teacher_rl.main(_args(str(base), run, "--steps", "2", "--resume")),
                        "was trained on another base model: the stored weights of its")
    assert message.split("its ")[1].startswith(", ".join(names)), message


# ---------------------------------------------------------------------- a full disk, leftovers
def test_a_full_disk_inside_torch_save_stops_with_the_resume_line(tiny_pipe_dir, full_run, tmp_path, monkeypatch,
                                                                 capsys):
    run = tmp_path / "run"
    real, saves = torch.save, {"n": 0}

    def full(obj, path, *a, **k):
        saves["n"] += 1
        if saves["n"] == 2:  # the second checkpoint's trainer state
            raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file "
                               "data/3: file write failed")
        return real(obj, path, *a, **k)
    with monkeypatch.context() as m:
        m.setattr(torch, "save", full)
        with pytest.raises(SystemExit) as e:
            teacher_rl.main(_args(tiny_pipe_dir, run))
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 1 and line.startswith("the disk is full: the checkpoint of step 1 in") and \
        line.endswith("--resume"), line
    teacher_rl.main(_args(tiny_pipe_dir, run, "--resume"))
    _same_run(full_run, run)


def test_a_full_disk_at_start_and_refusals_leave_nothing_in_folders_the_run_did_not_make(tiny_pipe_dir, tmp_path,
                                                                                         monkeypatch):
    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(rundir, "write_atomic", full)  # config.json, written atomically at the first start
        with pytest.raises(SystemExit) as e:
            teacher_rl.main(_args(tiny_pipe_dir, tmp_path / "a" / "run"))
    assert e.value.code == 1 and not (tmp_path / "a").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's file")
    _one_line(lambda: teacher_rl.main(_args(tiny_pipe_dir, mine)), "is not empty and holds no run")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]  # no .lock written into it
    monkeypatch.setenv("AESTHETIC_MLP", str(tmp_path / "missing.pth"))  # fails after --out is claimed
    _one_line(lambda: teacher_rl.main(_args(tiny_pipe_dir, tmp_path / "b" / "c" / "run", "--reward", "aesthetic=1")),
              "MLP weights not found")
    assert not (tmp_path / "b").exists()


def test_a_dry_run_names_the_reward_file_that_is_missing(tiny_pipe_dir, tmp_path, no_model_load, monkeypatch):
    from test_rewards import save_tiny_clip
    clip = Path(save_tiny_clip(tmp_path / "clip", seed=0))
    for weights in clip.glob("model*.safetensors"):
        weights.unlink()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CLIP_MODEL", str(clip))
    line = _one_line(lambda: teacher_rl.main(_args(tiny_pipe_dir, tmp_path / "o", "--reward", "clipscore=1", "--dry_run")),
                     "clipscore reward: a file it needs is not here and HF_HUB_OFFLINE is set")
    assert str(clip) in line and "model.safetensors" in line
    assert not (tmp_path / "o").exists()
