"""World detection from torchrun / Slurm variables, and backend choice."""

import pytest
import torch

from clinmega.config import ConfigError, RuntimeConfig
from clinmega.runtime import detect_world, resolve_backend
from clinmega.runtime.distributed import first_slurm_host


def test_torchrun_environment():
    w = detect_world({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                      "MASTER_ADDR": "node7", "MASTER_PORT": "29400"})
    assert (w.rank, w.world_size, w.local_rank, w.master_addr, w.master_port, w.launcher) == \
        (3, 8, 1, "node7", 29400, "torchrun")


def test_slurm_environment_without_torchrun():
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
           "SLURM_NODELIST": "gpu[003-004,010],login1", "SLURM_JOB_ID": "123456"}
    w = detect_world(env)
    assert (w.rank, w.world_size, w.local_rank, w.master_addr, w.launcher) == \
        (9, 16, 1, "gpu003", "slurm")
    assert w.master_port == 20000 + 123456 % 20000
    assert detect_world({**env, "MASTER_ADDR": "h", "MASTER_PORT": "1234"}).master_port == 1234


@pytest.mark.parametrize("nodelist,host", [("a1", "a1"), ("n[1-3]", "n1"), ("x[07,9]", "x07"),
                                           ("p[2-3],q1", "p2")])
def test_slurm_nodelist_parsing(nodelist, host):
    assert first_slurm_host(nodelist) == host


def test_single_process_default():
    w = detect_world({})
    assert (w.rank, w.world_size, w.launcher) == (0, 1, "single") and w.master_port > 0


def test_backend_choice():
    expected = "nccl" if torch.cuda.is_available() else "gloo"
    assert resolve_backend(RuntimeConfig()) == expected
    assert resolve_backend(RuntimeConfig(backend="gloo")) == "gloo"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="runtime.backend"):
            resolve_backend(RuntimeConfig(backend="nccl"))
