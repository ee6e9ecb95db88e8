#!/bin/bash
# Single node without Slurm: one process per GPU through torchrun.
#   containers/slurm/torchrun_node.sh recipes/mistral_7b_sft_neftune.yaml [key=value ...]
set -euo pipefail
recipe=${1:?usage: $0 RECIPE.yaml [key=value ...]}
shift
nproc=${NPROC_PER_NODE:-$(nvidia-smi --list-gpus 2>/dev/null | wc -l)}
if [ "${nproc}" -lt 1 ]; then
    nproc=1
fi
# megatron-core's tensor/sequence-parallel communication overlap needs kernels in issue order.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
exec torchrun --standalone --nproc-per-node="${nproc}" -m clinmega.cli train "${recipe}" "$@"
