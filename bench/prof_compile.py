"""One student pass of the SD3.5-M transformer (random weights, bf16, LoRA r 32, 512 px), forward and
forward + backward at 6 and 24 rows, eager vs FlowModel.compile_blocks (regional torch.compile); MFU
against a bf16 matmul rate measured in the same run. Run from the repository root:
python -m bench.prof_compile"""
import time, torch
from bench import opd_round as bench
from model import FlowModel, STUDENT
dev = "cuda" if torch.cuda.is_available() else "cpu"
layers, H, T = (24, 512, 128) if dev == "cuda" else (2, 64, 8)
pipe = bench.sd35m_random_pipeline(layers, T, dev)
m = FlowModel(pipe, dev, torch.bfloat16, T, name="sd35m")
m.add_student_lora(32, 64)
peak = bench.matmul_tflops(torch.device(dev), torch.bfloat16 if dev == "cuda" else torch.float32)
def sync():
    if dev == "cuda": torch.cuda.synchronize()
def run(label, B):
    emb = m.encode_prompts(["a photo of a cat"] * B)
    x = torch.randn(B, *m.latent_shape(H, H), device=dev); t = torch.full((B,), 0.5, device=dev)
    f, b = bench.mmdit_flops(m.transformer.config, (H // 16) ** 2, emb.seq.shape[1], 32)
    def fwd():
        with torch.no_grad(): m.velocity(x, t, emb, 1.0)
    def fwdbwd():
        m.velocity(x, t, emb, 1.0).float().square().mean().backward()
    for name, fn, fl in (("fwd", fwd, f * B), ("fwd+bwd", fwdbwd, (f + b) * B)):
        sync(); t0 = time.perf_counter(); fn(); sync(); first = time.perf_counter() - t0
        fn(); sync(); t0 = time.perf_counter()
        for _ in range(5): fn()
        sync(); s = (time.perf_counter() - t0) / 5
        print(f"{label:8s} B={B:3d} {name:8s} first {first:6.1f} s  {s*1e3:8.1f} ms  MFU {fl/s/1e12/peak:.1%}", flush=True)
with m.adapter(STUDENT):
    run("eager", 6); run("eager", 24)
    m.compile_blocks()
    run("compiled", 6); run("compiled", 24)
