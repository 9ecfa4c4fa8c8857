"""Data: the byte alphabet, FASTA and region reading, the split hash, indexed datasets, `evo2 preprocess`."""
