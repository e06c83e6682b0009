"""study/demo.py: equal compute for the baselines, the mixed prompt set and its per-prompt reward routing,
early errors, and `--quick` end to end on a tiny model, then resumed with nothing left to do.

`pytest tests/test_demo.py` selects these; the end-to-end test takes ~1.5 min on 2 CPU cores."""
import json
from pathlib import Path

import pytest
import torch

from study import demo
from data import load_prompts, load_task, write_mixed_dataset


def test_plan_gives_each_baseline_the_compute_of_teachers_plus_opd():
    for cfg in (demo.DemoConfig(), demo.QuickDemoConfig()):
        runs = demo.plan(cfg)
        ours = sum(runs[f"teacher-{t}"]["compute"] for t in cfg.tasks) + runs["opd"]["compute"]
        cascade = sum(r["compute"] for name, r in runs.items() if name.startswith("cascade-"))
        tolerance = cfg.teacher_batch * len(cfg.tasks) / 2  # rounding to whole steps
        assert abs(runs["joint"]["compute"] - ours) <= tolerance and abs(cascade - ours) <= tolerance
    runs = demo.plan(demo.DemoConfig())
    assert runs["joint"]["compute"] == 2880 and sum(r["compute"] for n, r in runs.items() if "cascade" in n) == 2880


def test_mixed_prompt_set_interleaves_tasks_and_routes_each_prompt_to_its_own_reward(tmp_path):
    from rewards import make_reward
    tasks = [load_task(t) for t in ("geneval", "ocr", "aesthetic")]
    mixed = write_mixed_dataset(tasks, tmp_path / "mixed")
    assert mixed.reward == "toy_geneval=1,toy_ocr=1,toy_aesthetic=1" and mixed.eval_key == ""
    test, test_meta = load_prompts(mixed.dataset, "test")
    train, train_meta = load_prompts(mixed.dataset, "train")
    own = {t.name: load_prompts(t.dataset, "test")[0] for t in tasks}
    assert sorted(test) == sorted(p for prompts in own.values() for p in prompts)  # every test line once
    assert [m["task"] for m in test_meta[:6]] == ["geneval", "ocr", "aesthetic"] * 2
    shares = {t.name: sum(m["task"] == t.name for m in train_meta) for t in tasks}
    assert len(set(shares.values())) == 1 and len(train) == 3 * shares["geneval"]
    for name in ("geneval", "ocr", "aesthetic"):  # one prompt of each task, scored by its own reward only
        i = next(k for k, m in enumerate(test_meta) if m["task"] == name)
        images = torch.rand(1, 3, 32, 32)
        alone, _ = make_reward(f"toy_{name}=1")(images, test[i:i + 1], test_meta[i:i + 1])
        routed, info = make_reward(mixed.reward)(images, test[i:i + 1], test_meta[i:i + 1])
        assert test_meta[i]["rewards"] == [f"toy_{name}"] and torch.equal(routed, alone)
        assert set(info) >= {"toy_geneval", "toy_ocr", "toy_aesthetic"}


def test_sizes_that_would_fail_a_later_stage_fail_first(tmp_path):
    with pytest.raises(SystemExit, match="opd_prompts 3 does not divide over 2"):
        demo.main(["--opd_prompts", "3", "--nproc", "2", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_runs_of_another_base_are_refused_not_skipped(tiny_pipe_dir, tmp_path):
    saved = tmp_path / "demo" / "teacher-geneval" / "checkpoint" / "run_config.json"
    saved.parent.mkdir(parents=True)
    saved.write_text(json.dumps({"step": 10**6, "base_fingerprint": "0123456789abcdef"}))
    with pytest.raises(SystemExit, match="another base model"):
        demo.main(["--quick", "--model", tiny_pipe_dir, "--out", str(tmp_path / "demo")])
    assert not (tmp_path / "demo" / "plan.json").exists()


def test_quick_demo_runs_every_stage_and_resumes_with_nothing_to_do(tiny_pipe_dir, tmp_path, capfd):
    out = tmp_path / "demo"
    result = demo.main(["--quick", "--model", tiny_pipe_dir, "--out", str(out)])
    runs = [name for name in demo.plan(demo.QuickDemoConfig())]
    for name in runs:
        saved = json.loads((out / name / "checkpoint" / "run_config.json").read_text())
        assert saved["step"] == result["plan"][name]["steps"], name
    results = out / "results"
    table = json.loads((results / "table.json").read_text())
    names = ["base", "teacher-geneval", "teacher-ocr", "teacher-aesthetic", "joint-grpo", "cascade-grpo", "opd"]
    assert [m["name"] for m in table["models"]] == names
    assert all(m["train_minutes"] > 0 for m in table["models"][1:])
    for png in ["curves.png", "ablation.png", *[f"samples/{n}.png" for n in names]]:
        assert (results / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert "ratio" in json.loads((out / "variance.json").read_text())
    assert (results / "table.md").read_text().count("\n| ") == len(names) + 1
    # the joint baseline evaluated every sub-task of its mixed prompt set during training
    joint_eval = [json.loads(line) for line in (out / "joint" / "metrics.jsonl").read_text().splitlines()][-1]
    assert {f"eval/{t}/reward" for t in ("geneval", "ocr", "aesthetic")} <= set(joint_eval)

    logs = {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.jsonl")}
    capfd.readouterr()
    demo.main(["--quick", "--model", tiny_pipe_dir, "--out", str(out)])
    printed = capfd.readouterr().out
    assert all(f"[skip] {name}" in printed for name in runs) and "[skip] variance" in printed
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.jsonl")} == logs
    assert Path(out / "commands.txt").read_text().count("-m teacher_rl ") == 7
