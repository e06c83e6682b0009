"""plumbing/reporting.py: TensorBoard and W&B (offline) mirrors of a run read back with their own readers, resumed
runs continuing the same tracker run, model cards that keep the folder loadable, the Hub upload call,
and a console without library chatter."""
import json
import struct
from pathlib import Path

import pytest

import teacher_rl
from test_opd import _args as opd_args
from test_opd import _teacher
from plumbing import reporting



def _grpo_args(model, out, *extra):
    return ["--model", model, "--task", "geneval", "--dataset", "data/toy/geneval", "--reward", "jpeg_incompressibility=1", "--out", str(out),
            "--batch", "8", "--group_size", "4", "--num_steps", "3", "--rollout_batch", "4", "--train_batch", "4",
            "--lora_rank", "4", "--lora_alpha", "8", "--eval_every", "2", "--eval_prompts", "2", "--eval_steps", "2",
            "--height", "0", "--width", "0", "--save_every", "1", *extra]


def _metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_holds_every_metric_grid_and_table_and_a_resume_continues_it(tiny_pipe_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path / "run"
    teacher_rl.main(_grpo_args(tiny_pipe_dir, run, "--report_to", "tensorboard", "--steps", "2"))
    teacher_rl.main(_grpo_args(tiny_pipe_dir, run, "--report_to", "tensorboard", "--steps", "4", "--resume"))
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    metrics = _metrics(run)
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    for key in ("reward_mean", "grad_norm", "policy_loss", "sec/train", "eval/reward"):
        logged = {e.step: e.value for e in events.Scalars(key)}
        want = {m["step"]: m[key] for m in metrics if key in m}
        assert logged.keys() == want.keys() and all(logged[s] == pytest.approx(want[s], rel=1e-6) for s in want), key
    assert [e.step for e in events.Images("samples")] == [1, 3]  # the grid of each evaluation
    assert {"config/text_summary", "evaluation/text_summary"} <= set(events.Tags()["tensors"])


def _wandb_records(run_dir: Path):
    """The records of W&B's offline run file: 7-byte header, then 32 KiB blocks of chunks (CRC32C 4 bytes,
    length 2, type 1: full/first/middle/last), each record a wandb_internal Record protobuf."""
    from wandb.proto import wandb_internal_pb2
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    records = []
    for path in files:
        data, pos, block, pending = path.read_bytes(), 7, 32768, b""
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            if block - pos % block < 7:  # too little room left in this block for a header: padding
                pos += block - pos % block
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if length == 0 and kind == 0:
                pos += block - pos % block
                continue
            pending += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                records.append((path, record))
                pending = b""
    return records


def test_wandb_offline_run_holds_the_same_metrics_and_resumes_the_same_run(tiny_pipe_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    teacher_rl.main(_grpo_args(tiny_pipe_dir, run, "--report_to", "wandb", "--steps", "2"))
    run_id = json.loads((run / "tracker.json").read_text())["wandb_id"]
    teacher_rl.main(_grpo_args(tiny_pipe_dir, run, "--report_to", "wandb", "--steps", "3", "--resume"))
    assert json.loads((run / "tracker.json").read_text())["wandb_id"] == run_id
    records = _wandb_records(run)
    assert {p.name for p, _ in records} == {f"run-{run_id}.wandb"}  # one W&B run, both processes
    history = {}
    for _, r in records:
        if r.WhichOneof("record_type") == "history":
            row = {(i.key or "/".join(i.nested_key)): i.value_json for i in r.history.item}
            history[int(row["_step"])] = row
    for m in _metrics(run):
        row = history[m["step"]]
        for key in ("reward_mean", "grad_norm", "policy_loss"):
            assert json.loads(row[key]) == pytest.approx(m[key], rel=1e-6), (m["step"], key)
    assert json.loads(history[1]["samples/_type"]) == "image-file"  # the evaluation grid of step 2
    assert (next(run.glob("wandb/offline-run-*")) / "files" / json.loads(history[1]["samples/path"])).is_file()
    runs = [r.run for _, r in records if r.WhichOneof("record_type") == "run"]  # the resolved config rides on it
    assert all(r.run_id == run_id for r in runs) and len(runs) == 2
    assert all({i.key: json.loads(i.value_json) for i in r.config.update}["lr"] == 3e-4 for r in runs)


def test_a_missing_tracker_package_is_a_one_line_install_message(tiny_pipe_dir, tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(SystemExit, match="--report_to wandb needs its package: pip install wandb"):
        teacher_rl.main(_grpo_args(tiny_pipe_dir, tmp_path / "run", "--report_to", "wandb"))
    with pytest.raises(SystemExit, match="unknown tracker"):
        teacher_rl.main(_grpo_args(tiny_pipe_dir, tmp_path / "run", "--report_to", "mlflow"))
    assert not (tmp_path / "run").exists()


def test_every_saved_folder_has_a_model_card_and_still_loads(tiny_pipe_dir, tmp_path):
    run = tmp_path / "run"
    teacher_rl.main(_grpo_args(tiny_pipe_dir, run, "--steps", "2"))
    card = (run / "checkpoint" / "README.md").read_text()
    header = card.split("---")[1]
    assert "library_name: diffusers" in header and "- lora" in header and "- flowgrpo" in header
    assert "Flow-GRPO teacher for the task `geneval`" in card
    assert "python teacher_rl.py --model" in card and "| lr | 0.0003 |" in card
    last = _metrics(run)[-1]
    assert f"| reward | {last['eval/reward']:.4f} |" in card
    manifest = json.loads((run / "checkpoint" / "checkpoint.json").read_text())
    assert "README.md" in manifest["files"]  # sealed with the rest
    from diffusers import StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_pipe_dir)
    pipe.load_lora_weights(str(run / "checkpoint"))
    assert any("lora" in n for n, _ in pipe.transformer.named_parameters())

    # the card's snippet, run as a diffusers user would, gives the image the project scored
    import re

    import torch

    from evaluate import eval_images
    from model import FlowModel
    call = re.search(r'image = pipe\("a prompt", (.*?)\)\.images\[0\]', card, re.S).group(1)
    kwargs = eval(f"dict({call})", {"torch": torch})
    assert kwargs["max_sequence_length"] == 32 and "max_sequence_length: 32" in header  # the tiny T5's 32
    prompt = "a red cat"
    theirs = pipe(prompt, **kwargs, output_type="pt").images  # (1, 3, H, W) in [0, 1]
    model = FlowModel.load(tiny_pipe_dir)
    model.load_lora(str(run / "checkpoint"), "teacher")
    ours = eval_images(model, [prompt], [0], kwargs["num_inference_steps"], kwargs["guidance_scale"], 0, "teacher")
    # the same float32 operations in the same order: pixels in [0, 1] agree to far below one uint8 level
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    kwargs.pop("max_sequence_length")  # diffusers' default of 256 tokens: another encoding, another image
    kwargs["generator"] = torch.Generator().manual_seed(0)  # the same noise as the scored image
    other = pipe(prompt, **kwargs, output_type="pt").images
    assert (other - ours).abs().max() > 1e-2


def test_opd_student_card_names_its_teachers(tiny_pipe_dir, tmp_path):
    import opd
    teachers = [_teacher(tiny_pipe_dir, tmp_path / "g", "geneval", 1), _teacher(tiny_pipe_dir, tmp_path / "o", "ocr", 2)]
    opd.main(opd_args(teachers, tmp_path / "run", "--steps", "1"))
    card = (tmp_path / "run" / "checkpoint" / "README.md").read_text()
    assert "DiffusionOPD student" in card and "geneval, ocr" in card and "- diffusionopd" in card


def test_push_to_hub_uploads_the_public_files_of_the_final_checkpoint(tiny_pipe_dir, tmp_path, monkeypatch):
    """Not a real upload (no network here): a local stand-in for huggingface_hub.HfApi records the calls."""
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))
            files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
            calls.append(("files", files))

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    run = tmp_path / "run"
    teacher_rl.main(_grpo_args(tiny_pipe_dir, run, "--steps", "2", "--push_to_hub", "me/toy-teacher"))
    assert calls[0] == ("create_repo", "me/toy-teacher", {"exist_ok": True, "repo_type": "model"})
    upload = calls[1][1]
    assert upload["repo_id"] == "me/toy-teacher" and Path(upload["folder_path"]) == run / "checkpoint"
    assert set(upload["ignore_patterns"]) == set(reporting.RESUME_FILES)
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "pytorch_lora_weights.safetensors"} <= set(
        calls[2][1])
    with pytest.raises(SystemExit, match="OWNER/NAME"):
        teacher_rl.main(_grpo_args(tiny_pipe_dir, tmp_path / "bad", "--push_to_hub", "no-owner"))


