"""memtrain orchestration: data, tokenizers, checkpoints, Ray Train pretraining, the CLI."""
