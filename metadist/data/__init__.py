"""Data: raw Omniglot -> documented splits -> episode shards (WebDataset) -> streamed meta-batches."""
