"""plumbing/memory.py and plumbing/footprint.py: the planner's meta-device simulation against the PyTorch profiler's memory timeline on CPU,
its meta-device counts against the real modules, and the choice of the fastest setting that fits."""
import argparse
import json
import re
import warnings

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from model import LORA_TARGETS, FlowModel
from plumbing import footprint, memory


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
    fp = footprint.footprint(tiny_pipe_dir, 32, 32, torch.float32, 4, model.negative(1).seq.shape[1], LORA_TARGETS)
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
    predicted = footprint.Footprint.at(getattr(fp, phase), 2 * rows)
    assert abs(predicted - measured) <= 0.10 * measured, (phase, rows, predicted / 2**20, measured / 2**20)


@pytest.mark.parametrize("images", [3, 8])
def test_predicted_vae_decode_peak_within_10_percent_of_the_profiler(model_and_footprint, images):
    model, fp = model_and_footprint
    z = torch.randn(images, 8, 16, 16)
    measured = _measured_peak(lambda: model.decode(z))
    predicted = footprint.Footprint.at(fp.decode, images)
    assert abs(predicted - measured) <= 0.10 * measured, (images, predicted / 2**20, measured / 2**20)


def test_meta_counts_equal_the_real_modules(tiny_pipe_dir, model_and_footprint):
    model, fp = model_and_footprint
    def size(m):
        return sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
    assert fp.transformer == sum(p.numel() * 4 for n, p in model.transformer.named_parameters() if "lora_" not in n) \
        + sum(b.numel() * 4 for b in model.transformer.buffers())
    assert fp.text_encoders == sum(size(m) for m in (model.pipe.text_encoder, model.pipe.text_encoder_2,
                                                     model.pipe.text_encoder_3))
    assert fp.vae == size(model.vae)
    assert fp.lora == sum(p.numel() * 4 for p in model.trainable_parameters())
    assert fp.latent == 8 * 16 * 16 * 4 and fp.image == 3 * 32 * 32 * 4


def test_a_view_of_an_existing_storage_is_no_new_memory():
    """A frozen layer's forward saves its weight's transpose (a view) for the backward: 0 bytes; a new tensor
    of the same size counts in full."""
    with torch.device("meta"):
        weight = torch.empty(1024, 1024)
        x = torch.empty(4, 1024, requires_grad=True)
    with footprint._LiveBytes() as views:
        kept = [weight.t(), weight[:10], weight.view(-1)]
    with footprint._LiveBytes() as copies:
        kept += [weight.t().contiguous()]
    with footprint._LiveBytes() as linear:
        y = torch.nn.functional.linear(x, weight)   # output (4 x 1024 floats); the transposed weight is a view
    assert views.peak == 0 and copies.peak == 1024 * 1024 * 4 and linear.peak == 4 * 1024 * 4, (linear.peak, y.shape)


def _opd_job(P=8):
    return memory.Job("opd", P, 9, 10, 2, 0, 40)


def test_plan_picks_the_fastest_setting_that_fits_and_refuses_with_numbers(model_and_footprint):
    _, fp = model_and_footprint
    cfg = argparse.Namespace(train_chunk=0, teacher_chunk=0, grad_checkpointing=False, offload_text_encoders=False,
                             offload_rewards=False, eval_batch=32)
    j = _opd_job()
    settings = memory.candidates(j, cfg, set())
    assert settings[0] == {"train_chunk": 0, "teacher_chunk": 0, "grad_checkpointing": False,
                           "offload_text_encoders": False, "offload_rewards": False, "eval_batch": 32}
    peaks = [memory.predicted(memory.phases(fp, j, s)) for s in settings]
    budget = (peaks[0] + peaks[1]) / 2
    chosen, table = memory.plan(fp, j, cfg, budget)
    first_fit = next(s for s, p in zip(settings, peaks) if p <= budget)
    assert chosen == {**first_fit, "eval_batch": chosen["eval_batch"]} and chosen["train_chunk"] != 0
    assert table[-1] == (chosen, memory.predicted(memory.phases(fp, j, chosen)))
    # a fixed key is never chosen: with train_chunk fixed at 0 only checkpointing and placement may change
    fixed_chosen, _ = memory.plan(fp, j, cfg, budget * 10, fixed={"train_chunk"})
    assert fixed_chosen["train_chunk"] == 0
    with pytest.raises(ValueError, match=r"no setting fits 0\.0 GiB: the smallest predicted peak is"):
        memory.plan(fp, j, cfg, 1000)


def test_the_peak_is_the_largest_phase_with_margin_and_cuda_context(model_and_footprint):
    _, fp = model_and_footprint
    s = {"train_chunk": 0, "teacher_chunk": 0, "grad_checkpointing": False, "eval_batch": 4}
    peaks = memory.phases(fp, _opd_job(), s)
    resident = fp.transformer + fp.text_encoders + fp.vae + 5 * fp.lora
    # train: all 9 x 8 rows with their CFG pairs in one backward, beside the trajectory and the targets
    assert peaks["train"] == resident + 8 * 11 * fp.latent + 72 * fp.latent + footprint.Footprint.at(fp.train, 144)
    assert peaks["eval decode"] == resident + 4 * 41 * fp.latent + footprint.Footprint.at(fp.decode, 4) + 4 * fp.image
    assert memory.predicted(peaks) == int(max(peaks.values()) * 1.05) + memory.CUDA_RESERVED
    offloaded = memory.phases(fp, _opd_job(), {**s, "offload_text_encoders": True})
    assert offloaded["train"] == peaks["train"] - fp.text_encoders and offloaded["encode"] == resident


def test_opd_plans_before_loading_sets_the_choice_and_refuses_what_cannot_fit(tiny_pipe_dir, tmp_path, capsys,
                                                                              monkeypatch):
    import opd
    from test_opd import _args, _teacher
    teachers = [_teacher(tiny_pipe_dir, tmp_path / "g", "geneval", 1), _teacher(tiny_pipe_dir, tmp_path / "o", "ocr", 2)]
    opd.main(_args(teachers, tmp_path / "run", "--steps", "1", "--max_memory_gb", "3"))
    printed = capsys.readouterr().err
    assert "memory plan (opd at 32x32 px, float32, 1 rank; budget 3.0 GiB" in printed and "-> " in printed
    assert re.search(r"^predicted peak \d+\.\d GiB of 3\.0 GiB \(train_chunk 0, teacher_chunk 0, "
                     r"grad_checkpointing off", printed, re.M), printed
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["train_chunk"], saved["grad_checkpointing"]) == (0, False)  # the fastest fits 3 GiB

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although nothing fits")
    monkeypatch.setattr(FlowModel, "load", refuse)
    with pytest.raises(SystemExit, match="no setting fits 0.0 GiB"):
        opd.main(_args(teachers, tmp_path / "small", "--steps", "1", "--max_memory_gb", "0.0005"))
    assert not (tmp_path / "small").exists()
