"""What every script loads and plans is what it runs: each weight read in the dtype it runs in, the dry run's
resolved config equal to the config.json the same command writes (without a budget, and with one that
makes the memory plan choose), evaluation at the run's resolution, and one-line errors for batches that
do not divide over the ranks or ranks that see different run folders."""
import argparse
import contextlib
import io
import json

import pytest
import torch

import evaluate
import nft
import opd
import stage1
import teacher_rl
from model import LORA_TARGETS
from rewards import reward_bytes
from sample import trained_steps
from study import table as table_cli
from test_evaluate import _adapter
from test_nft import _nft_args
from test_opd import _args as opd_args
from test_opd import _teacher
from test_teacher_rl import _args as grpo_args
from plumbing import footprint, memory
from plumbing.dist import Dist
from plumbing.rundir import RunDir

KIND = {"teacher_rl": "grpo", "nft": "nft", "opd": "opd", "table": "table"}


@pytest.fixture(scope="module")
def inputs(tiny_pipe_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    teachers = [_teacher(tiny_pipe_dir, root / "geneval", "geneval", 1), _teacher(tiny_pipe_dir, root / "ocr", "ocr", 2)]
    adapter = _adapter(tiny_pipe_dir, root / "lora")
    return {"teacher_rl": (teacher_rl.main, lambda out: grpo_args(tiny_pipe_dir, out, "--steps", "1")),
            "nft": (nft.main, lambda out: _nft_args(tiny_pipe_dir, out, "--steps", "1")),
            "opd": (opd.main, lambda out: opd_args(teachers, out, "--steps", "1", "--eval_every", "1")),
            "table": (table_cli.main, lambda out: ["--models", f"base={tiny_pipe_dir}", f"tuned={tiny_pipe_dir}+{adapter}",
                                                   "--tasks", "geneval", "--prompts", "3", "--steps", "2",
                                                   "--grid_prompts", "1", "--out", str(out),
                                                   "--datasets", "geneval=data/toy/geneval"])}


def _dry_config(main, argv) -> tuple[dict, str]:
    printed = io.StringIO()
    with contextlib.redirect_stderr(printed):
        main([*argv, "--dry_run"])
    text = printed.getvalue()
    return json.loads(text[text.index("the resolved config:") + len("the resolved config:"):]), text


def _planned_budget(script: str, config: dict, model: str) -> float:
    """GiB just below the predicted peak of the setting a budget-free plan chooses: the plan must choose
    another one."""
    cfg = argparse.Namespace(**config)
    rewards = reward_bytes(["jpeg_incompressibility=1"])
    fp = footprint.footprint(model, 64, 64, torch.float32, config.get("lora_rank", 32), footprint.text_length(model),
                             LORA_TARGETS)
    s = {k: config[k] for k in memory.KNOBS[KIND[script]]}
    adapters = fp.lora * {"nft": 1, "opd": 2}.get(script, 0)
    trained = 0 if script == "table" else len(trained_steps(cfg))
    fastest = memory.predicted(memory.phases(fp, memory.job(KIND[script], cfg, 1, rewards, trained), s, adapters))
    return (fastest - 2**20) / footprint.GiB


@pytest.mark.parametrize("script", ["teacher_rl", "nft", "opd", "table"])
def test_the_dry_run_prints_the_config_the_run_writes_and_the_run_evaluates_at_its_resolution(
        script, inputs, tiny_pipe_dir, tmp_path, monkeypatch):
    main, args = inputs[script]
    sizes = []
    real_rollout = evaluate.rollout

    def spy(*a, **k):
        traj = real_rollout(*a, **k)
        sizes.append(tuple(traj.images.shape[-2:]))
        return traj
    monkeypatch.setattr(evaluate, "rollout", spy)
    # 64 px: twice the tiny model's own 32 px; CPU, no budget: nothing is planned, the plan's numbers printed
    argv = [*args(tmp_path / "free"), "--height", "64", "--width", "64"]
    dry, printed = _dry_config(main, argv)
    assert "; no budget; " in printed and "predicted peak" in printed
    main(argv)
    saved = json.loads((tmp_path / "free" / "config.json").read_text())
    assert {k: v for k, v in saved.items() if k != "dry_run"} == {k: v for k, v in dry.items() if k != "dry_run"}
    assert dry["dtype"] == "float32" and (dry["height"], dry["width"]) == (64, 64)
    assert sizes and set(sizes) == {(64, 64)}, sizes  # every evaluated image at the run's resolution
    # a budget just below the fastest setting's peak: the plan chooses another, in the dry run as in the run
    budget = _planned_budget(script, dry, tiny_pipe_dir)
    argv = [*args(tmp_path / "planned"), "--height", "64", "--width", "64", "--max_memory_gb", str(budget)]
    planned, printed = _dry_config(main, argv)
    assert f"of {budget:.1f} GiB (" in printed
    assert any(planned[k] != dry[k] for k in memory.KNOBS[KIND[script]]), printed
    main(argv)
    saved = json.loads((tmp_path / "planned" / "config.json").read_text())
    assert {k: v for k, v in saved.items() if k != "dry_run"} == {k: v for k, v in planned.items() if k != "dry_run"}


def test_load_reads_each_component_in_the_dtype_it_runs_in_with_one_fingerprint(tiny_pipe_dir):
    from model import FlowModel
    full, half = FlowModel.load(tiny_pipe_dir), FlowModel.load(tiny_pipe_dir, dtype=torch.bfloat16)
    assert half.transformer.dtype == torch.bfloat16 and half.vae.dtype == torch.float32
    assert all(getattr(half.pipe, n).dtype == torch.bfloat16 for n in ("text_encoder", "text_encoder_2", "text_encoder_3"))
    # the bf16 weights are the stored float32 ones rounded once, not a float32 copy cast later with other rounding
    name, p = next((n, p) for n, p in half.transformer.named_parameters())
    assert torch.equal(p, dict(full.transformer.named_parameters())[name].to(torch.bfloat16))
    assert half.fingerprint() == full.fingerprint()


def test_offloaded_text_encoders_encode_the_same_prompts_and_stay_on_the_host(tiny_pipe_dir):
    from model import FlowModel
    model = FlowModel.load(tiny_pipe_dir)
    before = model.encode_prompts(["a red cat", "a sign that says \"A7\""])
    model.offload_text_encoders()
    after = model.encode_prompts(["a red cat", "a sign that says \"A7\""])
    assert torch.equal(before.seq, after.seq) and torch.equal(before.pooled, after.pooled)
    assert model.pipe.text_encoder_3.device.type == "cpu" and model._encoders_offloaded


def test_a_batch_that_does_not_divide_over_the_ranks_names_the_per_gpu_values():
    dist = Dist("cpu")
    dist.world = 16  # docs/bench.md's 2 x 8 GPUs with the default 24 prompts per task
    with pytest.raises(ValueError, match=r"prompts_per_batch = 24 does not divide over 16 ranks: use "
                                         r"--prompts_per_batch 16 \(1 per GPU\) or --prompts_per_batch 32 \(2 per GPU\)"):
        dist.split(24, "prompts_per_batch", "--prompts_per_batch")
    cfg = argparse.Namespace(batch=1152, group_size=24, updates_per_rollout=2)
    message = stage1.batch_error(cfg, 10)
    assert message.endswith("use --batch 1080 (108 images per GPU) or --batch 1200 (120 images per GPU)"), message
    for n in (1080, 1200):
        assert n % 24 == 0 and n % (2 * 10) == 0


class _TwoRanks(Dist):
    """Rank 0 of 2 whose peer reports `peer` from its all_gather (step, manifest digest)."""

    def __init__(self, peer):
        super().__init__("cpu")
        self.world, self.peer = 2, peer

    def all_gather(self, x):
        return torch.cat([x, torch.tensor([self.peer], dtype=x.dtype)])

    def sum(self, x):
        return x


def test_resume_stops_in_one_line_when_the_ranks_see_different_checkpoints(tmp_path, monkeypatch):
    from dataclasses import dataclass

    from plumbing import durable

    @dataclass
    class Cfg:
        lr: float = 0.1
        steps: int = 4
        resume: bool = False
    out = tmp_path / "run"
    run = RunDir(str(out), Cfg(), Dist("cpu"))
    run.create()
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "w.txt").write_text("w")
    durable.write_manifest(out / "checkpoint", 2)
    run.release()
    same = RunDir(str(out), Cfg(resume=True), Dist("cpu"))
    digest = int(durable.sha256(out / "checkpoint" / durable.MANIFEST)[:12], 16)
    same.release()
    RunDir(str(out), Cfg(resume=True), _TwoRanks([0.0, 2, digest])).release()  # the same view: resumes
    for peer, seen in (([0.0, 0, 0], "rank 1: step 0"), ([0.0, 2, digest + 1], "rank 1: step 2")):
        with pytest.raises(ValueError, match=f"the ranks see different run folders at --out {out} \\(rank 0: step 2; "
                                             f"{seen}\\): --resume needs --out on a filesystem that every node shares"):
            RunDir(str(out), Cfg(resume=True), _TwoRanks(peer))
    assert sorted(p.name for p in out.iterdir()) == [".lock", "checkpoint", "config.json", "samples"]
