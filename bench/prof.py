"""One student pass of the SD3.5-M transformer (random weights, bf16, LoRA r 32, 6 rows at 512 px): forward
with and without the LoRA, fp32 vs bf16 LoRA weights, forward + backward, and a torch.profiler table of
one forward + backward. Run from the repository root: python -m bench.prof (CPU: 2 layers)."""
import time, torch
from bench import opd_round as bench
from model import FlowModel, STUDENT
dev = "cuda" if torch.cuda.is_available() else "cpu"
layers, H, B, T = (24, 512, 6, 128) if dev == "cuda" else (2, 64, 2, 8)
pipe = bench.sd35m_random_pipeline(layers, T, dev)
m = FlowModel(pipe, dev, torch.bfloat16, T, name="sd35m")
m.add_student_lora(32, 64)
emb = m.encode_prompts(["a photo of a cat"] * B)
x = torch.randn(B, *m.latent_shape(H, H), device=dev)
t = torch.full((B,), 0.5, device=dev)
flop_f, flop_b = bench.mmdit_flops(m.transformer.config, (H // 16) ** 2, emb.seq.shape[1], 32)
def sync():
    if dev == "cuda": torch.cuda.synchronize()
def timeit(fn, n=5):
    fn(); fn(); sync(); t0 = time.perf_counter()
    for _ in range(n): fn()
    sync(); return (time.perf_counter() - t0) / n
def fwd():
    with torch.no_grad(): m.velocity(x, t, emb, 1.0)
def fwdbwd():
    m.velocity(x, t, emb, 1.0).float().square().mean().backward()
peak = bench.matmul_tflops(torch.device(dev), torch.bfloat16 if dev == "cuda" else torch.float32)
res = {}
with m.adapter(STUDENT):
    res["fwd lora-fp32"] = (timeit(fwd), flop_f * B)
    res["fwd+bwd lora-fp32"] = (timeit(fwdbwd), (flop_f + flop_b) * B)
with m.adapter(None):
    res["fwd no-lora"] = (timeit(fwd), flop_f * B)
for n_, p in m.transformer.named_parameters():
    if f".{STUDENT}." in n_: p.data = p.data.to(torch.bfloat16)
with m.adapter(STUDENT):
    res["fwd lora-bf16"] = (timeit(fwd), flop_f * B)
    res["fwd+bwd lora-bf16"] = (timeit(fwdbwd), (flop_f + flop_b) * B)
for k, (s, f) in res.items():
    print(f"{k:22s} {s*1e3:8.1f} ms  {f/s/1e12:7.1f} TFLOP/s  MFU {f/s/1e12/peak:.1%}", flush=True)
from torch.profiler import profile, ProfilerActivity
acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
for n_, p in m.transformer.named_parameters():
    if f".{STUDENT}." in n_: p.data = p.data.float()
with m.adapter(STUDENT):
    fwdbwd(); sync()
    with profile(activities=acts) as prof:
        fwdbwd(); sync()
key = "cuda_time_total" if dev == "cuda" else "cpu_time_total"
print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60))
