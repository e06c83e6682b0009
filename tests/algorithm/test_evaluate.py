"""evaluate.py, study/table.py and study/plots.py: the normalised average and the time sum against hand
computations, the
table format, written figures, deterministic per-prompt seeding, the cache, and 1 vs 2 ranks."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import evaluate
from helpers import f32_atol
from study import plots
from study import table as table_cli
from data import Task, load_prompts



def test_minmax_average_against_a_hand_computation():
    table = [[0.2, 30.0, 5.0],
             [0.6, 10.0, 5.0],
             [0.5, 20.0, 5.0]]
    # column 0: (0, 1, 0.75); column 1: (1, 0, 0.5); column 2 is constant and left out
    assert table_cli.minmax_average(table) == pytest.approx([0.5, 0.5, 0.625])
    assert table_cli.minmax_average([[1.0, 2.0], [1.0, 2.0]]) == [None, None]


def _write_run(path: Path, records, task=None):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "config.json").write_text(json.dumps({"task": task} if task else {"teachers": []}))
    return str(path)


def test_training_time_sums_sec_fields_without_eval_and_chains(tmp_path):
    a = _write_run(tmp_path / "a", [
        {"step": 0, "sec/rollout": 30.0, "sec/train": 60.0, "reward_mean": 0.1},
        {"step": 1, "sec/rollout": 999.0, "sec/train": 999.0},                       # replaced after a resume
        {"step": 1, "sec/rollout": 30.0, "sec/train": 30.0, "sec/eval": 500.0, "eval/reward": 0.5},
    ], task="ocr")
    b = _write_run(tmp_path / "b", [{"step": 0, "sec/rollout": 6.0, "sec/teacher": 6.0, "sec/optimizer": 12.0}])
    assert plots.run_seconds(a) == pytest.approx(150.0)
    assert table_cli.chain_minutes([a, b]) == pytest.approx({a: 2.5, b: 0.4})
    assert [r["step"] for r in plots.read_metrics(a)] == [0, 1]


def test_training_images_of_a_stage1_run_logged_before_records_carried_them(tmp_path):
    """The shipped teachers' metrics have no "images": (step + 1) x batch from config.json; a logged value
    wins; a run without a batch (OPD) is left as it is."""
    old = tmp_path / "old"
    _write_run(old, [{"step": 0}, {"step": 1}, {"step": 2, "images": 7}])
    (old / "config.json").write_text(json.dumps({"task": "ocr", "batch": 32}))
    assert [r["images"] for r in plots.read_metrics(str(old))] == [32, 64, 7]
    opd = _write_run(tmp_path / "opd", [{"step": 0}])
    assert "images" not in plots.read_metrics(opd)[0]


def test_table_format():
    md = table_cli.format_table(["base", "opd"], ["geneval strict", "ocr reward"], [[0.5, 0.25], [0.75, 0.125]],
                               [None, 12.25], [0.5, None])
    assert md == ("| model | time (min) | geneval strict | ocr reward | avg (min-max norm.) |\n"
                  "|---|---:|---:|---:|---:|\n"
                  "| base | - | 0.500 | 0.250 | 0.500 |\n"
                  "| opd | 12.2 | 0.750 | 0.125 | - |\n")


def test_parse_models_resolves_run_directories_and_rejects_bad_specs(tmp_path):
    (tmp_path / "run" / "checkpoint").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint" / "adapter_config.json").write_text("{}")
    spec = table_cli.parse_models([f"s=base+{tmp_path / 'run'}", "b=base", f"c=base+{tmp_path / 'run'}@1.5"])
    assert spec[0].adapter == str(tmp_path / "run" / "checkpoint") and spec[1].adapter is None
    assert (spec[0].guidance, spec[2].guidance, spec[2].adapter) == (None, 1.5, spec[0].adapter)
    cfg = table_cli.EvalConfig()  # @CFG wins over --guidance and over a teacher's own guidance
    assert (table_cli.model_guidance(spec[1], cfg), table_cli.model_guidance(spec[2], cfg)) == (4.5, 1.5)
    for bad, message in [(["nobase"], "NAME=BASE"), (["x=base", "x=base"], "twice"),
                         ([f"x=base+{tmp_path}"], "neither a PEFT"), (["x=base@high"], "not a CFG scale"),
                         (["x=base@0"], "CFG must be > 0")]:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            table_cli.parse_models(bad)


def _is_png(path) -> bool:
    with Image.open(path) as im:
        im.verify()
        return im.format == "PNG"


def test_curve_and_ablation_figures_are_written(tmp_path):
    teacher = _write_run(tmp_path / "t", [{"step": s, "sec/train": 6.0, "reward_mean": 0.1 * s,
                                           "eval/reward": 0.2 * s} for s in range(3)], task="geneval")
    student = [_write_run(tmp_path / f"s{k}", [{"step": s, "sec/train": 3.0, **{f"eval/{t}/reward": 0.1 * s + k
                                                for t in ("geneval", "ocr")}} for s in range(3)]) for k in range(2)]
    plots.plot_curves({"teacher": [teacher], "opd": [teacher, student[0]]}, ["geneval", "ocr"], tmp_path / "c.png")
    plots.plot_ablation([("a", {"x": student[0], "y": student[1]}), ("b", {"x": student[0]})], ["geneval", "ocr"],
                        tmp_path / "f6.png", {"ratio": 12.5, "rollouts": 4, "noise_level": 0.7, "closed_form": {"var": 2.0}})
    plots.main(["curves", "--runs", f"opd={teacher}+{student[0]}", "--tasks", "geneval", "--out", str(tmp_path / "d.png")])
    assert all(_is_png(tmp_path / f) for f in ("c.png", "f6.png", "d.png"))
    assert plots.mean_eval_reward(plots.read_metrics(student[1])[2], ["geneval", "ocr"]) == pytest.approx(1.2)
    with pytest.raises(ValueError, match="no evaluation"):
        plots.plot_ablation([("a", {"x": teacher})], ["geneval"], tmp_path / "bad.png")


# ---------------------------------------------------------------------- with a tiny model
def _adapter(tiny_pipe_dir, path, seed=3):
    from model import FlowModel
    m = FlowModel.load(tiny_pipe_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.add_student_lora(rank=4, alpha=8):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    m.save_student(path, {"base_model": tiny_pipe_dir})
    return str(path)


def test_evaluation_is_deterministic_and_seeded_per_prompt(tiny_pipe_dir, tmp_path):
    from data import load_task
    from plumbing.dist import Dist
    from model import FlowModel
    from rewards import make_reward
    one, two = FlowModel.load(tiny_pipe_dir), FlowModel.load(tiny_pipe_dir)
    two.load_lora(_adapter(tiny_pipe_dir, tmp_path / "lora"), "other")  # loaded, not selected
    prompts = ["a photo of a cat", "a red dog", "the text \"A7\""]
    a = evaluate.eval_images(one, prompts, [0, 1, 2], 3, 4.5, 0, None)
    b = evaluate.eval_images(two, prompts, [0, 1, 2], 3, 4.5, 0, None)
    assert torch.equal(a, b)
    # alone or in a batch of 3: other float32 sums, the same image (pixels in [0, 1])
    torch.testing.assert_close(evaluate.eval_images(one, prompts, [2], 3, 4.5, 0, None)[0], a[2], atol=f32_atol(1.0),
                               rtol=0)
    assert not torch.allclose(evaluate.eval_images(two, prompts, [0, 1, 2], 3, 4.5, 0, "other"), a, atol=1e-3)
    assert not torch.allclose(evaluate.eval_images(one, prompts, [0, 1, 2], 3, 4.5, 1, None), a, atol=1e-3)
    task = load_task("aesthetic", "data/toy/aesthetic")
    reward = make_reward(task.reward)
    runs = [evaluate.evaluate_task(m, task, reward, Dist("cpu"), None, 3, 3, batch=b) for m, b in ((one, 3), (two, 2))]
    assert runs[0] == pytest.approx(runs[1], abs=1e-6)


def test_mixed_prompt_set_reports_each_subtask_over_its_own_prompts(tiny_pipe_dir, tmp_path):
    from plumbing.dist import Dist
    from model import FlowModel
    prompts = ["a", "bb", "ccc", "dddd", "eeeee"]
    (tmp_path / "test.txt").write_text("\n".join(prompts) + "\n")
    (tmp_path / "test_metadata.jsonl").write_text("".join(
        json.dumps({"prompt": p, "task": t}) + "\n" for p, t in zip(prompts, "xyxyx")))

    def length_reward(images, prompts, metadata):
        return torch.tensor([float(len(p)) for p in prompts]), {}
    res = evaluate.evaluate_task(FlowModel.load(tiny_pipe_dir), Task("mixed", str(tmp_path), "unused", 4.5),
                                 length_reward, Dist("cpu"), None, 5, 2, batch=2)
    assert res == pytest.approx({"reward": 3.0, "x/reward": 3.0, "y/reward": 3.0})
    res = evaluate.evaluate_task(FlowModel.load(tiny_pipe_dir), Task("mixed", str(tmp_path), "unused", 4.5),
                                 length_reward, Dist("cpu"), None, 4, 2, batch=3)
    assert res == pytest.approx({"reward": 2.5, "x/reward": 2.0, "y/reward": 3.0})


def test_tagged_eval_key_is_the_mean_of_per_tag_means(tiny_pipe_dir, tmp_path):
    """GenEval's overall score: tags a (3 prompts) and b (1 prompt) weigh the same, whatever their counts."""
    from plumbing.dist import Dist
    from model import FlowModel
    prompts = ["a", "bb", "ccc", "dddd"]
    (tmp_path / "test.txt").write_text("\n".join(prompts) + "\n")
    (tmp_path / "test_metadata.jsonl").write_text("".join(
        json.dumps({"prompt": p, "tag": t}) + "\n" for p, t in zip(prompts, "aaab")))

    def length_reward(images, prompts, metadata):
        lengths = torch.tensor([float(len(p)) for p in prompts])
        return lengths, {"strict": (lengths > 2).float()}
    res = evaluate.evaluate_task(FlowModel.load(tiny_pipe_dir), Task("g", str(tmp_path), "unused", 4.5, "strict"),
                                 length_reward, Dist("cpu"), None, 4, 2, batch=3)
    # per tag: a = mean(0, 0, 1) = 1/3, b = 1; overall (1/3 + 1) / 2 = 2/3, not the sample mean 2/4
    assert res == pytest.approx({"reward": 2.5, "strict": 2 / 3, "strict/a": 1 / 3, "strict/b": 1.0})


