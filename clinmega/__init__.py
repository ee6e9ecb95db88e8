"""clinmega: continuous pretraining, instruct tuning and evaluation of Mistral/Mixtral for clinical work on megatron-core."""

__version__ = "0.1.0"
