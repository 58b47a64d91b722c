"""Training duet's embedded default model: tokenizer, data, and the training loop."""
