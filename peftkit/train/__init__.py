"""Supervised fine-tuning: data files -> tokenized examples with label masks -> transformers'
`Trainer` -> an adapter in PEFT's layout. The `peftkit train|eval|generate|chat|merge` commands
are thin shells over these modules."""
