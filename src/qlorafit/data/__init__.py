"""Training data: JSONL records -> conversations -> token ids and loss labels -> batches."""
