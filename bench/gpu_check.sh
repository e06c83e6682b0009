#!/bin/bash
# The GPU checks of docs/bench.md in about 6 minutes on one H100 (run from the repository root: `make bench-gpu`;
# on a machine with no registry, copy wheels to .whl/ first: they are installed before anything runs). Offline.
# Every result is written under $OUT as it finishes, so a run cut short keeps what it measured:
#   1. NCCL smoke runs of teacher_rl.py, nft.py and opd.py on the embedded toy base (1 process each);
#   2. real size: a random-weight SD3.5-Medium built from its configs (bench/sd35m_folder.py), 2 steps of
#      teacher_rl.py, nft.py and opd.py at 512 px with the plan each prints (memory.py), and the peak measured
#      beside the plan's prediction (real_size.txt);
#   3. an OPD round at the paper's per-GPU recipe (3 prompts, 10 steps, 9 trained, LoRA r 32, bf16, 512 px):
#      the plan's choice on an 80 GB card against the release's per-timestep loop, eager (round.json);
#   4. the same round compiled, in its own call, with what is left of the budget (compiled.json).
OUT=${OUT:-runs/bench-gpu}; PY=${PY:-python3}; BUDGET=${BUDGET:-350}; mkdir -p "$OUT"
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
left() { echo $(( BUDGET - SECONDS )); }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch,diffusers,transformers,peft;print('torch',torch.__version__,'diffusers',diffusers.__version__,'transformers',transformers.__version__,'peft',peft.__version__)"
} | tee "$OUT/env.txt"

echo "== 1. NCCL smoke runs on the toy base ($SECONDS s)"
T="--steps 2 --eval_every 2 --save_every 2 --eval_prompts 4 --eval_steps 4 --device cuda"
for script in "teacher_rl.py --model models/toy-sd3 --task ocr" "nft.py --model models/toy-sd3 --task geneval" \
              "opd.py --teachers ckpts/toy-geneval ckpts/toy-ocr ckpts/toy-aesthetic"; do
  name=${script%%.*}; rm -rf "$OUT/smoke-$name"
  timeout 90 $PY -m torch.distributed.run --standalone --nproc_per_node=1 $script $T --out "$OUT/smoke-$name" \
    > "$OUT/smoke-$name.log" 2>&1
  echo "$name rc=$?" | tee -a "$OUT/smoke.txt"
done

echo "== 2. real size: random-weight SD3.5-M, 2 steps per script at 512 px ($SECONDS s)"
M=/tmp/sd35m-random
[ -f $M/model_index.json ] || timeout 150 $PY -m bench.sd35m_folder --out $M --device cuda > "$OUT/sd35m_folder.log" 2>&1
R="--model $M --height 512 --width 512 --steps 2 --eval_every 2 --save_every 2 --eval_prompts 4 --eval_steps 4 --device cuda"
J="--reward jpeg_incompressibility=1 --batch 8 --group_size 4"   # no reward model to load; 8 images per step
for run in "teacher_rl.py $R --task ocr --dataset data/toy/ocr --ratio_norm $J --out $OUT/real-ocr" \
           "nft.py $R --task geneval --dataset data/toy/geneval $J --out $OUT/real-geneval" \
           "opd.py $R --teachers $OUT/real-geneval $OUT/real-ocr --prompts_per_batch 3 --out $OUT/real-opd"; do
  out=${run##* }; rm -rf "$out"
  timeout 100 $PY $run > "$out.log" 2>&1; echo "${run%% *} rc=$?"
  $PY - "$out" >> "$OUT/real_size.txt" <<'EOF'
import json, re, sys
from plumbing import memory
out = sys.argv[1]
log = open(out + ".log").read()
line = next((l for l in log.splitlines() if l.startswith("predicted peak ")), "no plan printed")
rows = [json.loads(l) for l in open(out + "/metrics.jsonl")] if line != "no plan printed" else []
alloc = max((r.get("mem/peak_allocated_gib", 0) for r in rows), default=0)
reserved = max((r.get("mem/peak_reserved_gib", 0) for r in rows), default=0)
m = re.match(r"predicted peak ([\d.]+) GiB", line)
tensors = (float(m.group(1)) - memory.CUDA_RESERVED / memory.GiB) / (1 + memory.MARGIN) if m else 0
print(f"{out}: {line}\n  predicted tensors {tensors:.2f} GiB (without margin and context); measured peak allocated "
      f"{alloc:.2f} GiB ({alloc / tensors - 1 if tensors else 0:+.0%}), reserved {reserved:.2f} GiB")
EOF
  tail -2 "$OUT/real_size.txt"
done

echo "== 3. OPD round, paper's per-GPU recipe: the 80 GB plan's choice vs the per-timestep reference loop ($SECONDS s)"
B="--sd35m-random --device cuda --dtype bfloat16 --height 512 --width 512 --prompts_per_batch 3 --recipe paper
   --eval_prompts 0 --overlap_batches 0 --cfg_pair_reps 0"
timeout $(left) $PY -m bench.opd_round $B --train_chunk 3 --teacher_chunk 0 --rounds 1 \
  --levers reference train_chunk=0,grad_checkpointing=true --out "$OUT/round.json" 2>&1 \
  | grep -v Warning | tee "$OUT/round.log" | tail -8

echo "== 4. compiled round ($SECONDS s; $(left) s left)"
if [ "$(left)" -gt 90 ]; then
  timeout $(left) $PY -m bench.opd_round $B --train_chunk 3 --teacher_chunk 0 --rounds 1 --levers compile=true \
    --out "$OUT/compiled.json" 2>&1 | grep -v Warning | tee "$OUT/compiled.log" | tail -5
fi
echo "== done ($SECONDS s)"
