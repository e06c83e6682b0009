# Every target creates the virtual environment on first use (CPU here; the same pins work on CUDA).
PY := .venv/bin/python
TORCHRUN := .venv/bin/torchrun --standalone --nproc_per_node=2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error

.venv/done: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -r requirements.txt
	touch .venv/done

.venv/test-extras: .venv/done requirements-test.txt
	.venv/bin/pip install -q -r requirements-test.txt
	touch .venv/test-extras

venv: .venv/done

test: .venv/test-extras .venv/extras-checked  ## the whole test suite (CPU, a few minutes), with the optional trackers installed
	$(PY) -m pytest tests -q

check-extras: .venv/extras-checked  ## requirements-rewards.txt resolves beside requirements.txt's pins (pip's resolver; installs nothing)

.venv/extras-checked: .venv/done requirements.txt requirements-rewards.txt
	$(PY) -m pip install --dry-run -q -r requirements-rewards.txt -c requirements.txt
	touch .venv/extras-checked

check-extras-install:  ## install requirements.txt + requirements-rewards.txt into a fresh .venv-extras: no pin moved, PaddleOCR imports (~3 min)
	rm -rf .venv-extras && python3 -m venv .venv-extras
	.venv-extras/bin/pip install -q -r requirements.txt
	.venv-extras/bin/pip freeze > .venv-extras/before.txt
	.venv-extras/bin/pip install -q -r requirements-rewards.txt -c requirements.txt
	.venv-extras/bin/pip freeze | diff .venv-extras/before.txt - | grep '^<' && exit 1 || true
	.venv-extras/bin/pip check
	.venv-extras/bin/python -c "import paddleocr; from paddleocr import PaddleOCR; print('paddleocr', paddleocr.__version__, 'imports')"
	.venv-extras/bin/python -c "import open_clip; print('open_clip', open_clip.__version__, 'imports')" 2>/dev/null || \
	  echo "open_clip does not import here: PyPI's torchvision needs PyPI's torch (a CPU torch file from elsewhere will not do)"

opd: .venv/done  ## Stage 2 on the toy world: distil ckpts/* into one student (2 CPU processes)
	$(TORCHRUN) opd.py --teachers ckpts/* --out runs/opd

# The shipped teachers' commands (docs/stage1.md: the side-by-side they were chosen from)
TEACHER_geneval := nft.py --model models/toy-sd3 --steps 40 --eval_every 40 --save_every 40
TEACHER_ocr := teacher_rl.py --model models/toy-sd3 --ratio_norm --lr 1e-3 --steps 40 --eval_every 40 --save_every 40
TEACHER_aesthetic := nft.py --model models/toy-sd3 --steps 40 --eval_every 40 --save_every 40

teachers: .venv/done  ## Stage 1 on the toy world: the commands of the three shipped teachers, one after another, into ckpts/ (reproducibility: docs/stage1.md)
	mkdir -p runs
	for t in geneval ocr aesthetic; do rm -rf runs/teacher-$$t; \
	  case $$t in geneval) cmd="$(TEACHER_geneval)";; ocr) cmd="$(TEACHER_ocr)";; aesthetic) cmd="$(TEACHER_aesthetic)";; esac; \
	  $(PY) $$cmd --task $$t --out runs/teacher-$$t > runs/teacher-$$t.log 2>&1 || { tail runs/teacher-$$t.log; exit 1; }; \
	done
	for t in geneval ocr aesthetic; do c=runs/teacher-$$t/checkpoint; \
	  test -f $$c/adapter_model.safetensors || { tail runs/teacher-$$t.log; exit 1; }; \
	  rm -rf ckpts/toy-$$t && mkdir -p ckpts/toy-$$t && cp $$c/adapter_config.json $$c/adapter_model.safetensors \
	    $$c/pytorch_lora_weights.safetensors $$c/run_config.json $$c/README.md runs/teacher-$$t/metrics.jsonl \
	    runs/teacher-$$t/config.json ckpts/toy-$$t/ || exit 1; \
	done

demo: .venv/done  ## the toy study from the shipped teachers: OPD, baselines at equal images, Fig. 6 seeds, Table 1 at two CFGs, claims (~1.5 h)
	$(PY) -m study.demo

pretrain: .venv/done  ## the embedded base model, from scratch (measured time: docs/toy-world.md)
	$(PY) -m toy.pretrain --out models/toy-sd3

samples: .venv/done  ## a grid from the embedded base
	$(PY) sample.py --model models/toy-sd3 --prompts "a photo of two red circles" 'a sign that says "A7"' \
		"a beautiful blue triangle" "a photo of a green square left of a yellow circle" --out grid.png

bench-gpu: .venv/done  ## docs/bench.md's GPU checks: toy smokes, real-size SD3.5-M (random weights) smokes and rounds, 1 GPU, no download (~6 min)
	OUT=runs/bench-gpu PY=$(PY) bash bench/gpu_check.sh

.PHONY: venv test check-extras check-extras-install opd teachers demo pretrain samples bench-gpu
