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

# The llama.cpp round trip of `peftkit export` (tests marked llamacpp). Needs llama-cpp-python,
# built as docs/export.md says; `make test` runs these too, and skips them only without it.
.PHONY: test-llamacpp
test-llamacpp: $(STAMP)
	$(BIN)/python -c "import llama_cpp" || { echo "install llama-cpp-python first: docs/export.md"; exit 1; }
	$(BIN)/python -m pytest -q -s -m llamacpp tests/test_export_llamacpp.py
