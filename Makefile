# Two entry points: `make demo` (LoRA on the embedded SmolLM2) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.peftkit-installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The bundled ledger-code task: zero-shot exact match, LoRA training, exact match after, merge.
demo: $(STAMP)
	$(BIN)/peftkit task ledger --out demo_data
	@echo "== zero-shot =="
	$(BIN)/peftkit eval --data demo_data/test.jsonl --max-new-tokens 16 --show 2
	$(BIN)/peftkit train --config examples/demo.yaml --overwrite
	@echo "== after LoRA =="
	$(BIN)/peftkit eval --adapter runs/demo --data demo_data/test.jsonl --max-new-tokens 16 --show 2
	@echo "== merged =="
	$(BIN)/peftkit merge --adapter runs/demo --output-dir runs/demo-merged --overwrite
	$(BIN)/peftkit generate --model runs/demo-merged --prompt "Ledger code for July 4, 1999?" --max-new-tokens 16

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV)

# llama-cpp-python for the llama.cpp round trip of `peftkit export` (docs/export.md): built once
# from source with the portable flags, the wheel cached in ~/.cache/wheels.
LLAMACPP := 0.3.36
llamacpp: $(STAMP)
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || { \
	  ls ~/.cache/wheels/llama_cpp_python-$(LLAMACPP)-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
	    $(BIN)/pip wheel --quiet --no-deps llama-cpp-python==$(LLAMACPP) -w ~/.cache/wheels; \
	  $(BIN)/pip install --quiet ~/.cache/wheels/llama_cpp_python-$(LLAMACPP)-*.whl; }

# The round trip's tests (marked llamacpp); `make test` runs them too, and skips them only
# without llama-cpp-python.
.PHONY: test-llamacpp llamacpp
test-llamacpp: $(STAMP)
	$(BIN)/python -c "import llama_cpp" || { echo "install llama-cpp-python first: docs/export.md"; exit 1; }
	$(BIN)/python -m pytest -q -s -m llamacpp tests/test_export_llamacpp.py
