"""Training and evaluation: the config check run before anything compiles (validation.py),
the losses, the optimizer, the mesh and shardings, the loop (train.py), exact evaluation,
the run directory and what a run reports."""
