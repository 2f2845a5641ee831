"""Training engine: Megatron-Core GPTModel, scratch/CPT runs, checkpoints, evaluation hooks."""
