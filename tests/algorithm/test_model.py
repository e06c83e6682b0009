"""model.py: CFG, adapters on one backbone, PEFT/diffusers round trips, clear errors on bad input."""
import json

import pytest
import torch

from helpers import f32_atol
from model import STUDENT, FlowModel
from toy.pipeline import TinySD3Config, build_tiny_pipeline


def _x(model, b=2, seed=0):
    return torch.randn(b, *model.latent_shape(32, 32), generator=torch.Generator().manual_seed(seed))


def _randomise(params, seed=0):
    """peft's default/gaussian init has B = 0 (no effect); give adapters non-zero weights for tests."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(0.2 * torch.randn(p.shape, generator=g))


def test_cfg_scale_one_is_the_conditional_forward_and_cfg_formula(tiny_model):
    e = tiny_model.encode_prompts(["a red cat", "the dog"])
    x = _x(tiny_model)
    t = torch.tensor([0.3, 0.9])
    tr = tiny_model.transformer
    cond = tr(hidden_states=x, timestep=1000 * t, encoder_hidden_states=e.seq, pooled_projections=e.pooled)[0]
    neg = tiny_model.encode_prompts(["", ""])
    uncond = tr(hidden_states=x, timestep=1000 * t, encoder_hidden_states=neg.seq, pooled_projections=neg.pooled)[0]
    torch.testing.assert_close(tiny_model.velocity(x, t, e, 1.0), cond, atol=f32_atol(cond), rtol=0)
    # the guided velocity is a sum of terms 3.5 |uncond| and 4.5 |cond|: the tolerance scales with them
    torch.testing.assert_close(tiny_model.velocity(x, t, e, 4.5), uncond + 4.5 * (cond - uncond),
                               atol=f32_atol(3.5 * uncond, 4.5 * cond), rtol=0)


def test_detached_uncond_branch_same_velocity_gradient_w_times_the_conditional_one(tiny_model64):
    """Flow-GRPO's earlier training forward (paper notes 8a, the ablation): v = sg(v_u) + w (v_c - sg(v_u))
    has the value of the guided velocity and the gradient w grad v_c; attached (the default), the gradient
    is (1 - w) grad v_u + w grad v_c. The references are the two branches run separately at guidance 1.
    In float64: the attached gradient is a difference of terms 3.5 and 4.5 times the size of each branch's,
    so float32 rounding of those terms (kernel- and thread-dependent) would set the tolerance, not the code."""
    m = tiny_model64
    params = m.add_student_lora(rank=4, alpha=8)
    assert {p.dtype for p in params} == {torch.float64}
    _randomise(params, seed=3)
    e, x, w = m.encode_prompts(["a red cat", "the dog"]), _x(m).double(), 4.5
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def grad_of(v):
        return torch.cat([g.flatten() for g in torch.autograd.grad((v * probe).sum(), params)])

    g_cond = grad_of(m.velocity(x, 0.4, e, 1.0))
    g_uncond = grad_of(m.velocity(x, 0.4, m.negative(2), 1.0))
    v_att = m.velocity(x, 0.4, e, w)
    v_det = m.velocity(x, 0.4, e, w, detach_uncond=True)
    # float64 rounding of sums of terms of size `scale`: 1e-10 of it leaves a 1e5 margin above ~1e-15
    scale = (abs(1 - w) * g_uncond.abs() + w * g_cond.abs()).max()
    torch.testing.assert_close(v_det, v_att, atol=1e-10 * v_att.abs().max().item(), rtol=0)
    torch.testing.assert_close(grad_of(v_det), w * g_cond, atol=1e-10 * scale.item(), rtol=0)
    torch.testing.assert_close(grad_of(v_att), (1 - w) * g_uncond + w * g_cond, atol=1e-10 * scale.item(), rtol=0)
    assert (g_uncond.abs() > 1e-3 * scale).any()   # otherwise the two cases could not differ


def test_adapter_switching_and_gradients_reach_only_the_active_adapter(tiny_model, tmp_path):
    _randomise(tiny_model.add_student_lora(rank=4, alpha=8), seed=1)
    tiny_model.save_student(tmp_path / "t")  # a "teacher" that differs from the student after re-randomising
    tiny_model.load_lora(str(tmp_path / "t"), "teach")
    _randomise(tiny_model.trainable_parameters(), seed=2)
    e, x = tiny_model.encode_prompts(["a red cat", "the dog"]), _x(tiny_model)
    v_student = tiny_model.velocity(x, 0.5, e, 1.0)
    with tiny_model.adapter("teach"):
        v_teacher = tiny_model.velocity(x, 0.5, e, 1.0)
    with tiny_model.adapter(None):
        v_base = tiny_model.velocity(x, 0.5, e, 1.0)
    assert (v_student - v_teacher).abs().max() > 1e-3 and (v_student - v_base).abs().max() > 1e-3
    assert (v_teacher - v_base).abs().max() > 1e-3
    # the student is routed again after the context, with identical output
    torch.testing.assert_close(tiny_model.velocity(x, 0.5, e, 1.0), v_student)

    named = dict(tiny_model.transformer.named_parameters())
    for p in named.values():
        p.grad = None
    (v_student.square().mean() + v_teacher.square().mean()).backward()
    student = [n for n in named if f".{STUDENT}." in n]
    assert student and all(named[n].grad is not None for n in student)
    # the last block is context_pre_only: its context queries feed nothing, so only they get zero grad
    last = f"transformer_blocks.{len(tiny_model.transformer.transformer_blocks) - 1}.attn.add_q_proj"
    assert all(named[n].grad.abs().sum() > 0 for n in student if not n.startswith(last))
    others = [n for n, p in named.items() if f".{STUDENT}." not in n]
    assert all(named[n].grad is None for n in others), [n for n in others if named[n].grad is not None][:3]
    assert {id(p) for p in tiny_model.trainable_parameters()} == {id(named[n]) for n in student}


def test_lora_round_trip_bit_exact_and_loads_into_plain_diffusers(tiny_pipe_dir, tiny_model, tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from peft import PeftModel
    _randomise(tiny_model.add_student_lora(rank=4, alpha=8))
    tiny_model.save_student(tmp_path / "lora", {"task": "demo"})
    assert json.loads((tmp_path / "lora" / "run_config.json").read_text())["task"] == "demo"
    modules = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["target_modules"]
    assert modules == sorted(modules) and len(modules) == 8  # same bytes from every process
    e, x = tiny_model.encode_prompts(["a red cat", "the dog"]), _x(tiny_model)
    v_ref = tiny_model.velocity(x, 0.4, e, 1.0)

    fresh = FlowModel.load(tiny_pipe_dir)
    fresh.load_lora(str(tmp_path / "lora"), "loaded")
    src, dst = tiny_model.student_state_dict(), {}
    for n, p in fresh.transformer.named_parameters():
        if ".loaded." in n:
            dst["base_model.model." + n.replace(".loaded.", ".")] = p
    assert src.keys() == dst.keys() and all(torch.equal(src[k], dst[k]) for k in src)
    with fresh.adapter("loaded"):
        torch.testing.assert_close(fresh.velocity(x, 0.4, e, 1.0), v_ref, atol=0, rtol=0)

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_pipe_dir)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    torch.testing.assert_close(FlowModel(pipe).velocity(x, 0.4, e, 1.0), v_ref, atol=f32_atol(v_ref), rtol=0)

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_pipe_dir)
    peft_tr = PeftModel.from_pretrained(pipe.transformer, str(tmp_path / "lora"))
    out = peft_tr(hidden_states=x, timestep=torch.full((2,), 400.0), encoder_hidden_states=e.seq,
                  pooled_projections=e.pooled, return_dict=False)[0]
    torch.testing.assert_close(out, v_ref, atol=f32_atol(v_ref), rtol=0)


def test_full_finetune_trains_every_weight_and_keeps_a_frozen_reference(tiny_model):
    params = tiny_model.enable_full_finetune()
    assert len(params) == len(list(tiny_model.transformer.parameters()))
    e, x = tiny_model.encode_prompts(["a red cat", "the dog"]), _x(tiny_model)
    _randomise(params)
    with tiny_model.adapter(None):
        v_ref = tiny_model.velocity(x, 0.5, e, 1.0)
    assert (tiny_model.velocity(x, 0.5, e, 1.0) - v_ref).abs().max() > 1e-4


def test_full_finetune_keeps_teachers_on_the_frozen_base(tiny_pipe_dir, tiny_model, tmp_path):
    teacher = FlowModel.load(tiny_pipe_dir)
    _randomise(teacher.add_student_lora(rank=4, alpha=8), seed=3)
    teacher.save_student(tmp_path / "t")
    e, x = tiny_model.encode_prompts(["a red cat", "the dog"]), _x(tiny_model)
    v_teacher = teacher.velocity(x, 0.5, e, 1.0)
    _randomise(tiny_model.enable_full_finetune(), seed=4)  # the student drifts away from the base
    tiny_model.load_lora(str(tmp_path / "t"), "teach")
    with tiny_model.adapter("teach"):
        torch.testing.assert_close(tiny_model.velocity(x, 0.5, e, 1.0), v_teacher)
    with tiny_model.adapter(STUDENT):
        v_student = tiny_model.velocity(x, 0.5, e, 1.0)
    assert (v_student - v_teacher).abs().max() > 1e-3
    assert tiny_model.fingerprint() == teacher.fingerprint()


def test_missing_or_wrong_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FlowModel.load(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        FlowModel.load(str(tmp_path / "empty"))
    (tmp_path / "sdxl").mkdir()
    (tmp_path / "sdxl" / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    with pytest.raises(ValueError, match="only SD3-family"):
        FlowModel.load(str(tmp_path / "sdxl"))


def test_adapter_for_another_base_is_rejected(tiny_model, tmp_path):
    other = FlowModel(build_tiny_pipeline(TinySD3Config(heads=4)))
    other.add_student_lora(rank=4, alpha=8)
    other.save_student(tmp_path / "wide")
    with pytest.raises(ValueError, match="another base model"):
        tiny_model.load_lora(str(tmp_path / "wide"), "wide")
    deeper = FlowModel(build_tiny_pipeline(TinySD3Config(layers=3)))
    deeper.add_student_lora(rank=4, alpha=8)
    deeper.save_student(tmp_path / "deep")
    with pytest.raises(ValueError, match="does not have"):
        tiny_model.load_lora(str(tmp_path / "deep"), "deep")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        tiny_model.load_lora(str(tmp_path), "nothing")


def test_bad_resolution(tiny_model):
    with pytest.raises(ValueError, match="not divisible"):
        tiny_model.latent_shape(30, 32)


def test_a_safetensors_header_is_rewritten_with_its_metadata_sorted_and_nothing_else(tmp_path):
    """Two files of the same tensors whose metadata keys were written in opposite orders (as safetensors
    writes its metadata map in hash order) are byte-identical after sort_safetensors_metadata, and load as
    before; a file without metadata is left alone."""
    import struct

    from safetensors import safe_open
    from safetensors.torch import save_file

    from plumbing.model_files import sort_safetensors_metadata
    tensors = {"b": torch.arange(6.0).view(2, 3), "a": torch.ones(4, dtype=torch.bfloat16)}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt", "lora_adapter_metadata": '{"r": 4}'})
    data = (tmp_path / "x.safetensors").read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    files = []
    for order in (["format", "lora_adapter_metadata"], ["lora_adapter_metadata", "format"]):
        header["__metadata__"] = {k: header["__metadata__"][k] for k in order}
        text = json.dumps(header, separators=(",", ":")).encode()
        path = tmp_path / f"{order[0]}.safetensors"
        path.write_bytes(data[:8] + text.ljust(n) + data[8 + n:])
        files.append(path)
    assert files[0].read_bytes() != files[1].read_bytes()
    for path in files:
        sort_safetensors_metadata(path)
    assert files[0].read_bytes() == files[1].read_bytes() and len(files[0].read_bytes()) == len(data)
    with safe_open(files[1], "pt") as f:
        assert f.metadata() == {"format": "pt", "lora_adapter_metadata": '{"r": 4}'}
        assert all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())
    save_file(tensors, tmp_path / "plain.safetensors")
    before = (tmp_path / "plain.safetensors").read_bytes()
    sort_safetensors_metadata(tmp_path / "plain.safetensors")
    assert (tmp_path / "plain.safetensors").read_bytes() == before
