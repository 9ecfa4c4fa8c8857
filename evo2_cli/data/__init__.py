"""Data: byte-level alphabet facts, FASTA reading, Megatron indexed datasets, `evo2 preprocess`."""
