"""Instant start: building the parser, every verb's --help and the verbs that need no model code
(`plan`, `models`, `plot`) import neither torch, megatron-core nor transformers."""

import json
import os
import subprocess
import sys
from pathlib import Path

HEAVY = ("torch", "megatron", "transformers")

PROBE = r"""
import json, sys
import clinmega.cli as cli

def heavy():
    return sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))

HEAVY = json.loads(sys.argv[1])
run_dir = sys.argv[2]
seen = {}
parser = cli.build_parser()
seen["build_parser"] = heavy()
verbs = parser._subparsers._group_actions[0].choices
for name, sub in verbs.items():
    sub.format_help()
    for inner in getattr(sub, "_subparsers", None) and sub._subparsers._group_actions[0].choices.values() or ():
        inner.format_help()
seen["every --help"] = heavy()
for argv in (["models"], ["plan", "--model", "mixtral-8x7b", "--gpus", "64", "--top", "1"], ["plot", run_dir]):
    assert cli.main(argv) == 0, argv
    seen[" ".join(argv[:1])] = heavy()
print(json.dumps(seen))
"""


def test_parser_help_and_light_verbs_import_no_torch(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5.0 - s / 10, "lr": 1e-4}) + "\n"
                                               for s in range(1, 6)))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    result = subprocess.run([sys.executable, "-c", PROBE, json.dumps(HEAVY), str(run)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen == {stage: [] for stage in seen}, seen
    assert (run / "curves.png").stat().st_size > 0
