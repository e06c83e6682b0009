"""study/demo.py: equal compute for the baselines, the mixed prompt set and its per-prompt reward routing,
early errors, and `--quick` end to end on a tiny model (every stage, Table 1 with intervals, Fig. 6,
claims with verdicts), then resumed with nothing left to do.

`pytest tests/test_demo.py` selects these; the end-to-end test takes a few minutes on 2 CPU cores."""
import json
from pathlib import Path

import pytest
import torch

from data import load_prompts, load_task
from study.mixed import write_mixed_dataset
from study import demo
from test_opd import _teacher


def test_plan_gives_each_baseline_the_images_of_the_teachers_and_opd():
    for cfg in (demo.DemoConfig(), demo.DemoConfig(**demo.LONG)):
        runs = demo.plan(cfg, teacher_images=3840)
        ours = 3840 + runs["opd"]["compute"]
        cascade = sum(r["compute"] for name, r in runs.items() if name.startswith("cascade-"))
        tolerance = cfg.baseline_batch * len(demo.TASKS) / 2  # rounding to whole steps
        for name in ("multitask-guard", "multitask-nft"):
            assert abs(runs[name]["compute"] - ours) <= tolerance, name
        assert abs(cascade - ours) <= tolerance and runs["sft"] == runs["opd"] == runs["sft-dropout"]
        assert sum(name.startswith("fig6/") for name in runs) == 3 * cfg.fig6_seeds
    assert demo.plan(demo.DemoConfig())["opd"]["compute"] == 720
    quick = demo.plan(demo.DemoConfig(**demo.QUICK), teacher_images=3840)  # --baseline_images overrides
    assert quick["multitask-nft"]["compute"] == demo.QUICK["baseline_images"]


