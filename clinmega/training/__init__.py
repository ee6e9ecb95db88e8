"""Training: CPT/SFT loops on megatron-core (schedules, DDP, optimizer, checkpoints)."""
