"""Data: records and their tokenization (records), which samples each rank reads at each step (sampler)."""
