"""bench/opd_round.py: the FLOP formula against FlopCounterMode, NFE counts against a hand count, and the whole
benchmark end to end (tiny model, every optional measurement, a half-precision lever, GRPO steps)."""
import json
import math
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bench import opd_round as bench
from teachers import by_task
from helpers import F32_REL
from model import LORA_TARGETS, FlowModel
from plumbing.dist import Dist


def test_mmdit_flops_equals_flop_counter_forward_and_lora_backward():
    """SD3.5-style block mix: dual attention in layers 0-1 of 3, RMS qk-norm, last layer context_pre_only."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig
    torch.manual_seed(0)
    cfg = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
               num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=16, pooled_projection_dim=12,
               pos_embed_max_size=8, dual_attention_layers=(0, 1), qk_norm="rms_norm")
    tr = SD3Transformer2DModel(**cfg).requires_grad_(False)
    tr.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS)))
    B, h, w, n_txt = 3, 8, 6, 5
    inputs = dict(hidden_states=torch.randn(B, 4, h, w), timestep=torch.tensor([500.0, 300.0, 10.0]),
                  encoder_hidden_states=torch.randn(B, n_txt, 24), pooled_projections=torch.randn(B, 12),
                  return_dict=False)
    fwd, bwd = bench.mmdit_flops(cfg, (h // 2) * (w // 2), n_txt, lora_rank=4)
    with sdpa_kernel(SDPBackend.MATH):  # the CPU flash kernel has no FLOP-counter formula; math is matmuls
        with FlopCounterMode(display=False) as count_fwd, torch.no_grad():
            tr(**inputs)
        with FlopCounterMode(display=False) as count_all:
            tr(**inputs)[0].square().sum().backward()
    assert count_fwd.get_total_flops() == B * fwd
    assert count_all.get_total_flops() - count_fwd.get_total_flops() == B * bwd
    # without LoRA the forward is the plain MMDiT
    tr.disable_adapters()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as count, torch.no_grad():
        tr(**inputs)
    assert count.get_total_flops() == B * bench.mmdit_flops(cfg, 12, n_txt)[0]


def _teacher(base, path, task, guidance):
    """A saved PEFT teacher on `base` with nonzero random LoRA weights."""
    m = FlowModel.load(base)
    with torch.no_grad():
        for p in m.add_student_lora(rank=4, alpha=8, seed=len(task)):
            p.normal_(0, 0.3)
    m.save_student(path, {"task": task, "dataset": f"data/toy/{task}", "reward": "jpeg_incompressibility=1",
                          "guidance": guidance,
                          "base_model": base})
    return str(path)


@pytest.fixture(scope="module")
def teachers(tiny_pipe_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return [_teacher(tiny_pipe_dir, root / "geneval", "geneval", 1.0), _teacher(tiny_pipe_dir, root / "ocr", "ocr", 2.0)]


@pytest.mark.parametrize("teacher_chunk,train_chunk", [(0, 0), (2, 3)])
def test_nfe_count_of_one_round_equals_hand_count(teachers, teacher_chunk, train_chunk):
    B, N, js = 2, 3, [0, 2]
    K, M = len(js), len(teachers)
    cfg = bench.parse_config(bench.BenchConfig, [
        "--teachers", *teachers, "--prompts_per_batch", str(B), "--num_steps", str(N), "--guidance", "3.0",
        "--train_steps", *map(str, js), "--teacher_chunk", str(teacher_chunk), "--train_chunk", str(train_chunk),
        "--lora_rank", "4", "--lora_alpha", "8", "--device", "cpu", "--height", "0", "--width", "0"])
    dist = Dist("cpu")
    s = bench.build(cfg, dist)
    with bench.NetMeter(dist.device) as meter:
        meter.watch_model(s.model)
        bench.opd_round(s, cfg, dist, 0, meter)  # the first round also encodes the cached "" prompt
        net = bench.opd_round(s, cfg, dist, 1, meter)["net"]
    rows = K * B  # (step, sample) rows of one task batch
    # rollout: N forwards of the CFG pair (2B rows) per task batch, the student adapter
    assert (net["student"]["calls"], net["student"]["rows"]) == (M * N, M * N * 2 * B)
    # teacher: rows in chunks; geneval (w = 1) runs the conditional half only, ocr (w = 2) the pair
    t_calls = M * math.ceil(rows / (teacher_chunk or rows))
    assert (net["teacher"]["calls"], net["teacher"]["rows"]) == (t_calls, rows * 1 + rows * 2)
    # train: forward + backward of every row with the student's CFG pair
    tr_calls = M * math.ceil(rows / (train_chunk or rows))
    assert (net["train"]["calls"], net["train"]["rows"]) == (tr_calls, M * rows * 2)
    assert net["backward"]["calls"] == tr_calls
    # text embeddings: one encoder call per task batch, once per prompt, reused by all 3 phases
    assert net["encode"] == {"calls": M, "prompts": M * B}
    assert "base" not in net
    # FLOPs: every call counted with its own rows and its adapter's rank (student and teachers r = 4)
    c = s.model.transformer.config
    f, b = bench.mmdit_flops(c, (16 // 2) ** 2, s.model.negative(1).seq.shape[1], 4)
    assert net["train"]["fwd_flop"] == M * rows * 2 * f and net["train"]["bwd_flop"] == M * rows * 2 * b


def test_bench_end_to_end_writes_the_documented_json(teachers, tmp_path):
    out = tmp_path / "bench.json"
    report = bench.main([
        "--teachers", *teachers, "--prompts_per_batch", "2", "--num_steps", "2", "--rounds", "1",
        "--warmup", "1", "--lora_rank", "4", "--lora_alpha", "8", "--device", "cpu", "--eval_prompts", "2",
        "--height", "0", "--width", "0", "--train_steps", "0", "1",
        "--eval_steps", "2", "--overlap_batches", "2", "--cfg_pair_reps", "1", "--grpo_steps", "1",
        "--grpo_batch", "4", "--grpo_group_size", "2",
        "--levers", "teacher_per_step", "dtype=bfloat16", "train_chunk=2,grad_checkpointing=true",
        "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    assert set(saved) >= {"config", "device", "world", "torch", "peak_matmul_tflops", "peak_matmul_dtype", "variants",
                          "cfg_pair", "eval", "overlap", "grpo"}
    assert set(saved["variants"]) == {"baseline", "teacher_per_step", "dtype=bfloat16",
                                      "train_chunk=2,grad_checkpointing=true"}
    for name, v in saved["variants"].items():
        assert set(v) >= {"overrides", "sec", "nfe", "encode", "net_sec", "overhead_ratio", "images_per_sec",
                          "images_per_round", "tflop", "tflops", "mfu", "peak_mem_mb", "setup_sec",
                          "speedup_vs_baseline"}, name
        assert set(v["sec"]) == {"rollout", "teacher", "train", "optimizer", "other", "total"}
        assert abs(sum(v["sec"][k] for k in bench.PHASES) - v["sec"]["total"]) < 1e-6
        assert v["overhead_ratio"] > 1 and v["images_per_round"] == 2 * 2
    assert saved["variants"]["teacher_per_step"]["overrides"] == {"teacher_chunk": 2}
    assert saved["variants"]["teacher_per_step"]["nfe"]["teacher"]["calls"] == 2 * 2  # one per trained step
    assert saved["variants"]["baseline"]["nfe"]["teacher"]["calls"] == 2
    assert set(saved["grpo"]["sec"]) >= {"rollout", "reward", "train", "other", "total"}
    # student without grad: the rollout (2 steps x 4 images x CFG pair); with grad: the training forward's
    # CFG pair, both halves attached (int(0.99 x 2) = 1 trained step x 4 images x 2); base: the KL
    # reference (1 x 4 x CFG pair)
    assert saved["grpo"]["nfe"]["student"]["rows"] == 2 * 4 * 2
    assert saved["grpo"]["nfe"]["base"]["rows"] == 1 * 4 * 2 and saved["grpo"]["nfe"]["train"]["rows"] == 1 * 4 * 2


def test_sd35m_random_builds_the_published_config_and_runs_on_cpu(tmp_path):
    report = bench.main(["--sd35m-random", "--layers", "1", "--height", "32", "--width", "32", "--text_len", "4",
                         "--prompts_per_batch", "1", "--num_steps", "2", "--train_steps", "0", "--rounds", "1",
                         "--warmup", "0", "--cfg_pair_reps", "0", "--device", "cpu", "--out", str(tmp_path / "b.json")])
    v = report["variants"]["baseline"]
    # geneval teacher w = 1 (1 row), ocr and aesthetic w = 4.5 (2 rows); the student's CFG pair
    assert v["nfe"]["teacher"]["rows"] == 1 + 2 + 2 and v["nfe"]["rollout"]["rows"] == 3 * 2 * 2
    n_img, n_txt = (32 // 8 // 2) ** 2, 77 + 4
    f, b = bench.mmdit_flops({**bench.SD35M, "num_layers": 1}, n_img, n_txt, 32)
    assert v["tflop"]["train"] == pytest.approx(3 * 2 * (f + b) / 1e12)


def test_levers_change_speed_not_the_gradient(teachers):
    """Teacher/train chunking and gradient checkpointing give the baseline's student gradient (compile=true
    does too, to rtol 1e-4, but compiling takes a minute on CPU: checked by hand, not here)."""
    import opd
    argv = ["--teachers", *teachers, "--prompts_per_batch", "2", "--num_steps", "3", "--lora_rank", "4",
            "--lora_alpha", "8", "--device", "cpu", "--height", "0", "--width", "0"]
    levers = ["--levers", "teacher_per_step", "train_per_step", "grad_checkpointing=true"]
    dist = Dist("cpu")
    cfgs = bench.variants(bench.parse_config(bench.BenchConfig, argv + levers), argv + levers, dist)
    assert [c.teacher_chunk for c in cfgs.values()] == [0, 2, 0, 0] and cfgs["train_per_step"].train_chunk == 2
    s = bench.build(cfgs["baseline"], dist)
    grads = {}
    for name, cfg in cfgs.items():
        bench.configure(s.model, cfg)
        b = next(opd.round_batches(cfg, by_task(s.teachers), 0, dist, s.prompts_by_task))
        loss = opd.batch_gradient(cfg, s.model, b.teachers, b.prompts, b.seeds, [0, 1, 2], 1.0)
        assert loss.abs().sum() > 0
        grads[name] = torch.cat([p.grad.flatten() for p in s.trainer.params])
        s.trainer.opt.zero_grad(set_to_none=True)
    for name, g in grads.items():
        # float32 sums in another order (tests/helpers.py): agreement to F32_REL of the gradient's norm,
        # compared as a whole (elementwise, single tiny coordinates are all rounding)
        rel = ((g - grads["baseline"]).norm() / grads["baseline"].norm()).item()
        assert rel < F32_REL, (name, rel)


def test_the_random_sd35m_folder_has_the_published_widths_and_loads_like_sd35m(tmp_path):
    """bench/sd35m_folder.py (gpu_check.sh's real-size smoke runs), one block per network here: every width,
    vocabulary and tokenizer limit of the fixture's configs, and FlowModel loads and samples it in bfloat16."""
    import json

    from bench.sd35m_folder import FIXTURE, build
    from model import FlowModel
    from sample import rollout
    folder = build(str(tmp_path / "m"), "cpu", torch.bfloat16, layers=1)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        saved, published = (json.loads((Path(root) / name / "config.json").read_text()) for root in (folder, FIXTURE))
        differ = {k for k in published if not k.startswith("_") and saved.get(k) != published[k]}
        # transformers' T5Config writes tie_word_embeddings true whatever it is given: an encoder has no head
        assert differ <= {"num_layers", "num_hidden_layers", "dual_attention_layers", "tie_word_embeddings"}, \
            (name, differ)
    model = FlowModel.load(folder, dtype=torch.bfloat16)
    embeds = model.encode_prompts(["a photo of a cat"])
    assert model.max_sequence_length == 128 and embeds.seq.shape == (1, 77 + 128, 4096)
    images = rollout(model, embeds, [0], 2, 4.5, 0.0, 64, 64).images
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()


def test_reading_paths_count_each_function_once_up_to_the_stop(tmp_path):
    """bench/reading_paths.py on a two-file tree whose counts are known by hand: main up to its call of the
    stop (3 lines), helper.a (3) and helper.a2 once though called twice (2); helper.b comes after the stop."""
    from bench import reading_paths
    (tmp_path / "opd.py").write_text("import helper\n\n\ndef main():\n    helper.a()\n    opd_round()\n"
                                     "    helper.b()\n\n\ndef opd_round():\n    pass\n")
    (tmp_path / "helper.py").write_text("def a():\n    a2()\n    a2()\n\n\ndef a2():\n    return 1\n\n\n"
                                        "def b():\n    return 2\n")
    code = reading_paths.Code(tmp_path)
    path = reading_paths.walk(code, "opd:main", "opd:opd_round")
    assert (path["lines"], path["functions"], path["files"], path["moves"]) == (8, 3, ["opd.py", "helper.py"], 1)
    skipped = reading_paths.walk(code, "opd:main", "opd:opd_round", ("helper",))
    assert (skipped["lines"], skipped["functions"]) == (3, 1)
    whole = reading_paths.walk(code, "opd:main", "")
    assert whole["lines"] == 4 + 3 + 2 + 2 + 2  # main whole, a, a2, opd_round, b
