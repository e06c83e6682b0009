#!/bin/bash
# The GPU measurements of docs/bench.md in one go (about 9 min on one H200; run from the repository root:
# `make bench-gpu`, or on a machine with no registry `bash bench/gpu_check.sh` after copying wheels to
# .whl/, installed first). Environment; NCCL smoke runs of teacher_rl.py, nft.py and opd.py on the toy;
# bench/opd_round.py on the SD3.5-M transformer (random weights) at the paper's per-GPU batch: the reference
# loop, the planner's choice at 24 GB, the levers, a whole compiled round, each with its measured and
# planned peak memory; then the largest batch that fits.
OUT=${OUT:-runs/bench-gpu}; PY=${PY:-python3}; mkdir -p "$OUT"
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch,diffusers,transformers,peft;print('torch',torch.__version__,'diffusers',diffusers.__version__,'transformers',transformers.__version__,'peft',peft.__version__)"
S="--steps 2 --eval_every 2 --save_every 2 --eval_prompts 4 --device cuda"
echo "== NCCL smoke: teacher_rl.py, nft.py, opd.py (1 process each)"
for script in "teacher_rl.py --task ocr" "nft.py --task geneval" "opd.py --teachers ckpts/*"; do
  timeout 100 $PY -m torch.distributed.run --nproc_per_node=1 $script $S --out /tmp/smoke-${script%%.*} >> $OUT/smoke.log 2>&1; echo "$script rc=$?"
done
# the paper's per-GPU recipe: 3 prompts per task batch, 10 steps, 9 trained, LoRA r 32, bf16, 512 px
R="--sd35m-random --device cuda --dtype bfloat16 --height 512 --width 512 --prompts_per_batch 3 --recipe paper"
echo "== round: reference loop vs the 24-GB plan vs levers ($SECONDS s)"
timeout 330 $PY -m bench.opd_round $R --train_chunk 3 --teacher_chunk 0 --rounds 2 --levers reference \
  teacher_dtype=model train_chunk=0,grad_checkpointing=true compile=true compile=true,teacher_dtype=model \
  --out $OUT/levers.json 2>&1 | grep -v Warning | tee $OUT/levers.log | tail -14
echo "== largest batch ($SECONDS s)"
timeout $((560 - SECONDS)) $PY -m bench.opd_round $R --rounds 1 --warmup 0 --cfg_pair_reps 0 --train_chunk 0 \
  --grad_checkpointing true --teacher_dtype model --max_batch --max_batch_limit 48 --out $OUT/max_batch.json 2>&1 \
  | grep -v Warning | tee $OUT/max_batch.log | tail -8
echo "== done ($SECONDS s)"
