#!/bin/bash
# The README's GPU measurements, in one go (about 8 min on one H200): environment, NCCL smoke runs of
# teacher_rl.py and opd.py on the toy, bench/opd_round.py on the SD3.5-M transformer (random weights), then one
# student pass eager vs compiled. Run from the repository root: `make bench-gpu`, or on a machine with
# no registry `bash bench/gpu_check.sh` after copying wheels to .whl/ (installed first).
OUT=${OUT:-runs/bench-gpu}; PY=${PY:-python3}; mkdir -p "$OUT"
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch,diffusers,transformers,peft;print('torch',torch.__version__,'diffusers',diffusers.__version__,'transformers',transformers.__version__,'peft',peft.__version__)"
echo "== NCCL smoke: teacher_rl.py, 1 process"
timeout 100 $PY -m torch.distributed.run --nproc_per_node=1 teacher_rl.py --task ocr --steps 2 --eval_every 2 --save_every 2 --eval_prompts 4 --device cuda --out /tmp/t > $OUT/smoke.log 2>&1; echo "rc=$?"; tail -3 $OUT/smoke.log; head -c 1500 /tmp/t/metrics.jsonl
echo "== NCCL smoke: opd.py, 1 process"
timeout 100 $PY -m torch.distributed.run --nproc_per_node=1 opd.py --teachers ckpts/* --steps 2 --eval_every 2 --save_every 2 --eval_prompts 4 --device cuda --out /tmp/o >> $OUT/smoke.log 2>&1; echo "rc=$?"; tail -3 $OUT/smoke.log; head -c 1500 /tmp/o/metrics.jsonl
R="--sd35m-random --device cuda --dtype bfloat16 --height 512 --width 512 --prompts_per_batch 3 --train_chunk 3 --train_steps 0 1 2 3 4 5 6 7 8"
echo "== bench levers ($SECONDS s)"
timeout 260 $PY -m bench.opd_round $R --rounds 1 --levers teacher_per_step train_chunk=0,grad_checkpointing=true --out $OUT/levers.json 2>&1 | grep -v Warning | tee $OUT/levers.log | tail -12
echo "== bench max_batch ($SECONDS s)"
timeout $((440 - SECONDS)) $PY -m bench.opd_round $R --rounds 1 --warmup 0 --cfg_pair_reps 0 --train_chunk 0 --grad_checkpointing true --max_batch --max_batch_limit 48 --out $OUT/max_batch.json 2>&1 | grep -v Warning | tee $OUT/max_batch.log | tail -8
echo "== one student pass ($SECONDS s)"
timeout 150 $PY -m bench.prof 2>&1 | grep -v -i warn | tee $OUT/prof.log | head -12
timeout 200 $PY -m bench.prof_compile 2>&1 | grep -v -i warn | tee $OUT/compile.log
echo "== done ($SECONDS s)"
