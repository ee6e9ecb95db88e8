import os
import sys
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "CLINMEGA_CACHE_DIR" not in os.environ:  # derived-file cache (converted tokenizers): one per test run
    import tempfile

    os.environ["CLINMEGA_CACHE_DIR"] = tempfile.mkdtemp(prefix="clinmega-test-cache-")
sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
