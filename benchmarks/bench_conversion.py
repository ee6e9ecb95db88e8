"""Conversion speed and memory on full-size shapes (not a test; needs disk, not a GPU).

Generates a random bf16 HF checkpoint shaped like Mistral-7B (``--layers`` truncates it) and one
shaped like Mixtral-8x7B truncated to ``--mixtral-layers`` layers, then times ``import-hf`` and
``export-hf`` (each in a fresh process, so its peak RSS is its own) against the disk limit:
reading the same input files and writing the same number of bytes, fsync'd, in a plain loop,
measured right before and right after each step (mean). ``--tp2`` adds an import on 2 ranks
(torchrun) at TP2, whose checkpoint holds TP chunks as a training run's does, and an export from
it; peak RSS is then that of the largest rank. The page cache is dropped before every
measurement when the process may do so (root).

    python benchmarks/bench_conversion.py --workdir /tmp/bench --layers 8
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clinmega.conversion.hf_io import PlannedTensor, SafetensorsWriter, write_json  # noqa: E402
from clinmega.conversion.mapping import units  # noqa: E402
from clinmega.models import get_preset, to_hf_config  # noqa: E402

CHUNK = 64 * 2**20


def generate(preset: str, layers: int, folder: Path) -> int:
    """A random bf16 HF checkpoint (5 GB shards + index); returns its weight bytes."""
    cfg = get_preset(preset, num_layers=layers)
    planned = [PlannedTensor(name, shape, torch.bfloat16) for u in units(cfg)
               for name, shape in zip(u.hf_names, u.mapping.hf_shapes)]
    if (folder / "config.json").exists():
        return sum(t.nbytes for t in planned)
    tmp = folder.with_name(folder.name + ".incomplete")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = SafetensorsWriter(tmp, planned)
    # Tensors are windows of one random pool at random offsets: random enough for IO, and fast.
    gen = torch.Generator().manual_seed(0)
    pool = torch.empty(2**26, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen)
    for t in planned:
        numel = t.nbytes // 2
        flat = torch.empty(numel, dtype=torch.bfloat16)
        for start in range(0, numel, pool.numel()):
            n = min(pool.numel(), numel - start)
            offset = int(torch.randint(0, pool.numel() - n + 1, (1,), generator=gen))
            flat[start:start + n] = pool[offset:offset + n]
        writer.write(t.name, flat.view(t.shape))
    writer.close()
    write_json(tmp / "config.json", to_hf_config(cfg))
    os.replace(tmp, folder)
    return sum(t.nbytes for t in planned)


def drop_caches() -> bool:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a child process."""
    drop_caches()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1",
                                      "PYTHONPATH": str(ROOT)})
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return seconds, usage.ru_maxrss * 1024


COPY = """
import os, sys
src, dst, chunk = sys.argv[1], sys.argv[2], int(sys.argv[3])
buf = bytearray(chunk)
for root, _, files in os.walk(src):
    for name in files:
        path = os.path.join(root, name)
        out = os.path.join(dst, os.path.relpath(path, src).replace(os.sep, "_"))
        with open(path, "rb", buffering=0) as f, open(out, "wb", buffering=0) as g:
            while n := f.readinto(buf):
                g.write(memoryview(buf)[:n])
            os.fsync(g.fileno())
"""


def disk_limit(src: Path, scratch: Path) -> float:
    """Seconds to read every file under ``src`` and write the same bytes (fsync'd)."""
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    seconds, _ = run([sys.executable, "-c", COPY, str(src), str(scratch), str(CHUNK)])
    shutil.rmtree(scratch)
    return seconds


def timed_step(cmd: list[str], src: Path, scratch: Path, drop: Path | None) -> tuple:
    """(seconds, peak RSS, disk limit) of one conversion step. The shared disk's speed drifts by
    up to 2x between minutes, so the disk limit is measured right before and right after the
    step and averaged (``drop``, an output no longer needed, is removed first to make room)."""
    before = disk_limit(src, scratch)
    seconds, rss = run(cmd)
    if drop is not None:
        shutil.rmtree(drop)
    after = disk_limit(src, scratch)
    return seconds, rss, (before + after) / 2


def convert(step: str, src: Path, dst: Path, ranks: int = 1, *layout: str) -> list[str]:
    script = [str(ROOT / "conversion" / f"{step}_hf.py"), str(src), str(dst), *layout,
              "--overwrite", "--no-progress"]
    if ranks == 1:
        return [sys.executable, *script]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}", *script]


def bench(name: str, preset: str, layers: int, work: Path, keep: bool, tp2: bool
          ) -> list[tuple]:
    folder = work / name
    hf, mcore, tp2_ckpt = folder / "hf", folder / "mcore", folder / "mcore-tp2"
    start = time.perf_counter()
    size = generate(preset, layers, hf)
    print(f"{name}: {size / 1e9:.2f} GB of bf16 weights ({time.perf_counter() - start:.0f} s "
          "to generate)", flush=True)
    steps = [("import", hf, convert("import", hf, mcore), None),
             ("export", mcore, convert("export", mcore, folder / "export"), folder / "export")]
    if tp2:  # a checkpoint with TP chunks (each rank writes its shards), exported from there
        steps += [("import 2 ranks TP2", hf, convert("import", hf, tp2_ckpt, 2, "--tp", "2"),
                   None),
                  ("export from TP2", tp2_ckpt, convert("export", tp2_ckpt, folder / "export2"),
                   folder / "export2")]
    rows = []
    for step, src, cmd, drop in steps:
        rows.append((name, step, size, *timed_step(cmd, src, work / "copy",
                                                   None if keep else drop)))
    if not keep:
        shutil.rmtree(mcore)
        shutil.rmtree(tp2_ckpt, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/clinmega-bench"))
    parser.add_argument("--layers", type=int, default=32,
                        help="Mistral-7B layers (32 = full; 0 skips Mistral)")
    parser.add_argument("--mixtral-layers", type=int, default=4, help="0 skips Mixtral")
    parser.add_argument("--keep", action="store_true",
                        help="keep converted outputs (needs 4x the checkpoint size free on disk, "
                             "3x without)")
    parser.add_argument("--tp2", action="store_true",
                        help="also import Mistral on 2 ranks at TP2 and export from that")
    args = parser.parse_args()
    cached = "dropped" if drop_caches() else "NOT dropped (needs root)"
    rows = []
    if args.layers:
        rows += bench(f"mistral-7b-L{args.layers}", "mistral-7b-v0.1", args.layers, args.workdir,
                      args.keep, args.tp2)
    if args.mixtral_layers:
        rows += bench(f"mixtral-8x7b-L{args.mixtral_layers}", "mixtral-8x7b",
                      args.mixtral_layers, args.workdir, args.keep, tp2=False)
    print(f"\npage cache {cached} before each run; disk limit = read the inputs + write as many "
          "bytes, fsync'd (mean of right before and right after the step)")
    print(f"{'model':<20} {'step':<18} {'GB':>6} {'seconds':>8} {'disk s':>7} {'ratio':>6} "
          f"{'GB/s':>5} {'peak RSS GiB':>12}")
    for name, step, size, sec, rss, base in rows:
        print(f"{name:<20} {step:<18} {size / 1e9:>6.2f} {sec:>8.1f} {base:>7.1f} "
              f"{sec / base:>6.2f} {size / 1e9 / sec:>5.2f} {rss / 2**30:>12.2f}")


if __name__ == "__main__":
    main()
