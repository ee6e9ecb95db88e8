"""The console script's foundation verbs."""

import subprocess
import sys

from clinmega.cli import build_parser, main
from clinmega.models import PUBLISHED_PARAMS


def test_models_lists_presets_with_published_counts(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name, count in PUBLISHED_PARAMS.items():
        assert name in out and f"{count:,}" in out


def test_info_reports_cpu_runtime(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "megatron-core" in out
    assert "rng_tracker" in out or "CUDA available: True" in out


def test_help_lists_every_verb():
    text = build_parser().format_help()
    for verb in ("demo", "import-hf", "export-hf", "prepare", "decontaminate", "train", "plot",
                 "eval", "plan", "models", "info"):
        assert verb in text


def test_console_script_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "clinmega.cli", "--version"],
                            capture_output=True, text=True, check=True)
    assert result.stdout.startswith("clinmega ")


def test_eval_recipe_args_file_parses_into_known_strategies(tmp_path):
    from pathlib import Path

    from clinmega.evaluation.benchmarks import expand_benchmark_names
    from clinmega.evaluation.strategies import parse_strategy

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "eval_prompt_strategies.args"
    args = build_parser().parse_args(["eval", "model-dir", f"@{recipe}", "--out", str(tmp_path),
                                      "--seed", "7"])
    assert args.command == "eval" and args.seed == 7  # later arguments override the file
    assert [parse_strategy(s).name for s in args.strategies.split(",")][-1] == "medprompt"
    assert "pubmedqa" in expand_benchmark_names(args.benchmarks.split(","))


def test_one_convention_keys_aliases_and_one_error_handler(tmp_path, capsys):
    import pytest

    from clinmega.cli import parse_args
    from clinmega.config.keys import config_from_args

    # --tp is only an alias of parallel.tensor_parallel; key=value words win over aliases and --config
    (tmp_path / "layout.yaml").write_text("parallel: {tensor_parallel: 4, pipeline_parallel: 2}\n")
    args = parse_args(["import-hf", "hf", "out", "--config", str(tmp_path / "layout.yaml"), "--tp", "2",
                       "parallel.expert_parallel=2"])
    keys = config_from_args(args)
    assert (keys.parallel.tensor_parallel, keys.parallel.pipeline_parallel, keys.parallel.expert_parallel) == (2, 2, 2)
    help_text = build_parser()._subparsers._group_actions[0].choices["import-hf"].format_help()
    assert "parallel.tensor_parallel = 1   (alias --tp)" in help_text
    # an unknown key: one line naming the nearest valid key, exit 2
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    argv = ["prepare", "pretrain", "--inputs", str(tmp_path / "a.jsonl"), "--output-prefix", str(tmp_path / "p"),
            "pretrain.worker=2"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pretrain.worker" in err[0] and "'workers'" in err[0], err
    assert main(["import-hf", "hf", "out", "parallel.tensor_paralel=2"]) == 2
    assert "Did you mean one of: 'tensor_parallel'" in capsys.readouterr().err
    # a verb without keys refuses key=value words; --debug shows the traceback instead of one line
    with pytest.raises(SystemExit):
        main(["plot", str(tmp_path), "parallel.tensor_parallel=2"])
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        main(["plot", str(tmp_path), "--debug"])
    # one spelling per dtype: eval takes precision.dtype's names, old spellings map to them
    assert config_from_args(parse_args(["eval", "m", "--out", "o", "--dtype", "bfloat16"])).precision.dtype == "bf16"


def test_remaining_verbs_follow_the_convention(tmp_path, capsys):
    """export-hf, eval, plan, models, demo: --config FILE, key=value words with the recipes' names, short
    flags as aliases, keys listed in --help, unknown keys refused by name through the one handler."""
    from clinmega.cli import parse_args
    from clinmega.config.keys import config_from_args

    verbs = build_parser()._subparsers._group_actions[0].choices
    (tmp_path / "keys.yaml").write_text("precision: {dtype: fp16}\nparallel: {tensor_parallel: 4}\n")
    args = parse_args(["eval", "m", "--out", "o", "--config", str(tmp_path / "keys.yaml"), "--tp", "2"])
    keys = config_from_args(args)
    assert (keys.parallel.tensor_parallel, keys.precision.dtype) == (2, "fp16")  # alias over --config
    assert config_from_args(parse_args(["eval", "m", "--out", "o", "--tensor-parallel", "2",
                                        "parallel.tensor_parallel=4"])).parallel.tensor_parallel == 4
    assert "parallel.tensor_parallel = 1   (alias --tp/--tensor-parallel)" in verbs["eval"].format_help()
    # export-hf: --config is the key file like everywhere; the HF config.json is --hf-config
    args = parse_args(["export-hf", "ckpt", "out", "--hf-config", "cfg.json", "precision.dtype=bf16"])
    assert args.hf_config == "cfg.json" and config_from_args(args).precision.dtype == "bf16"
    assert "precision.dtype = None   (alias --dtype)" in verbs["export-hf"].format_help()
    # plan: the recipes' key names; --fp8 sets precision.fp8
    (tmp_path / "plan.yaml").write_text("model: {preset: mistral-7b-v0.1}\ncluster: {num_gpus: 16}\n")
    keys = config_from_args(parse_args(["plan", "--config", str(tmp_path / "plan.yaml"), "--fp8", "--recompute",
                                        "none", "train.global_batch_size=64"]))
    assert (keys.model.preset, keys.cluster.num_gpus, keys.train.global_batch_size) == ("mistral-7b-v0.1", 16, 64)
    assert keys.precision.fp8 == "hybrid" and keys.train.recompute_granularity is None
    assert "cluster.num_gpus = 8   (alias --gpus)" in verbs["plan"].format_help()
    # demo: its knobs are keys too
    keys = config_from_args(parse_args(["demo", "--out", str(tmp_path / "d"), "demo.cpt_steps=3", "runtime.seed=7"]))
    assert (keys.demo.out, keys.demo.cpt_steps, keys.runtime.seed) == (str(tmp_path / "d"), 3, 7)
    assert "demo.sft_steps = 30   (alias --sft-steps)" in verbs["demo"].format_help()
    # models: one preset by key; unknown keys and bad values: one line, exit 2
    assert main(["models", "model.preset=tiny-mixtral"]) == 0
    out = capsys.readouterr().out
    assert "tiny-mixtral" in out and "mistral-7b-v0.1" not in out
    for argv, expected in ((["models", "model.prest=x"], "Did you mean: 'preset'?"),
                           (["plan", "--model", "mistral-7b-v0.1", "cluster.num_gpu=8"], "Did you mean: 'num_gpus'?"),
                           (["demo", "demo.cpt_step=3"], "Did you mean one of: 'cpt_steps'"),
                           (["export-hf", "c", "o", "precision.dtyp=bf16"], "Did you mean: 'dtype'?"),
                           (["eval", "m", "--out", "o", "parallel.tensor_paralel=2"], "Did you mean"),
                           (["plan"], "model.preset: required"),
                           (["export-hf", "c", "o", "precision.dtype=float64"], "is not one of ['fp32', 'bf16', 'fp16']")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"clinmega {argv[0]}: error: ") and expected in err[0], err
