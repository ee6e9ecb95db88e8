"""Training: CPT/SFT loops on megatron-core (schedules, DDP, optimizer, checkpoints).

Modules (each importable on its own):

* ``config``     – ``TrainConfig``, ``DataConfig``, ``CheckpointConfig``, ``LoggingConfig``,
  ``ExperimentConfig`` and ``load_experiment(sources, overrides)``;
* ``data``       – the ``BatchSource`` protocol, synthetic / indexed (megatron blend) / SFT sources,
  the step-indexed ``GlobalBatchSampler``, packed attention masks;
* ``step``       – DDP wrapping, the forward step and loss, ``forward_backward`` through
  megatron-core's schedules;
* ``optimizer``  – megatron AdamW + ``OptimizerParamScheduler`` (warmup, cosine/linear, re-warm);
* ``neftune``    – NEFTune noise on the first-stage embedding (masked, per packed sample);
* ``checkpoint`` – atomic (optionally async) dist checkpoints, keep-last-K, resume, SIGTERM;
* ``logging``    – JSONL / TensorBoard / rich progress, FLOPs per token, TFLOPS and MFU;
* ``benchmark_eval`` – ``train.eval_benchmarks``: MCQ accuracy of the live model every N steps,
  the training state kept;
* ``plot``       – loss/LR curves (and benchmark accuracy against tokens seen) PNG of a run;
* ``loop``       – ``train(cfg)``; ``cli`` – the ``train`` and ``plot`` verbs (``register``).
"""
