"""NeMo-Run recipes for clinmega: the same ``clinmega`` verbs as tasks of a NeMo-Run experiment.

From Python::

    import nemo_run as run
    from clinmega.launch import nemo_run as cm

    task = cm.train_task("recipes/mistral_7b_sft_neftune.yaml", ["train.lr=1e-5"])   # run.Script
    run.run(task, executor=cm.local_executor(nproc_per_node=8))                      # torchrun
    run.run(task, executor=cm.slurm_executor(account="acct", partition="batch", nodes=4,
                                             container_image="/shared/clinmega.sqsh"))

``train_partial`` gives the same job as a ``run.Partial`` of :func:`run_verb` (serialised with
fiddle, run by NeMo-Run's runner in the job). From the shell, the ``nemo`` CLI finds the entrypoints
below through the ``nemo_run.cli`` entry-point group (``pyproject.toml``)::

    nemo clinmega train recipe=recipes/tiny_cpu_cpt.yaml "overrides=['train.steps=5']"

Slurm jobs launch one task per GPU with ``srun`` (no torchrun): clinmega reads the Slurm variables.

A corpus larger than one node is prepared as ``N`` shard jobs and one merge job that depends on them::

    with run.Experiment("prepare-clinical") as exp:
        cm.add_sharded_prepare(exp, ["--config", "data.yaml", "--output-prefix", "data/clinical"],
                               shards=8, executor=cm.slurm_executor(..., gpus_per_node=0),
                               merge_prefix="data/clinical")
        exp.run()        # shards in parallel (Slurm dependencies), then `clinmega prepare merge`
"""

from __future__ import annotations

from typing import Optional, Sequence

import nemo_run as run


def run_verb(verb: str, args: Sequence[str] = ()) -> None:
    """Run ``clinmega <verb> <args>`` in this process; raise if it fails (a Partial's target)."""
    from clinmega.cli import main

    code = main([verb, *args])
    if code:
        raise RuntimeError(f"clinmega {verb} {' '.join(args)} exited with {code}")


def verb_task(verb: str, args: Sequence[str] = (), python: str = "python") -> run.Script:
    """``python -m clinmega.cli <verb> <args>`` as a NeMo-Run Script (torchrun/srun launch it).

    ``python`` is the interpreter on the machine that runs the job: ``python`` inside an NGC
    container, ``sys.executable`` for this virtual environment on a local machine.
    """
    return run.Script(path="clinmega.cli", m=True, entrypoint=python, args=[verb, *args])


def train_task(recipe: str, overrides: Sequence[str] = (), python: str = "python") -> run.Script:
    return verb_task("train", [recipe, *overrides], python=python)


def train_partial(recipe: str, overrides: Sequence[str] = ()) -> run.Partial:
    return run.Partial(run_verb, verb="train", args=[recipe, *overrides])


# Every job's environment: megatron-core's tensor/sequence-parallel communication overlap needs
# kernels in issue order (the same default as containers/slurm and containers/Dockerfile).
LAUNCH_ENV = {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}


def add_sharded_prepare(exp: run.Experiment, args: Sequence[str], shards: int, executor: run.Executor,
                        verb: str = "pretrain", merge_prefix: Optional[str] = None,
                        python: str = "python") -> list[str]:
    """Add ``clinmega prepare pretrain <args> --shard i/N`` for i < ``shards`` (``verb="decontaminate"``:
    ``clinmega decontaminate ...``) to ``exp``, and, with ``merge_prefix``, a ``clinmega prepare merge``
    job that depends on all of them. Returns the job ids (shards first). Run with ``exp.run()`` (not
    sequential): the shards run in parallel, the merge after them."""
    if verb not in ("pretrain", "decontaminate"):
        raise ValueError(f"verb must be 'pretrain' or 'decontaminate', got {verb!r}")
    if merge_prefix is not None and verb != "pretrain":
        raise ValueError("only 'prepare pretrain' shards are merged")
    head = ("prepare", ["pretrain"]) if verb == "pretrain" else ("decontaminate", [])
    ids = [
        exp.add(verb_task(head[0], [*head[1], *args, "--shard", f"{i}/{shards}"], python=python),
                executor=executor.clone(), name=f"{verb}-{i:05d}-of-{shards:05d}")
        for i in range(shards)
    ]
    if merge_prefix is not None:
        merge = verb_task("prepare", ["merge", "--output-prefix", merge_prefix], python=python)
        ids.append(exp.add(merge, executor=executor.clone(), name="merge", dependencies=list(ids)))
    return ids


def local_executor(nproc_per_node: int = 1) -> run.LocalExecutor:
    """This machine; several processes go through NeMo-Run's Torchrun launcher."""
    if nproc_per_node > 1:
        return run.LocalExecutor(ntasks_per_node=nproc_per_node, launcher="torchrun",
                                 env_vars=dict(LAUNCH_ENV))
    return run.LocalExecutor(env_vars=dict(LAUNCH_ENV))


def slurm_executor(account: str, partition: str, container_image: str, nodes: int = 1,
                   gpus_per_node: int = 8, container_mounts: Optional[list[str]] = None,
                   time: str = "04:00:00", job_dir: str = "nemo_run_jobs") -> run.SlurmExecutor:
    """Slurm + pyxis: one task per GPU launched by srun inside ``container_image``, the image
    built from ``containers/Dockerfile`` (e.g. its enroot ``.sqsh``; the bare NGC PyTorch image
    has neither megatron-core nor clinmega)."""
    if not container_image:
        raise ValueError("slurm_executor: container_image must be the clinmega image built from "
                         "containers/Dockerfile (e.g. /shared/clinmega.sqsh)")
    return run.SlurmExecutor(
        account=account, partition=partition, nodes=nodes, ntasks_per_node=gpus_per_node,
        gpus_per_node=gpus_per_node, container_image=container_image,
        container_mounts=container_mounts or [], time=time, exclusive=True,
        env_vars=dict(LAUNCH_ENV), tunnel=run.LocalTunnel(job_dir=job_dir))


@run.cli.entrypoint(namespace="clinmega", help="clinmega train RECIPE [overrides]")
def train(recipe: str, overrides: Optional[list[str]] = None) -> None:
    run_verb("train", [recipe, *(overrides or [])])


@run.cli.entrypoint(namespace="clinmega", help="clinmega eval MODEL [args]")
def evaluate(model: str, args: Optional[list[str]] = None) -> None:
    run_verb("eval", [model, *(args or [])])
