"""`evo2 train`: windows from indexed datasets, the training loop, checkpoints, distributed set-up."""
