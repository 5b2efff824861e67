# Two commands for a new user: `make demo` and `make test`. Both set up .venv from nothing.
# torch goes in first and pinned (a CPU wheel here), so pip never pulls a multi-GB CUDA build for a dependency.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(subst =,_,$(subst /,_,$(TORCH)))

.PHONY: demo test lint install clean bench bench-quick

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/prefkd demo $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

test: $(STAMP) lint
	$(BIN)/pytest -q

# Benchmarks (docs/benchmarks.md): every figure is a ratio measured side by side in one run -> bench/results.json.
# bench runs benchmarks 10-13 at GPT-2-small shape (124M: long on a CPU); bench-quick at the tiny shape.
bench: $(STAMP)
	$(BIN)/python -m bench.run $(ARGS)

bench-quick: $(STAMP)
	$(BIN)/python -m bench.run --quick $(ARGS)

clean:
	rm -rf $(VENV) runs
