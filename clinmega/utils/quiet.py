"""Quiet output: third-party warnings a user cannot act on are counted, not printed.

megatron-core deprecations, Transformer Engine / apex fallbacks, torch FutureWarnings and the like
bury a command's own output. Inside :func:`library_warnings` (``clinmega.cli`` wraps every verb in
it) a Python warning or a log record at WARNING level raised by code outside the clinmega package is
appended to a per-command log file instead of being printed; at the end one line says how many
there were (``12 library warnings; --verbose to show``). clinmega's own warnings, errors from any
library, and progress bars are untouched. ``--verbose`` prints everything as usual.

Worker processes share the count: forked workers inherit the hooks, spawned ones call
:func:`apply_in_worker` (the log file's path travels in ``$CLINMEGA_LIBRARY_WARNINGS``), and a
``clinmega`` command started by another one (``clinmega demo``'s stages) counts into its parent's
log, so the demo ends with one total.

Warnings that C++ code writes straight to file descriptor 2 bypass Python: c10's ``LOG(WARNING)`` /
``TORCH_WARN`` outside a Python call (gloo's ``[W ProcessGroupGloo.cpp:N] Warning: Unable to resolve
hostname to a (local) address ...``, c10d's socket/store messages: ``[W1202 00:16:51.962 socket.cpp:955]
...``). In a quiet command they are silenced at their source by ``TORCH_CPP_LOG_LEVEL=ERROR`` (c10 reads
it when torch loads) unless the user set that variable, and transformers' logger by
``TRANSFORMERS_VERBOSITY=error`` likewise. Where clinmega runs a child process whose stderr it reads
(``clinmega demo``'s stages: :func:`child_env` + :func:`relay_stderr`), the child logs C++ warnings at
c10's default level and the relay counts each such line (:data:`CPP_LOG_LINE`) instead of printing it;
C++ errors (``[E...]``) and every other line pass through.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

LOG_ENV = "CLINMEGA_LIBRARY_WARNINGS"  # path of the log file, set while quiet
VERBOSE_ENV = "CLINMEGA_VERBOSE"       # "1": print library warnings (inherited by workers)
QUIET_ENV_DEFAULTS = {"TORCH_CPP_LOG_LEVEL": "ERROR", "TRANSFORMERS_VERBOSITY": "error"}
USER_CPP_LOG_ENV = "CLINMEGA_USER_TORCH_CPP_LOG_LEVEL"  # the user's own value ("" = unset), while quiet
# A warning or info line of c10's logger (glog layout, old and new: ``[W ProcessGroupGloo.cpp:559]``,
# ``[W1202 00:16:51.962997278 socket.cpp:955]``, optionally with a pid) or of gloo itself (``[Gloo] ...``).
CPP_LOG_LINE = re.compile(r"^\[[WI](\d{4} \d\d:\d\d:\d\d\.\d+)?( +\d+)? [\w./-]+\.(cpp|cc|h|hpp):\d+\] |^\[Gloo\] ")
_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])
# clinmega files whose frames only pass a library call through: a warning attributed to them was
# raised inside the library. cpu_compat's TorchFunctionMode calls every torch function of
# megatron-core's CPU path (``return func(*args, **kwargs)``), so torch's FutureWarnings/UserWarnings
# name that line; cpu_compat raises no Python warning of its own (it only logs).
PASS_THROUGH_FILES = (os.path.join(_PACKAGE_DIR, "runtime", "cpu_compat.py"),)


def _ours(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path.startswith(_PACKAGE_DIR + os.sep) and path not in PASS_THROUGH_FILES


def _record(log: str, line: str) -> None:
    with open(log, "a", encoding="utf-8") as f:  # one short append per warning: safe across processes
        f.write(line.replace("\n", " ") + "\n")


class _LibraryRecords(logging.Filter):
    """Root-handler filter: third-party records below ERROR go to the log file, not the screen."""

    def __init__(self, log: str):
        super().__init__()
        self.log = log

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] == "clinmega" or record.levelno >= logging.ERROR:
            return True
        if record.levelno >= logging.WARNING:
            _record(self.log, f"{record.name}: {record.getMessage()}")
        return False


# Library loggers whose records torch's own logging handler prints (torch._logging: the "torch"
# logger does not propagate to root), so root's filtered handler never sees them.
OWN_HANDLER_LOGGERS = ("torch.utils.cpp_extension",)


def _install(log: str) -> tuple:
    """Route library warnings to ``log``; returns what :func:`_uninstall` restores."""
    original_show = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if _ours(filename):
            original_show(message, category, filename, lineno, file, line)
        else:
            _record(log, f"{category.__name__}: {message} ({filename}:{lineno})")

    warnings.showwarning = show
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    records = _LibraryRecords(log)
    handler.addFilter(records)
    root = logging.getLogger()
    root.addHandler(handler)
    for name in OWN_HANDLER_LOGGERS:  # their records go to the library's own handler, not root's
        logging.getLogger(name).addFilter(records)
    saved_env = {k: os.environ.get(k) for k in (LOG_ENV, USER_CPP_LOG_ENV, *QUIET_ENV_DEFAULTS)}
    os.environ[LOG_ENV] = log
    if USER_CPP_LOG_ENV not in os.environ:  # the outermost quiet command: remember the user's own value
        os.environ[USER_CPP_LOG_ENV] = os.environ.get("TORCH_CPP_LOG_LEVEL", "")
    for key, value in QUIET_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    return original_show, handler, records, saved_env


def _uninstall(state: tuple) -> None:
    original_show, handler, records, saved_env = state
    warnings.showwarning = original_show
    logging.getLogger().removeHandler(handler)
    for name in OWN_HANDLER_LOGGERS:
        logging.getLogger(name).removeFilter(records)
    for key, value in saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def count(log: str | Path) -> int:
    try:
        return len(Path(log).read_text(encoding="utf-8").splitlines())
    except FileNotFoundError:
        return 0


@contextlib.contextmanager
def library_warnings(verbose: bool = False, report: bool = True) -> Iterator[Path | None]:
    """Count third-party warnings instead of printing them (everything prints when ``verbose``);
    on exit print ``N library warnings; --verbose to show`` when N > 0 and ``report``. Yields the
    log file's path (None when verbose)."""
    if verbose or os.environ.get(VERBOSE_ENV) == "1":
        previous = os.environ.get(VERBOSE_ENV)
        os.environ[VERBOSE_ENV] = "1"
        try:
            yield None
        finally:
            if previous is None:
                os.environ.pop(VERBOSE_ENV, None)
        return
    parent = os.environ.get(LOG_ENV)
    if parent and os.path.isfile(parent):  # a clinmega command run by another (the demo's stages):
        state = _install(parent)           # count into the parent's log; the parent reports
        try:
            yield Path(parent)
        finally:
            _uninstall(state)
        return
    fd, log = tempfile.mkstemp(prefix="clinmega-library-warnings-", suffix=".log")
    os.close(fd)
    state = _install(log)
    try:
        yield Path(log)
    finally:
        _uninstall(state)
        n = count(log)
        os.unlink(log)
        if n and report:
            s = "" if n == 1 else "s"
            print(f"{n} library warning{s}; --verbose to show", file=sys.stderr, flush=True)


