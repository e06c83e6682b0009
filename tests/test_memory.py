"""memory.py: the planner's meta-device simulation against the PyTorch profiler's memory timeline on CPU,
its meta-device counts against the real modules, and the choice of the fastest setting that fits."""
import json
import warnings

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import memory
from model import FlowModel


def _measured_peak(fn) -> int:
    """Bytes allocated at the peak of fn() above the start, from the profiler's memory timeline."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # export_memory_timeline is deprecated, not yet replaced on CPU
        prof.export_memory_timeline(str(_measured_peak.path), device="cpu")
    _, sizes = json.loads(_measured_peak.path.read_text())
    totals = [sum(s) for s in sizes]
    return max(totals) - totals[0]


@pytest.fixture
def model_and_footprint(tiny_pipe_dir, tmp_path):
    _measured_peak.path = tmp_path / "timeline.json"
    model = FlowModel.load(tiny_pipe_dir)
    model.add_student_lora(4, 8)
    fp = memory.footprint(tiny_pipe_dir, 32, 32, torch.float32, 4, model.negative(1).seq.shape[1])
    return model, fp


@pytest.mark.parametrize("rows", [4, 16])
@pytest.mark.parametrize("phase", ["train", "train_checkpointed", "no_grad"])
def test_predicted_activation_peak_within_10_percent_of_the_profiler(model_and_footprint, rows, phase):
    model, fp = model_and_footprint
    embeds = model.encode_prompts(["a photo of a red circle"] * rows)
    x, t = torch.randn(rows, 8, 16, 16), torch.full((rows,), 0.5)
    if phase == "train_checkpointed":
        model.transformer.enable_gradient_checkpointing()

    def step():
        with torch.set_grad_enabled(phase != "no_grad"):
            v = model.velocity(x, t, embeds, 4.5)   # the CFG pair: 2 rows per prompt
            if phase != "no_grad":
                v.square().mean().backward()
    measured = _measured_peak(step)
    setting = memory.Setting(rows, rows, phase == "train_checkpointed")
    # one "trained step" of `rows` prompts: the train phase holds 2 x rows transformer rows
    peaks = memory.predict(fp, setting, rows, 1, 0, 0)
    predicted = (peaks["teacher"] if phase == "no_grad" else peaks["train"]) - peaks["persistent"]
    assert abs(predicted - measured) <= 0.10 * measured, (phase, rows, predicted / 2**20, measured / 2**20)


def test_meta_counts_equal_the_real_modules(tiny_pipe_dir, model_and_footprint):
    model, fp = model_and_footprint
    real = sum(p.numel() * 4 for n, p in model.transformer.named_parameters() if "lora_" not in n)
    real += sum(p.numel() * 4 for m in (model.pipe.text_encoder, model.pipe.text_encoder_2, model.pipe.text_encoder_3,
                                        model.vae) for p in m.parameters())
    assert fp.weights == real
    assert fp.lora == sum(p.numel() * 4 for p in model.trainable_parameters())
    assert fp.latent == 8 * 16 * 16 * 4


def test_plan_picks_the_fastest_setting_that_fits_and_refuses_with_numbers(model_and_footprint):
    _, fp = model_and_footprint
    peaks = {s: max(memory.predict(fp, s, 8, 9, 10, 3).values()) for s in memory.candidates(8)}
    ordered = list(peaks)
    assert ordered[0] == memory.Setting(0, 0, False)  # everything in one backward first
    budget = (peaks[ordered[0]] + peaks[ordered[1]]) / 2
    chosen, _ = memory.plan(fp, budget, 8, 9, 10, 3)
    assert chosen == next(s for s in ordered if peaks[s] <= budget) and chosen != ordered[0]
    with pytest.raises(ValueError, match=r"no setting fits 0\.0 GiB: the smallest predicted peak is"):
        memory.plan(fp, 1000, 8, 9, 10, 3)


def test_opd_plans_before_loading_sets_the_choice_and_refuses_what_cannot_fit(tiny_pipe_dir, tmp_path, capsys,
                                                                              monkeypatch):
    import opd
    from test_opd import _args, _teacher
    teachers = [_teacher(tiny_pipe_dir, tmp_path / "g", "geneval", 1), _teacher(tiny_pipe_dir, tmp_path / "o", "ocr", 2)]
    opd.main(_args(teachers, tmp_path / "run", "--steps", "1", "--max_memory_gb", "2"))
    printed = capsys.readouterr().err
    assert "memory plan (budget 2.0 GiB;" in printed and "-> " in printed
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["train_chunk"], saved["grad_checkpointing"]) == (0, False)  # the fastest fits 2 GiB

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although nothing fits")
    monkeypatch.setattr(FlowModel, "load", refuse)
    with pytest.raises(SystemExit, match="no setting fits 0.0 GiB"):
        opd.main(_args(teachers, tmp_path / "small", "--steps", "1", "--max_memory_gb", "0.0005"))
    assert not (tmp_path / "small").exists()
