"""toy/pretrain.py: a tiny run saves a pipeline that model.py loads, resume after a kill is exact,
a second stage (--init) keeps the first stage's VAE, and --task_weights shapes the batches."""
import json

import pytest
import torch
from safetensors.torch import load_file

from toy import pretrain as pretrain_toy
from model import FlowModel

TINY = ["--vae_steps", "2", "--batch", "4", "--layers", "1", "--heads", "2", "--head_dim", "8",
        "--text_dim", "16", "--latent_channels", "4", "--warmup", "1", "--threads", "1", "--save_every", "2"]


def weights(folder, part="transformer/diffusion_pytorch_model"):
    return load_file(str(folder / f"{part}.safetensors"))


def test_tiny_run_saves_a_pipeline_that_model_py_loads(tmp_path):
    pretrain_toy.main(TINY + ["--steps", "2", "--out", str(tmp_path / "m")])
    model = FlowModel.load(str(tmp_path / "m"))
    assert model.transformer.config.num_layers == 1 and model.vae.config.latent_channels == 4
    info = json.loads((tmp_path / "m" / "PRETRAIN.json").read_text())
    assert info["command"].startswith("python -m toy.pretrain") and info["config"]["steps"] == 2
    assert len((tmp_path / "m" / "pretrain_metrics.jsonl").read_text().splitlines()) == 2
    # the toy recipe (its one copy: the shipped base's) travels with every base pretraining writes
    assert pretrain_toy.RECIPE == pretrain_toy.RECIPE.parents[2] / "models/toy-sd3/recipe.json"
    assert (tmp_path / "m" / "recipe.json").read_text() == pretrain_toy.RECIPE.read_text()
    assert not (pretrain_toy.RECIPE.parents[2] / "toy" / "recipe.json").exists()
    assert not (tmp_path / "m.tmp").exists()


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
    pretrain_toy.main(TINY + ["--steps", "4", "--out", str(tmp_path / "full")])
    batch_at = pretrain_toy.batch_at

    def killed_at_step_2(cfg, step, exclude):  # after the checkpoint of step 2 was written
        if step == 2:
            raise KeyboardInterrupt
        return batch_at(cfg, step, exclude)
    monkeypatch.setattr(pretrain_toy, "batch_at", killed_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        pretrain_toy.main(TINY + ["--steps", "4", "--out", str(tmp_path / "cut")])
    assert not (tmp_path / "cut").exists()  # nothing half-written where the model goes
    monkeypatch.setattr(pretrain_toy, "batch_at", batch_at)
    pretrain_toy.main(TINY + ["--steps", "4", "--resume", "--out", str(tmp_path / "cut")])
    full, resumed = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=0)
    losses = [[json.loads(ln)["loss"] for ln in (tmp_path / f"{run}.ckpt" / "metrics.jsonl").read_text().splitlines()]
              for run in ("full", "cut")]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_second_stage_continues_the_first_and_keeps_its_vae(tmp_path):
    pretrain_toy.main(TINY + ["--steps", "2", "--out", str(tmp_path / "one")])
    pretrain_toy.main(TINY + ["--steps", "2", "--init", str(tmp_path / "one"), "--task_weights", "ocr=1",
                              "--out", str(tmp_path / "two")])
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert any(not torch.equal(one[k], two[k]) for k in one), "the second stage trained nothing"
    vae1, vae2 = (weights(tmp_path / d, "vae/diffusion_pytorch_model") for d in ("one", "two"))
    assert all(torch.equal(vae1[k], vae2[k]) for k in vae1)
    cfg = [json.loads((tmp_path / d / "vae" / "config.json").read_text()) for d in ("one", "two")]
    assert cfg[0]["shift_factor"] == cfg[1]["shift_factor"] and cfg[0]["scaling_factor"] == cfg[1]["scaling_factor"]


def test_task_weights_set_the_share_of_each_task():
    assert pretrain_toy.task_shares("geneval=1,ocr=2,aesthetic=0") == ("geneval", "ocr", "ocr")
    cfg = pretrain_toy.PretrainConfig(batch=600, task_weights="ocr=3,aesthetic=1")
    _, prompts, _ = pretrain_toy.batch_at(cfg, 0, set())
    ocr = sum('"' in p for p in prompts)  # OCR prompts quote their text; 10% are dropped to ""
    kept = sum(p != "" for p in prompts)
    assert 0.68 < ocr / kept < 0.82 and not any(p.startswith("a photo of") for p in prompts)


@pytest.mark.parametrize("args, message", [
    (["--task_weights", "ocr=1,poetry=2"], "--task_weights"),
    (["--task_weights", "ocr=x"], "--task_weights"),
    (["--task_weights", "ocr=0"], "weight 0"),
    (["--init", "/nonexistent/model"], "--init"),
])
def test_bad_input_fails_before_any_compute(tmp_path, args, message):
    with pytest.raises(SystemExit, match=message):
        pretrain_toy.main(TINY + args + ["--out", str(tmp_path / "m")])
    assert not (tmp_path / "m.ckpt").exists() and not (tmp_path / "m").exists()
