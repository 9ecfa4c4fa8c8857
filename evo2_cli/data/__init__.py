"""Data: byte-level alphabet facts, FASTA and region reading, the split hash, Megatron indexed datasets and
`evo2 preprocess` (a package by stage); transforms shape sequences into documents."""
