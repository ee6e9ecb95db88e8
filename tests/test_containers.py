"""Container and launcher files: linted with hadolint/shellcheck, and consistent with the CLI."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [ROOT / ".ci/run", *sorted((ROOT / "containers/slurm").iterdir())]


def _tool(name):
    path = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(path).exists():
        pytest.fail(f"{name} is not installed: it comes with the dev extra (pip install -e .[dev])")
    return path


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_pass_shellcheck(script):
    result = subprocess.run([_tool("shellcheck"), "--severity=style", str(script)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_dockerfile_passes_hadolint():
    result = subprocess.run([_tool("hadolint"), str(ROOT / "containers/Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_dockerfile_builds_on_ngc_and_copies_existing_paths():
    text = (ROOT / "containers/Dockerfile").read_text()
    assert re.search(r"ARG BASE_IMAGE=nvcr\.io/nvidia/(pytorch|nemo):", text)
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"Dockerfile copies missing path {src}"


def test_sbatch_launches_one_task_per_gpu_through_the_cli():
    text = (ROOT / "containers/slurm/clinmega.sbatch").read_text()
    per_node = int(re.search(r"--ntasks-per-node=(\d+)", text).group(1))
    gpus = int(re.search(r"--gpus-per-node=(\d+)", text).group(1))
    assert per_node == gpus
    assert "--container-image" in text and "srun" in text and "torchrun" not in text
    assert "python -m clinmega.cli" in text


def test_slurm_task_environment_initialises_like_torchrun():
    from clinmega.runtime import detect_world

    env = {"SLURM_PROCID": "11", "SLURM_NTASKS": "16", "SLURM_LOCALID": "3",
           "SLURM_NODELIST": "dgx[01-02]", "SLURM_JOB_ID": "4242"}
    world = detect_world(env)
    assert (world.rank, world.world_size, world.local_rank) == (11, 16, 3)
    assert world.master_addr == "dgx01" and world.master_port == 20000 + 4242