def test_mixed_prompt_set_interleaves_tasks_and_routes_each_prompt_to_its_own_reward(tmp_path):
    from rewards import make_reward
    tasks = [load_task(t, f"data/toy/{t}") for t in ("geneval", "ocr", "aesthetic")]
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
    with pytest.raises(SystemExit, match="one per task"):
        demo.main(["--teachers", "a", "--out", str(tmp_path / "x")])
    folders = [tmp_path / t for t in demo.TASKS]  # three folders, none of them a teacher
    for f in folders:
        f.mkdir()
    with pytest.raises(SystemExit, match="--teachers: teacher .* is neither a PEFT LoRA folder"):
        demo.main(["--teachers", *map(str, folders), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def tiny_teachers(tiny_pipe_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    teachers = [_teacher(tiny_pipe_dir, root / t, t, i + 1, guidance=4.5) for i, t in enumerate(demo.TASKS)]
    for i, t in enumerate(teachers):  # their training time, as the shipped teachers' logs hold it
        (Path(t) / "metrics.jsonl").write_text(json.dumps({"step": 0, "sec/train": 60.0 * (i + 1)}) + "\n")
    return teachers


def test_any_number_of_tasks_plans_a_cascade_stage_each_and_mixes_their_prompts(tiny_teachers, tmp_path):
    two = demo.DemoConfig(teachers=tiny_teachers[1:], tasks=["aesthetic", "ocr"], out=str(tmp_path / "d"))
    assert demo.by_task(two) == [tiny_teachers[2], tiny_teachers[1]]  # in the order of --tasks
    runs = demo.plan(two, teacher_images=100)
    assert [name for name in runs if name.startswith("cascade-")] == ["cascade-1-aesthetic", "cascade-2-ocr"]
    assert runs["opd"]["images_per_step"] == 2 * two.opd_prompts
    joint = demo.joint_task(two)
    assert joint == ["--task", "mixed", "--dataset", str(tmp_path / "d" / "mixed")]
    tags = {json.loads(line)["task"] for line in (tmp_path / "d" / "mixed" / "test_metadata.jsonl").open()}
    assert tags == {"aesthetic", "ocr"}
    assert demo.joint_task(demo.DemoConfig()) == ["--task", "mixed"]  # the toy world's: the base names it
    with pytest.raises(SystemExit, match="one teacher per task"):
        demo.by_task(demo.DemoConfig(teachers=tiny_teachers[:2], tasks=["aesthetic", "ocr"]))


def test_runs_of_another_base_are_refused_not_skipped(tiny_pipe_dir, tiny_teachers, tmp_path):
    saved = tmp_path / "demo" / "opd" / "checkpoint" / "run_config.json"
    saved.parent.mkdir(parents=True)
    saved.write_text(json.dumps({"step": 10**6, "base_fingerprint": "0123456789abcdef"}))
    with pytest.raises(SystemExit, match="another base model"):
        demo.main(["--quick", "--model", tiny_pipe_dir, "--teachers", *tiny_teachers, "--out", str(tmp_path / "demo")])
    assert not (tmp_path / "demo" / "plan.json").exists()


def test_quick_demo_runs_every_stage_and_resumes_with_nothing_to_do(tiny_pipe_dir, tiny_teachers, tmp_path, capfd):
    out = tmp_path / "demo"
    # in another order than the tasks': each row and claim pairs a task with the teacher of that task
    args = ["--quick", "--model", tiny_pipe_dir, "--teachers", *reversed(tiny_teachers), "--out", str(out)]
    result = demo.main(args)
    table_cmd = next(line for line in (out / "commands.txt").read_text().splitlines() if "study.table" in line)
    assert all(f"teacher-{t}@{g}={tiny_pipe_dir}+{p}@{g} " in table_cmd for t, p in zip(demo.TASKS, tiny_teachers)
               for g in ("4.5", "1"))
    for name, planned in result["plan"].items():
        saved = json.loads((out / name / "checkpoint" / "run_config.json").read_text())
        assert saved["step"] == planned["steps"], name
    results = out / "results"
    table = json.loads((results / "table.json").read_text())
    names = ["base", "teacher-geneval", "teacher-ocr", "teacher-aesthetic", "opd", "sft", "sft-dropout",
             "multitask-guard", "multitask-nft", "cascade-nft"]
    rows = [f"{n}@{g}" for n in names for g in ("4.5", "1")]  # every model at every CFG
    assert [m["name"] for m in table["models"]] == rows
    assert all(m["guidance"]["ocr"] == float(m["name"].split("@")[1]) for m in table["models"])
    assert all(m["train_minutes"] > 0 for m in table["models"][2:])
    assert all(lo <= m["columns"][t] <= hi for m in table["models"] for t, (lo, hi) in m["intervals"].items())
    for png in ["curves.png", "fig6.png", *[f"samples/{n}.png" for n in rows]]:
        assert (results / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    claims = (results / "claims.md").read_text()
    lines = [line for line in claims.splitlines() if line.startswith(("| C", "| P"))]
    counts = {k: sum(line.startswith(f"| {k}") for line in lines) for k in ("P", "C1", "C2", "C3", "C4", "C5", "C6")}
    assert counts == {"P": 3, "C1": 3, "C2": 6, "C3": 3, "C4": 2, "C5": 1, "C6": 2}, counts
    verdicts = [(line.split(" ", 2)[1], line.rsplit("|", 2)[1].strip()) for line in lines]
    assert all(v in ("reproduced", "not reproduced", "not distinguishable") for c, v in verdicts if c != "C3")
    assert all(v.startswith(("reproduced", "not reproduced", "not tested")) for c, v in verdicts if c == "C3")
    assert "Cross-task effects" in claims and claims.count("| teacher-") == 3
    fig6 = [json.loads(line) for line in (out / "fig6" / "ode-s0" / "metrics.jsonl").read_text().splitlines()]
    assert all("eval/geneval/distance" in m for m in fig6)  # every round
    # the multi-task baseline evaluated every sub-task of its mixed prompt set
    mt = [json.loads(line) for line in (out / "multitask-guard" / "metrics.jsonl").read_text().splitlines()][-1]
    assert {f"eval/{t}/reward" for t in demo.TASKS} <= set(mt)

    logs = {p: p.stat().st_mtime_ns for p in out.glob("**/metrics.jsonl")}
    capfd.readouterr()
    demo.main(args)
    printed = capfd.readouterr().out
    assert all(f"[skip] {name}" in printed for name in result["plan"]) and "[skip] variance" in printed
    assert {p: p.stat().st_mtime_ns for p in out.glob("**/metrics.jsonl")} == logs


def _table(models: dict[str, dict[str, list[float]]]):
    """A table.json as study.table writes it, from per-prompt rewards {model: {task: values}}."""
    tasks = [{"name": t, "metric": "reward"} for t in next(iter(models.values()))]
    return {"tasks": tasks, "models": [
        {"name": m, "columns": {t: sum(v) / len(v) for t, v in cols.items()},
         "per_prompt": {t: {"reward": v, "tags": None} for t, v in cols.items()}} for m, cols in models.items()]}


def test_claim_verdicts_follow_the_intervals():
    from study import claims
    import numpy as np
    rng = np.random.default_rng(0)
    teacher = list(rng.uniform(0.5, 1.0, 200))
    table = _table({"teacher": {"a": teacher, "b": teacher}, "good": {"a": [0.99 * v for v in teacher], "b": teacher},
                    "half": {"a": [0.5 * v for v in teacher], "b": [0.5 * v for v in teacher]},
                    "noisy": {"a": list(np.clip(np.array(teacher) * 0.95 + rng.normal(0, 0.3, 200), 0, 2)), "b": teacher}})
    good = claims.ratio_to_teacher(table, "good", "teacher", "a")
    assert good["value"] == pytest.approx(0.99) and good["interval"] == pytest.approx((0.99, 0.99))
    assert good["verdict"] == "reproduced"
    assert claims.ratio_to_teacher(table, "half", "teacher", "a")["verdict"] == "not reproduced"
    assert claims.ratio_to_teacher(table, "noisy", "teacher", "a")["verdict"] == "not distinguishable"
    better = claims.average_difference(table, "teacher", "half")
    assert better["value"] == pytest.approx(1.0) and better["verdict"] == "reproduced"
    assert claims.average_difference(table, "half", "teacher")["verdict"] == "not reproduced"
    assert claims.verdict(-0.1, 0.2, 0.0) == "not distinguishable"
    # a paired difference: a model against itself has a zero-width interval; one inside the noise straddles
    shifted = claims.difference(table, "teacher", "half", "a", line=0.25)
    expected = 0.5 * np.mean(teacher)
    assert shifted["value"] == pytest.approx(expected) and shifted["verdict"] == "reproduced"
    assert claims.difference(table, "teacher", "teacher", "a")["interval"] == (0.0, 0.0)
    noisy = claims.difference(table, "noisy", "good", "a", line=-0.05)  # -0.054, +-0.04 of noise
    assert noisy["interval"][0] < -0.05 < noisy["interval"][1] and noisy["verdict"] == "not distinguishable"


def _distance_run(run, distances):
    """An opd.py run directory that logged the held-out distance `distances[k]` after round k (1 image each)."""
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"prompts_per_batch": 1}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": k, "sec/train": 1.0, "eval/x/distance": d}) + "\n"
                                               for k, d in enumerate(distances)))
    return str(run)


def test_sample_efficiency_of_a_variant_that_never_gets_there_is_a_lower_bound(tmp_path):
    from study import claims
    fast = [_distance_run(tmp_path / f"f{s}", [1.0, 0.6, 0.4, 0.3]) for s in range(3)]  # halfway (0.65) at 1.875 images
    slow = [_distance_run(tmp_path / f"s{s}", [1.0, 0.9, 0.8, 0.7]) for s in range(3)]  # never below 0.65
    r = claims.efficiency_ratio(fast, slow, ["x"])
    assert r["images_slow"] is None and r["lower_bound"] and r["value"] == pytest.approx(4 / 1.875)
    assert r["verdict"] == "reproduced" and " >= 2.13 |" in claims.format_claims([("C", "", r)])


def test_claim_intervals_have_the_normal_approximations_width(tmp_path):
    """Reference for the widths, not only the verdicts: the bootstrap intervals of study/claims.py against
    the delta method / normal approximation computed here from the same numbers."""
    import numpy as np
    from study import claims
    rng = np.random.default_rng(1)
    # C1 with GenEval's tags: R = mean_g(mean s_g) / mean_g(mean t_g), resampled within each tag. Delta
    # method: Var R = sum_g Var_g(s - R t) / (n_g K^2 mean_t^2), K tags, mean_t the reported teacher value.
    tags = ["a"] * 60 + ["b"] * 340  # unequal tags whose student / teacher ratios differ (1.0 and 0.6)
    t = np.where(np.array(tags) == "a", rng.uniform(0.4, 1.0, 400), rng.uniform(0.1, 0.7, 400))
    s = np.clip(np.where(np.array(tags) == "a", 1.0, 0.6) * t + rng.normal(0, 0.15, 400), 0, None)
    table = {"tasks": [{"name": "g", "metric": "strict"}], "models": [
        {"name": m, "per_prompt": {"g": {"strict": list(v), "tags": tags}}} for m, v in (("s", s), ("t", t))]}
    r = claims.ratio_to_teacher(table, "s", "t", "g")
    mean_t = np.mean([t[np.array(tags) == g].mean() for g in "ab"])
    R = np.mean([s[np.array(tags) == g].mean() for g in "ab"]) / mean_t
    var = sum(np.var((s - R * t)[np.array(tags) == g]) / (np.array(tags) == g).sum() for g in "ab") / (4 * mean_t ** 2)
    lo, hi = r["interval"]
    assert r["value"] == pytest.approx(R) and lo < R < hi
    assert (hi - lo) / 2 == pytest.approx(1.96 * var ** 0.5, rel=0.1)
    # the paired difference D = mean_g(mean s_g) - mean_g(mean t_g): Var D = sum_g Var_g(s - t) / (n_g K^2)
    d = claims.difference(table, "s", "t", "g")
    D = np.mean([(s - t)[np.array(tags) == g].mean() for g in "ab"])
    var_d = sum(np.var((s - t)[np.array(tags) == g]) / (np.array(tags) == g).sum() for g in "ab") / 4
    lo, hi = d["interval"]
    assert d["value"] == pytest.approx(D) and lo < D < hi
    assert (hi - lo) / 2 == pytest.approx(1.96 * var_d ** 0.5, rel=0.1)
    # C4 over seeds: the difference of two independent means, Var = var_w / n_w + var_b / n_b (ddof 0)
    w, b = rng.normal(1.0, 0.2, 60), rng.normal(0.8, 0.1, 40)
    diff = claims.final_distance_difference([_distance_run(tmp_path / f"w{i}", [v]) for i, v in enumerate(w)],
                                            [_distance_run(tmp_path / f"b{i}", [v]) for i, v in enumerate(b)], ["x"])
    lo, hi = diff["interval"]
    assert diff["value"] == pytest.approx(w.mean() - b.mean()) and diff["verdict"] == "reproduced"
    assert (hi - lo) / 2 == pytest.approx(1.96 * (w.var() / 60 + b.var() / 40) ** 0.5, rel=0.1)
