"""Import a checkpoint: `python conversion/import_hf.py --help` (same as `clinmega import-hf`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from clinmega.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["import-hf", *sys.argv[1:]]))
