"""Data: WebDataset shards -> preprocessed, tokenized, collated batches."""
