"""Launch: parallel-layout planner, torchrun/Slurm/NeMo-Run glue."""
