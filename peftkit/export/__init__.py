"""`peftkit export`: an adapter in the forms serving engines read.

- `gguf_lora`: a llama.cpp LoRA GGUF (llama.cpp, Ollama's ADAPTER), per-module scalings folded
  into the tensors so that llama.cpp's one `adapter.lora.alpha` is right;
- `gguf_model`: the merged model as a full GGUF, built from the base model's own GGUF;
- `vllm`: a PEFT adapter folder within vLLM's rules, and the `vllm serve` line.

`adapter` reads a saved adapter and says what each target cannot take (`blockers`), which
`peftkit doctor --adapter` prints; `base_gguf` reads the base GGUF that llama.cpp will load.
"""

FORMATS = ("gguf-lora", "gguf", "vllm")
