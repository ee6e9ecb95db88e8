"""NeMo-Run: a tiny recipe through NeMo-Run's LocalExecutor on CPU, as a Script and as a Partial,
and the `nemo_run.cli` entry point."""

import json
import os
import sys
from importlib import metadata
from pathlib import Path

import pytest

run = pytest.importorskip("nemo_run", reason="nemo-run comes with the launch extra")

from clinmega.launch import nemo_run as cm  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_cpu_cpt.yaml"


@pytest.fixture(autouse=True)
def nemorun_home(tmp_path, monkeypatch):
    """Jobs under a temporary NEMORUN_HOME, with this environment's python first on PATH (as in
    an activated virtual environment: NeMo-Run's runner is started as `python -m ...`)."""
    from nemo_run.config import get_nemorun_home, set_nemorun_home

    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")

    before = get_nemorun_home()
    set_nemorun_home(str(tmp_path / "nemo_run_home"))
    yield
    set_nemorun_home(before)


def _steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return sorted({json.loads(line)["step"] for line in lines if '"loss"' in line})


def test_script_task_runs_under_local_executor(tmp_path):
    run_dir = tmp_path / "script_run"
    task = cm.train_task(str(RECIPE), [f"run_dir={run_dir}", "train.steps=3", "train.warmup_steps=1",
                                       "train.save_interval=0", "train.eval_interval=0",
                                       "logging.progress=false"], python=sys.executable)
    with run.Experiment("clinmega-tiny", executor=cm.local_executor(), log_level="WARN") as exp:
        exp.add(task, name="train")
        exp.run(sequential=True, detach=False)
    assert _steps(run_dir) == [1, 2, 3]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "3"


def test_partial_task_runs_under_local_executor(tmp_path):
    run_dir = tmp_path / "partial_run"
    partial = cm.train_partial(str(RECIPE), [f"run_dir={run_dir}", "train.steps=2",
                                             "train.warmup_steps=1", "train.eval_interval=0",
                                             "logging.progress=false"])
    run.run(partial, executor=cm.local_executor(), detach=False, name="clinmega-partial")
    assert _steps(run_dir) == [1, 2]


def test_entry_point_and_executors_are_declared():
    eps = metadata.entry_points().select(group="nemo_run.cli")
    assert any(ep.name == "clinmega" and ep.value == "clinmega.launch.nemo_run" for ep in eps)
    torchrun = cm.local_executor(nproc_per_node=2)
    assert torchrun.ntasks_per_node == 2
    assert torchrun.launcher == "torchrun" or "torchrun" in type(torchrun.launcher).__name__.lower()
    slurm = cm.slurm_executor(account="a", partition="p", nodes=2, container_image="img.sqsh")
    assert (slurm.nodes, slurm.ntasks_per_node, slurm.gpus_per_node) == (2, 8, 8)
    assert slurm.container_image == "img.sqsh"


def test_sharded_prepare_two_shards_and_merge_under_local_executor(tmp_path):
    from test_data_shards import assert_same_dataset, make_corpus, one_shot

    inputs = make_corpus(tmp_path)
    prefix = str(tmp_path / "sharded")
    with run.Experiment("clinmega-prepare", executor=cm.local_executor(), log_level="WARN") as exp:
        ids = cm.add_sharded_prepare(exp, ["--inputs", *inputs, "--output-prefix", prefix, "--workers", "1",
                                           "--no-progress"], shards=2, executor=cm.local_executor(),
                                     merge_prefix=prefix, python=sys.executable)
        assert len(ids) == 3 and exp.jobs[2].dependencies == ids[:2]
        exp.run(detach=False)
    one_shot(tmp_path, inputs)
    assert_same_dataset(str(tmp_path / "one"), prefix)