def apply_in_worker() -> None:
    """In a spawned worker of a quiet command: count library warnings into the parent's log."""
    log = os.environ.get(LOG_ENV)
    if log and os.environ.get(VERBOSE_ENV) != "1":
        _install(log)


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a child process whose stderr goes through :func:`relay_stderr`: C++ warnings are
    logged at the user's ``TORCH_CPP_LOG_LEVEL`` (c10's default, WARNING, when unset), so the relay can
    count them (set explicitly: the child's own quiet layer only fills in an unset variable)."""
    env = dict(os.environ if env is None else env)
    user = env.get(USER_CPP_LOG_ENV)
    if env.get(LOG_ENV) and user is not None:
        env["TORCH_CPP_LOG_LEVEL"] = user or "WARNING"
    return env


def relay_stderr(lines, write) -> int:
    """Pass a child's stderr ``lines`` (text, with their newlines) to ``write``, except C++ warning lines
    (:data:`CPP_LOG_LINE`) while quiet: those go to the library-warning log. Returns how many it kept back."""
    log = os.environ.get(LOG_ENV) if os.environ.get(VERBOSE_ENV) != "1" else None
    kept = 0
    for line in lines:
        if log and CPP_LOG_LINE.match(line):
            _record(log, "C++: " + line.rstrip("\n"))
            kept += 1
        else:
            write(line)
    return kept
