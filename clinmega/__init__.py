"""clinmega: continuous pretraining, instruct tuning and evaluation of Mistral/Mixtral on megatron-core."""
