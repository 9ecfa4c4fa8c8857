"""`evo2 train`: windows from indexed datasets, the one training step and loop every objective runs through
(step.py, loop.py), the guard (owns rollback), optimizer and schedule, metrics, distributed set-up, the run
directory and checkpoint writing."""
