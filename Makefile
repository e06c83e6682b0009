# Every target creates the virtual environment on first use (CPU here; the same pins work on CUDA).
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error

.venv/done: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -r requirements.txt
	touch .venv/done

venv: .venv/done

test: .venv/done  ## the whole test suite (CPU, a few minutes)
	$(PY) -m pytest tests -q

.PHONY: venv test
