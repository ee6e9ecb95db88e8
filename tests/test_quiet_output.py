"""Quiet output: third-party warnings are counted, not printed, unless --verbose; ours still print."""

import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import clinmega
from clinmega.utils.quiet import library_warnings

ROOT = Path(__file__).resolve().parents[1]
# A line a third-party warning leaves on stderr: Python's warning format, its source line, or a
# library logger's message (megatron-core's GPTModel deprecation, TE/apex fallbacks, gloo).
LIBRARY_LINE = re.compile(r"site-packages|Warning:|warnings\.warn|DEPRECATED|deprecated|Apex|"
                          r"Transformer Engine|ProcessGroupGloo")


def test_library_warnings_counted_ours_printed(capsys):
    ours = str(Path(clinmega.__file__).parent / "data" / "tokenizers.py")
    with warnings.catch_warnings(record=True) as shown, library_warnings() as log:
        warnings.simplefilter("always")
        warnings.warn_explicit("library deprecation", FutureWarning, "/site-packages/lib/x.py", 3)
        warnings.warn_explicit("clinmega's own warning", UserWarning, ours, 7)
        logging.getLogger("megatron.core.models").warning("GPTModel IS DEPRECATED")
        logging.getLogger("clinmega.data").warning("our log warning")
        logging.getLogger("torch.distributed").error("a library error still shows")
        assert os.environ["CLINMEGA_LIBRARY_WARNINGS"] == str(log)
        with library_warnings() as nested:  # a clinmega command run by another: counts into the parent's log
            warnings.warn_explicit("nested library warning", FutureWarning, "/site-packages/lib/y.py", 5)
        assert nested == log
    err = capsys.readouterr().err
    assert "library deprecation" not in err and "GPTModel" not in err and "nested" not in err
    assert [str(w.message) for w in shown] == ["clinmega's own warning"]  # printed the usual way
    assert "our log warning" in err and "a library error" in err
    assert err.rstrip().endswith("3 library warnings; --verbose to show") and err.count("library warning") == 1
    assert not log.exists() and "CLINMEGA_LIBRARY_WARNINGS" not in os.environ
    with warnings.catch_warnings(record=True) as shown, library_warnings(verbose=True):
        warnings.warn_explicit("shown when verbose", FutureWarning, "/site-packages/lib/x.py", 4)
    assert [str(w.message) for w in shown] == ["shown when verbose"]


def test_torch_warning_through_cpu_compat_mode_is_a_library_warning(capsys):
    """torch warns with the stack level of its caller; under cpu_compat's TorchFunctionMode that caller
    is the mode's pass-through line in clinmega/runtime/cpu_compat.py, yet the warning is torch's."""
    import torch

    from clinmega.runtime.cpu_compat import CudaToCpuMode

    ours = str(Path(clinmega.__file__).parent / "runtime" / "local_group.py")
    with warnings.catch_warnings(record=True) as shown, library_warnings() as log:
        warnings.simplefilter("always")
        non_leaf = torch.ones(2, requires_grad=True) * 2
        with CudaToCpuMode():
            assert non_leaf.grad is None  # torch: "The .grad attribute of a Tensor that is not a leaf ..."
        warnings.warn_explicit("clinmega's own warning", UserWarning, ours, 7)
        recorded = log.read_text()
        assert "not a leaf" in recorded and "cpu_compat.py:" in recorded  # torch's, attributed to our line
    assert [str(w.message) for w in shown] == ["clinmega's own warning"]
    err = capsys.readouterr().err
    assert "not a leaf" not in err and err.rstrip().endswith("1 library warning; --verbose to show")


def test_info_stderr_has_no_library_warning_lines_unless_verbose():
    """`clinmega info` imports torch and megatron-core's optimizer/DDP modules, which warn about the
    missing TE/apex kernels (and torch about CUDA_HOME): a real command with real library warnings."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_CPP_LOG_LEVEL", "TRANSFORMERS_VERBOSITY")}
    env["PYTHONPATH"] = str(ROOT)

    def run(*extra):
        result = subprocess.run([sys.executable, "-m", "clinmega.cli", "info", *extra], env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        assert "megatron-core" in result.stdout
        return result.stderr.splitlines()

    quiet = run()
    assert [line for line in quiet if LIBRARY_LINE.search(line)] == [], quiet
    assert re.fullmatch(r"\d+ library warnings?; --verbose to show", quiet[-1]), quiet
    verbose = run("--verbose")
    assert any("Transformer Engine and Apex are not installed" in line for line in verbose), verbose
    assert not any("--verbose to show" in line for line in verbose)


def test_cpp_log_lines_of_a_relayed_child_are_counted(monkeypatch, capsys):
    """c10's log lines go straight to fd 2, past Python's warnings. A child whose stderr clinmega reads
    (the demo's stages) logs them at the user's TORCH_CPP_LOG_LEVEL (c10's WARNING when unset, not quiet's
    ERROR) and the relay counts each one; other lines pass; --verbose passes everything."""
    import socket

    from clinmega.utils.quiet import CPP_LOG_LINE, child_env, relay_stderr

    monkeypatch.delenv("TORCH_CPP_LOG_LEVEL", raising=False)
    with library_warnings():
        assert os.environ["TORCH_CPP_LOG_LEVEL"] == "ERROR" and child_env()["TORCH_CPP_LOG_LEVEL"] == "WARNING"
    capsys.readouterr()
    monkeypatch.setenv("TORCH_CPP_LOG_LEVEL", "INFO")  # the user's level: gloo's TCP store then logs its connection
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import sys, torch.distributed as dist; "
            f"dist.init_process_group('gloo', init_method='tcp://127.0.0.1:{port}', rank=0, world_size=1); "
            "dist.destroy_process_group(); print('a line of ours', file=sys.stderr)")

    def run():
        proc = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        shown = []
        return relay_stderr(proc.stderr.splitlines(keepends=True), shown.append), shown

    with library_warnings() as log:
        kept, shown = run()
        assert kept >= 1 and "socket.cpp" in log.read_text(), log.read_text()
        assert shown == ["a line of ours\n"]
    err = capsys.readouterr().err.strip()
    assert err == f"{kept} library warning{'' if kept == 1 else 's'}; --verbose to show"
    with library_warnings(verbose=True):
        kept, shown = run()
    assert kept == 0 and any(CPP_LOG_LINE.match(line) for line in shown) and "a line of ours\n" in shown