def test_reward_terms_are_reported_as_their_means(tiny_pipe_dir, tmp_path):
    """Each info term is averaged over the same prompts as the reward; the score's own copy is dropped."""
    from plumbing.dist import Dist
    from model import FlowModel
    prompts = ["a", "bb", "ccc", "dddd", "eeeee"]
    (tmp_path / "test.txt").write_text("\n".join(prompts) + "\n")
    (tmp_path / "test_metadata.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))

    def length_reward(images, prompts, metadata):
        lengths = torch.tensor([float(len(p)) for p in prompts])
        return lengths, {"len": lengths, "len/even": (lengths % 2 == 0).float(), "len/sq": lengths**2}
    res = evaluate.evaluate_task(FlowModel.load(tiny_pipe_dir), Task("t", str(tmp_path), "unused", 4.5),
                                 length_reward, Dist("cpu"), None, 4, 2, batch=3)
    # prompts 1-4: lengths 1, 2, 3, 4
    assert res == pytest.approx({"reward": 2.5, "len/even": 0.5, "len/sq": 7.5})


def _cli_args(tiny_pipe_dir, adapter, runs, out):
    return ["--models", f"base={tiny_pipe_dir}", f"tuned={tiny_pipe_dir}+{adapter}", "--tasks", "geneval", "aesthetic",
            "--time", f"tuned={runs[0]}+{runs[1]}", "--prompts", "4", "--steps", "3", "--batch", "2",
            "--grid_prompts", "2", "--height", "0", "--width", "0", "--out", str(out),
            "--datasets", "geneval=data/toy/geneval", "aesthetic=data/toy/aesthetic"]  # a base without a recipe


@pytest.fixture(scope="module")
def cli_inputs(tiny_pipe_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    adapter = _adapter(tiny_pipe_dir, root / "lora")
    runs = [_write_run(root / "r1", [{"step": 0, "sec/train": 90.0, "reward_mean": 0.3, "eval/reward": 0.2}],
                       task="geneval"),
            _write_run(root / "r2", [{"step": 0, "sec/train": 30.0, "eval/geneval/reward": 0.4,
                                      "eval/aesthetic/reward": 0.1}])]
    return adapter, runs


def test_cli_writes_table_json_curves_and_grids_and_reuses_its_cache(tiny_pipe_dir, tmp_path, cli_inputs,
                                                                    monkeypatch):
    adapter, runs = cli_inputs
    table = table_cli.main(_cli_args(tiny_pipe_dir, adapter, runs, tmp_path))
    models = {m["name"]: m for m in table["models"]}
    assert models["tuned"]["train_minutes"] == pytest.approx(2.0) and models["base"]["train_minutes"] is None
    for m in models.values():  # GenEval reports its eval key (strict), the others their reward
        assert m["columns"] == {"geneval": m["scores"]["geneval"]["strict"],
                                "aesthetic": m["scores"]["aesthetic"]["reward"]}
    values = [[m["columns"]["geneval"], m["columns"]["aesthetic"]] for m in table["models"]]
    assert [m["avg_minmax"] for m in table["models"]] == table_cli.minmax_average(values)
    md = (tmp_path / "table.md").read_text()
    assert "| model | CFG | time (min) | geneval strict | aesthetic reward | avg (min-max norm.) |" in md
    assert "| tuned | 4.5 | 2 |" in md and "| base | 4.5 | - |" in md
    assert json.loads((tmp_path / "table.json").read_text()) == json.loads(json.dumps(table))
    assert all(_is_png(tmp_path / f) for f in ("curves.png", "samples/base.png", "samples/tuned.png"))

    def fail(*args, **kwargs):
        raise AssertionError("a cached model was evaluated again")
    monkeypatch.setattr(table_cli, "evaluate_tasks", fail)
    again = table_cli.main(_cli_args(tiny_pipe_dir, adapter, runs, tmp_path))
    assert again == table


def test_cli_errors_before_loading_anything(tiny_pipe_dir, tmp_path, cli_inputs):
    adapter, runs = cli_inputs
    for extra, message in [(["--time", "ghost=" + runs[0]], "not models"),
                           (["--datasets", "nope=/x"], "not in --tasks"),
                           (["--time", f"tuned={tmp_path}"], "no metrics.jsonl")]:
        with pytest.raises(SystemExit, match=message):
            table_cli.main(["--models", f"tuned={tiny_pipe_dir}+{adapter}", "--out", str(tmp_path / "o"),
                            "--datasets", *(f"{t}=data/toy/{t}" for t in ("geneval", "ocr", "aesthetic")), *extra])


def test_reported_number_and_its_bootstrap_interval():
    import numpy as np
    rng = np.random.default_rng(0)
    values = rng.normal(0.5, 0.2, 400)
    lo, hi = evaluate.interval(values, n_boot=4000)
    half = 1.96 * values.std() / len(values) ** 0.5  # the normal approximation's half width
    assert lo < values.mean() < hi and (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    # GenEval: the mean of per-tag means, resampled within tags
    tags = ["a"] * 10 + ["b"] * 90
    v = [1.0] * 10 + [0.0] * 90
    assert evaluate.reported(v, tags) == 0.5 and evaluate.reported(v) == pytest.approx(0.1)
    assert evaluate.interval(v, tags) == (0.5, 0.5)  # no within-tag variance
    # paired: a constant shift has a zero-width interval; an independent one does not
    assert evaluate.interval(values + 0.1, other=values) == pytest.approx((0.1, 0.1))
    lo, hi = evaluate.interval(values, other=rng.permutation(values))
    assert lo < 0 < hi


def test_evaluate_task_hands_out_the_per_prompt_values_it_reports(tiny_pipe_dir, tmp_path):
    from plumbing.dist import Dist
    from model import FlowModel
    lines = [json.dumps({"prompt": f"p{i}", "tag": "single_object" if i % 3 else "two_object",
                          "include": [{"class": "cat", "count": 1}]})
             for i in range(6)]
    (tmp_path / "test.txt").write_text("".join(f"p{i}\n" for i in range(6)))
    (tmp_path / "test_metadata.jsonl").write_text("\n".join(lines) + "\n")

    def reward(images, prompts, metas):
        s = images.mean((1, 2, 3)).float()
        return s, {"strict": (s > s.median()).float()}
    per_prompt = {}
    res = evaluate.evaluate_task(FlowModel.load(tiny_pipe_dir), Task("g", str(tmp_path), "unused", 4.5, "strict"),
                                 reward, Dist("cpu"), None, 6, 2, per_prompt=per_prompt)
    assert evaluate.reported(per_prompt["strict"], per_prompt["tags"]) == pytest.approx(res["strict"])
    assert evaluate.reported(per_prompt["reward"]) == pytest.approx(res["reward"])


def test_distance_curves_sample_efficiency_and_figure(tmp_path):
    """Run b's distance falls like a's at half the speed per image: b needs twice the images."""
    def run(name, speed, seed_noise):
        records = [{"step": s, "sec/train": 2.0 / speed, "eval/geneval/distance": 1.0 / (1 + speed * (s + 1)) + seed_noise,
                    "eval/ocr/distance": 1.0 / (1 + speed * (s + 1)) + seed_noise} for s in range(40)]
        path = Path(_write_run(tmp_path / name, records))
        (path / "config.json").write_text(json.dumps({"prompts_per_batch": 4}))
        return str(path)
    a = [run("a1", 1.0, 0.0), run("a2", 1.0, 0.0)]
    b = [run("b1", 0.5, 0.0), run("b2", 0.5, 0.0)]
    images, seconds, distance = plots.distance_curve(a[0], ["geneval", "ocr"])
    assert images[:2] == [8, 16] and seconds[:2] == [2.0, 4.0] and distance[1] == pytest.approx(1 / 3)
    eff = plots.sample_efficiency(a, b, ["geneval", "ocr"], fraction=0.5)
    assert eff["ratio_b_over_a"] == pytest.approx(2.0, rel=0.05)
    plots.plot_distance([("ODE vs SDE", {"ODE": a, "SDE": b})], ["geneval", "ocr"], str(tmp_path / "fig6.png"))
    assert _is_png(tmp_path / "fig6.png")
    with pytest.raises(ValueError, match="no held-out distance"):
        plots.distance_curve(_write_run(tmp_path / "none", [{"step": 0}]), ["geneval"])


def test_split_guidance_takes_each_half_of_cfg_from_its_adapter(tiny_pipe_dir, tmp_path):
    """study.branches: v = v_u^A + w (v_c^B - v_u^A). With A = B it is the model's own guided velocity
    (one batched forward of both halves); w = 1 leaves B's conditional half, w = 0 A's unconditional one;
    and the command's A/A and B/B samplers score what evaluate_task scores for A and for B."""
    from data import load_task
    from plumbing.dist import Dist
    from model import FlowModel
    from rewards import make_reward
    from study import branches
    a, b = _adapter(tiny_pipe_dir, tmp_path / "a", seed=3), _adapter(tiny_pipe_dir, tmp_path / "b", seed=4)
    m = FlowModel.load(tiny_pipe_dir)
    m.load_lora(a, "A")
    m.load_lora(b, "B")
    x = torch.randn(2, *m.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    e, t = m.encode_prompts(["a red circle", "a photo of a square"]), torch.tensor([0.3, 0.8])

    def own(adapter, embeds, w):
        with m.adapter(adapter):
            return m.velocity(x, t, embeds, w)
    with torch.no_grad():
        v_u, v_c = own("A", m.negative(2), 1.0), own("A", e, 1.0)
        # separate forwards against one batched pair: float32 sums of terms 3.5 |v_u| and 4.5 |v_c|
        torch.testing.assert_close(branches.SplitGuidance(m, "A", "A").velocity(x, t, e, 4.5), own("A", e, 4.5),
                                   atol=f32_atol(3.5 * v_u, 4.5 * v_c), rtol=0)
        mixed = branches.SplitGuidance(m, "A", "B")
        torch.testing.assert_close(mixed.velocity(x, t, e, 1.0), own("B", e, 1.0), atol=f32_atol(v_c), rtol=0)
        torch.testing.assert_close(mixed.velocity(x, t, e, 0.0), v_u, atol=f32_atol(v_u), rtol=0)
        assert (own("A", e, 4.5) - own("B", e, 4.5)).abs().max() > 1e-3

    # a reward continuous in the pixels (helpers.py): the two samplers' images differ by float32 rounding
    data = tmp_path / "task"
    data.mkdir()
    (data / "test.txt").write_text("a red circle\nthe text \"A7\"\na blue square\n")
    (data / "task.json").write_text(json.dumps({"reward": "test_brightness=1"}))
    res = branches.main(["--model", tiny_pipe_dir, "--a", a, "--b", b, "--task", "t", "--dataset", str(data),
                         "--prompts", "3", "--steps", "2", "--out", str(tmp_path / "o" / "branches.json")])
    task = load_task("t", str(data))
    reward = make_reward(task.reward)
    for name, adapter in (("u=A,c=A", "A"), ("u=B,c=B", "B")):
        direct = evaluate.evaluate_task(m, task, reward, Dist("cpu"), adapter, 3, 2)
        assert res[name]["result"] == pytest.approx(direct, abs=f32_atol(1.0))  # mean pixel values
    assert res["u=A,c=A"]["result"]["reward"] != pytest.approx(res["u=B,c=B"]["result"]["reward"], abs=f32_atol(1.0))
    assert set(json.loads((tmp_path / "o" / "branches.json").read_text())["results"]) == set(res)
    with pytest.raises(SystemExit, match="--a and --b"):
        branches.main(["--model", tiny_pipe_dir, "--a", a])
    with pytest.raises(SystemExit, match="neither a PEFT LoRA folder"):
        branches.main(["--model", tiny_pipe_dir, "--a", a, "--b", str(tmp_path)])


def test_the_table_generates_each_prompt_set_once_for_all_its_rewards(tiny_pipe_dir, tmp_path, monkeypatch):
    """Table 1's PickScore, CLIPScore, HPSv2.1 and aesthetic columns share the PickScore prompts: one set of
    images per model, scored by each reward; its GenEval images exported in GenEval's evaluator's layout."""
    real, calls = evaluate.rollout, []

    def counted(model, embeds, seeds, *a, **k):
        calls.append(len(seeds))
        return real(model, embeds, seeds, *a, **k)
    monkeypatch.setattr(evaluate, "rollout", counted)
    args = ["--models", f"base={tiny_pipe_dir}", "--tasks", "geneval", "bright", "jpeg", "--datasets", "geneval=data/toy/geneval",
            "bright=data/toy/ocr", "jpeg=data/toy/ocr", "--rewards", "bright=test_brightness=1",
            "jpeg=jpeg_incompressibility=1", "--prompts", "5", "--steps", "2", "--batch", "2", "--grid_prompts", "0",
            "--height", "0", "--width", "0", "--export_geneval", str(tmp_path / "geneval"), "--out", str(tmp_path / "t")]
    table = table_cli.main(args)
    # geneval: 5 prompts in batches of 2, then the OCR prompt set once for both its rewards
    assert calls == [2, 2, 1, 2, 2, 1], calls
    scores = table["models"][0]["scores"]
    assert set(scores) == {"geneval", "bright", "jpeg"} and scores["bright"]["reward"] != scores["jpeg"]["reward"]
    folders = sorted(p.name for p in (tmp_path / "geneval" / "base").iterdir())
    assert folders == [f"{i:05d}" for i in range(5)]
    meta = json.loads((tmp_path / "geneval" / "base" / "00003" / "metadata.jsonl").read_text())
    assert meta == load_prompts("data/toy/geneval", "test")[1][3]
    assert (tmp_path / "geneval" / "base" / "00003" / "samples" / "0000.png").is_file()


def test_geneval_through_a_reward_server_reports_the_key_asked_for(tiny_pipe_dir, tmp_path, monkeypatch):
    """Flow-GRPO's GenEval server answers partial credit ("scores") and GenEval accuracy ("rewards"): with
    --eval_key geneval=rewards the table reports the accuracy, GenEval's mean over tags."""
    import http.server
    import pickle
    import threading

    class Server(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            data = pickle.loads(self.rfile.read(int(self.headers["Content-Length"])))
            single = [float(m["tag"] == "single_object") for m in data["meta_datas"]]
            body = pickle.dumps({"scores": [0.5] * len(single), "rewards": single})
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Server)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setenv("REWARD_SERVER_URL", f"http://127.0.0.1:{httpd.server_address[1]}")
    try:
        table = table_cli.main(["--models", f"base={tiny_pipe_dir}", "--tasks", "geneval", "--rewards", "geneval=http=1",
                                "--eval_key", "geneval=rewards", "--prompts", "12", "--steps", "2", "--grid_prompts", "0",
                                "--height", "0", "--width", "0", "--out", str(tmp_path / "t"),
                                "--datasets", "geneval=data/toy/geneval"])
    finally:
        httpd.shutdown()
    tags = [m["tag"] for m in load_prompts("data/toy/geneval", "test")[1][:12]]
    expected = evaluate.reported([float(t == "single_object") for t in tags], tags)
    model = table["models"][0]
    assert table["tasks"][0]["metric"] == "rewards" and model["columns"]["geneval"] == pytest.approx(expected)
    assert model["scores"]["geneval"]["reward"] == pytest.approx(0.5)


def test_minutes_to_reach_reads_the_first_evaluation_at_the_quality(tmp_path):
    """study.plots.minutes_to_reach: the earlier runs of a chain in full, then the last run's training
    minutes (sec/eval left out) up to its first evaluation whose task mean reaches the threshold."""
    from study.plots import minutes_to_reach, plot_curves
    first, last = tmp_path / "teacher", tmp_path / "opd"
    for run in (first, last):
        run.mkdir()
    (first / "metrics.jsonl").write_text(json.dumps({"step": 0, "sec/train": 120.0, "images": 32}) + "\n")
    rows = [{"step": 0, "sec/train": 60.0, "images": 24, "eval/a/reward": 0.2, "eval/b/reward": 0.4, "sec/eval": 600.0},
            {"step": 1, "sec/train": 30.0, "images": 48},
            {"step": 2, "sec/train": 30.0, "images": 72, "eval/a/reward": 0.9, "eval/b/reward": 0.5},
            {"step": 3, "sec/train": 30.0, "images": 96, "eval/a/reward": 1.0, "eval/b/reward": 1.0}]
    (last / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    chain = [str(first), str(last)]
    assert minutes_to_reach(chain, ["a", "b"], 0.3) == pytest.approx(2 + 1)        # step 0: mean 0.3
    assert minutes_to_reach(chain, ["a", "b"], 0.7) == pytest.approx(2 + 2)        # step 2: mean 0.7
    assert minutes_to_reach(chain, ["a", "b"], 1.01) is None
    assert minutes_to_reach([str(last)], ["a", "c"], 0.0) is None                  # a task never evaluated
    plot_curves({"opd": chain}, ["a", "b"], str(tmp_path / "curves.png"))
    assert _is_png(tmp_path / "curves.png")
