# tiedlora: every target sets itself up (a local virtual environment in .venv).
#   make demo   fine-tune TL6 r=8 on the embedded CPU default task and print the result
#   make test   run the default test suite (CPU, gloo)
PY        ?= python3
VENV      ?= .venv
# On our CPU machines this pin takes the CPU build of torch (a wheel on the machine's disk);
# elsewhere it is PyPI's CUDA build of the same release, the one torch CI tests
# (docs/versions.md). The NGC container brings its own torch: install there with --no-deps.
TORCH_SPEC ?= torch==2.13.0
# Test worker processes (pytest-xdist), each taking whole test files (module fixtures are
# built once); 2 uses both cores of our CI machines. TEST_JOBS=0 runs in this process.
TEST_JOBS ?= 2
BIN       := $(VENV)/bin

.PHONY: venv demo test test-slow params bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

demo: venv
	$(BIN)/python -m tiedlora.finetune $(ARGS)

test: venv
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile $(ARGS)

test-slow: venv
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile -m slow $(ARGS)

params: venv
	$(BIN)/python -m tiedlora.params all=true $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun runs .pytest_cache
