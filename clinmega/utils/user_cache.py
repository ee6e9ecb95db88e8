"""The per-user cache folder for derived files that are cheap to lose and costly to rebuild on every
start (converted tokenizers): ``$CLINMEGA_CACHE_DIR``, else ``$XDG_CACHE_HOME/clinmega``, else
``~/.cache/clinmega``. Users of it must work, only slower, when it cannot be written."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir() -> Path:
    if os.environ.get("CLINMEGA_CACHE_DIR"):
        return Path(os.environ["CLINMEGA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "clinmega"
