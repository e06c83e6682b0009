"""1 rank = 2 ranks: every script's updates, metrics and evaluation are the same on 2 gloo ranks as on
one process with the same global batch (student.py departure 2; teacher_rl.py departure 3). All 2-rank
runs share one torchrun launch (tests/plumbing/ranks_runner.py), so the suite pays one start-up for them.

Tolerances. The two runs compute the same float32 quantities with other batch shapes, so their
rounding differs (~1e-6 relative here, more on some CPUs). Logged numbers (losses, rewards, grad
norms) are compared to 1e-3 relative: a layout bug changes them by O(1), a gradient off by the world
size by 2x. Weights are compared as the whole update, ||w_1 - w_2|| <= 0.05 ||w_1 - w_init||: Adam divides
each coordinate's gradient by its own size, so a coordinate whose gradient is at rounding level can
move by up to lr either way in one run and not the other (one such coordinate is ~0.03 of the update
here); wrong images or a wrong reduction change the whole update."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import nft
import opd
import teacher_rl
from study import table as table_cli
from test_evaluate import _adapter, _cli_args, _write_run
from test_nft import _guard_args, _nft_args
from test_opd import _args as opd_args
from test_opd import _teacher
from test_teacher_rl import _args as grpo_args

ROOT = Path(__file__).resolve().parents[2]
REL = 1e-3


def _dataset(path: Path, prompts: list[str]) -> str:
    path.mkdir(parents=True)
    for split in ("train", "test"):
        (path / f"{split}.txt").write_text("".join(p + "\n" for p in prompts))
    (path / "task.json").write_text(json.dumps({"reward": "test_brightness=1"}))
    return str(path)


@pytest.fixture(scope="module")
def inputs(tiny_pipe_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks")
    # one cat and one dog prompt: every step's dog group has advantage 0 (fakes.test_brightness), and on
    # 2 ranks the rank that holds it has nothing to train
    pets = _dataset(root / "pets", ["a red cat", "the dog"])
    cats = _dataset(root / "cats", ["a red cat", "a blue cat", "the cat", "a cat"])
    teachers = [_teacher(tiny_pipe_dir, root / "geneval", "geneval", 1), _teacher(tiny_pipe_dir, root / "ocr", "ocr", 2)]
    adapter = _adapter(tiny_pipe_dir, root / "lora")
    runs = [_write_run(root / "r1", [{"step": 0, "sec/train": 90.0, "reward_mean": 0.3, "eval/reward": 0.2}],
                       task="geneval"),
            _write_run(root / "r2", [{"step": 0, "sec/train": 30.0, "eval/geneval/reward": 0.4,
                                      "eval/aesthetic/reward": 0.1}])]
    brightness = ["--reward", "test_brightness=1"]
    jobs = {
        "grpo": ("teacher_rl", lambda out: grpo_args(tiny_pipe_dir, out, "--steps", "2", "--dataset", pets, *brightness)),
        "guard": ("teacher_rl", lambda out: _guard_args(tiny_pipe_dir, out, "--steps", "2", "--dataset", cats,
                                                        *brightness)),
        "nft": ("nft", lambda out: _nft_args(tiny_pipe_dir, out, "--steps", "2", "--dataset", cats, *brightness)),
        # an odd number of test prompts: every one is evaluated on 2 ranks too
        "opd": ("opd", lambda out: opd_args(teachers, out, "--steps", "2", "--eval_prompts", "3")),
        "table": ("study.table", lambda out: [*_cli_args(tiny_pipe_dir, adapter, runs, out), "--prompts", "5"]),
        "local_first": ("local_first_probe", lambda out: [out]),
    }
    (root / "jobs.json").write_text(json.dumps([{"name": name, "module": module, "argv": argv(str(root / "two" / name))}
                                                for name, (module, argv) in jobs.items()]))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "tests" / "plumbing" / "ranks_runner.py"), str(root / "jobs.json"), str(root / "calls.json")],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    calls = [json.loads((root / f"calls.json.{r}").read_text()) for r in range(2)]
    return {"root": root, "jobs": jobs, "calls": calls}


def _one_and_two(inputs, name):
    """Run job `name` on one rank here (in this process) and return both run folders."""
    module, argv = inputs["jobs"][name]
    one = inputs["root"] / "one" / name
    {"teacher_rl": teacher_rl, "nft": nft, "opd": opd, "study.table": table_cli}[module].main(argv(str(one)))
    return one, inputs["root"] / "two" / name


def _metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def _init_lora(tiny_pipe_dir):
    from model import FlowModel
    return [p.detach().clone() for p in FlowModel.load(tiny_pipe_dir).add_student_lora(rank=4, alpha=8, seed=0)]


def _assert_same_update(one, two, init, files=("raw_weights",)):
    for name in files:
        w1, w2 = (load_file(Path(run) / "checkpoint" / f"{name}.safetensors") for run in (one, two))
        flat = [torch.cat([w[f"p{i}"].flatten() for i in range(len(init))]) for w in (w1, w2)]
        update = (flat[0] - torch.cat([p.flatten() for p in init])).norm()
        assert update > 0 and (flat[0] - flat[1]).norm() <= 0.05 * update, (name, (flat[0] - flat[1]).norm() / update)


# absolute floors for means of O(1) terms that cancel: GRPO's on-policy policy loss is -mean(A rho) with
# group-centred A, i.e. 0 up to the rounding of a sum of O(1) terms (~1e-7 each in float32)
FLOOR = {"policy_loss": 1e-5}


def _assert_same_metrics(one, two, keys):
    m1, m2 = _metrics(one), _metrics(two)
    assert len(m1) == len(m2)
    for a, b in zip(m1, m2):
        for key in (k for k in keys if k in a or k in b):  # evaluation keys: on the evaluated steps
            assert a[key] == pytest.approx(b[key], rel=REL, abs=FLOOR.get(key, 1e-9)), (a["step"], key)


def test_grpo_two_ranks_make_the_same_updates_and_drop_the_same_zero_advantage_group(tiny_pipe_dir, inputs):
    one, two = _one_and_two(inputs, "grpo")
    _assert_same_update(one, two, _init_lora(tiny_pipe_dir))
    _assert_same_metrics(one, two, ["reward_mean", "grad_norm", "policy_loss", "kl", "kept_fraction"])
    m = _metrics(one)
    assert all(r["kept_fraction"] == 0.5 and r["zero_std_groups"] == 0.5 for r in m)  # the dog group
    assert m[0]["ratio_dev"] < 1e-3 and m[-1]["grad_norm"] > 0


def test_grpo_guard_two_ranks_on_and_off_policy(tiny_pipe_dir, inputs):
    """GRPO-Guard with 2 optimizer steps per rollout (the second one off-policy)."""
    one, two = _one_and_two(inputs, "guard")
    _assert_same_update(one, two, _init_lora(tiny_pipe_dir))
    _assert_same_metrics(one, two, ["reward_mean", "grad_norm", "policy_loss"])
    assert json.loads((Path(one) / "config.json").read_text())["per_group_std"] is True  # its recipe
    assert _metrics(one)[0]["ratio_dev"] < 1e-5


def test_nft_two_ranks_make_the_same_updates_and_old_policy(tiny_pipe_dir, inputs):
    one, two = _one_and_two(inputs, "nft")
    _assert_same_update(one, two, _init_lora(tiny_pipe_dir), ("raw_weights", "ema_weights", "old_weights"))
    _assert_same_metrics(one, two, ["reward_mean", "grad_norm", "policy_loss"])
    m = _metrics(one)
    # the old policy moved toward the trained weights, and is not equal to them (decay 0.2 x optimizer steps)
    w = load_file(Path(one) / "checkpoint" / "old_weights.safetensors")
    raw = load_file(Path(one) / "checkpoint" / "raw_weights.safetensors")
    assert m[1]["old_decay"] == pytest.approx(0.8) and any(not torch.equal(w[k], raw[k]) for k in w)


def test_opd_two_ranks_make_the_same_update_with_one_flat_all_reduce_per_step(tiny_pipe_dir, inputs):
    """Every optimizer step all-reduces the student's gradient once, as one flat tensor of all its
    trainable values (Dist.average_gradients); every other collective carries a few scalars."""
    one, two = _one_and_two(inputs, "opd")
    _assert_same_update(one, two, _init_lora(tiny_pipe_dir))
    _assert_same_metrics(one, two, ["loss", "loss/geneval", "loss/ocr", "grad_norm", "eval/geneval/reward",
                                    "eval/ocr/reward"])  # 3 test prompts per task: all of them on 2 ranks
    m = _metrics(one)
    assert m[1]["loss"] != m[0]["loss"] and "eval/geneval/reward" in m[-1]
    n_trainable = sum(p.numel() for p in _init_lora(tiny_pipe_dir))
    for calls in (c["opd"] for c in inputs["calls"]):
        assert calls.count(n_trainable) == 2, calls  # one per optimizer step, the whole gradient at once
        assert all(c <= 64 for c in calls if c != n_trainable), calls


def test_study_table_on_two_ranks_gives_the_table_of_one_on_an_odd_number_of_prompts(inputs):
    one, two = _one_and_two(inputs, "table")
    t1, t2 = (json.loads((Path(run) / "table.json").read_text()) for run in (one, two))
    for m1, m2 in zip(t1["models"], t2["models"]):
        for task in m1["scores"]:
            assert m1["scores"][task] == pytest.approx(m2["scores"][task], abs=1e-5)
            assert len(m1["per_prompt"][task]["reward"]) == len(m2["per_prompt"][task]["reward"]) == 5


def test_first_use_downloads_run_on_local_rank_0_before_the_others(inputs):
    """Dist.local_first: rank 1 enters the block only after rank 0 has left it."""
    (enter0, leave0), (enter1, leave1) = (json.loads((inputs["root"] / "two" / f"local_first.{r}").read_text())
                                          for r in range(2))
    assert enter0 < leave0 <= enter1 < leave1
