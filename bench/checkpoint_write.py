"""How long a checkpoint write stops the training thread: eym's streamed write against the
in-memory one it replaced, in one run.

Tuning writes its resumable checkpoints (trained tensors + AdamW state, about 0.6 GB at SD
scale) on a background thread. The training thread still needs the GIL to launch each step,
so what matters is how long the writer holds it at a stretch. A ticking thread stands in for
the training loop (it sleeps 0.5 ms and records how late it wakes); the rows are the write's
duration and the ticker's longest and summed stalls.

    python bench/checkpoint_write.py --mb 630 --json out.json
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eym import tuning  # noqa: E402
from eym.cache import atomic_write_bytes  # noqa: E402


def in_memory_write(checkpoint_dir: Path, fingerprint: str, **state) -> None:
    """The write eym used before: serialise into memory, hash, concatenate, write once."""
    buffer = io.BytesIO()
    torch.save({"fingerprint": fingerprint, **state}, buffer)
    payload = buffer.getvalue()
    atomic_write_bytes(checkpoint_dir / tuning.CHECKPOINT, tuning.CHECKPOINT_MAGIC + hashlib.sha256(payload).digest() + payload)


def tuning_state(mb: float) -> dict:
    """Trained tensors and their two AdamW moments, fp32, of about ``mb`` megabytes in all."""
    n = max(1, round(mb * 1e6 / (3 * 4 * 1280 * 1280)))
    gen = torch.Generator().manual_seed(0)
    trained = {f"w{i}": torch.randn(1280, 1280, generator=gen) for i in range(n)}
    moments = {i: {"exp_avg": torch.randn(1280, 1280, generator=gen), "exp_avg_sq": torch.rand(1280, 1280, generator=gen)}
               for i in range(n)}
    return {"stage": 1, "step": 100, "trained": trained, "optimizer": {"state": moments, "param_groups": []}}


def stalls_during(write, *args, **kwargs) -> dict:
    """Run ``write`` on this thread while a ticker runs beside it; the write's time and the ticker's stalls."""
    late: list[float] = []
    stop = threading.Event()

    def tick() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            time.sleep(0.0005)
            now = time.perf_counter()
            late.append(now - last)
            last = now

    ticker = threading.Thread(target=tick)
    ticker.start()
    time.sleep(0.2)
    start = time.perf_counter()
    write(*args, **kwargs)
    seconds = time.perf_counter() - start
    stop.set()
    ticker.join()
    return {"write_s": seconds, "max_stall_ms": max(late) * 1e3, "stalls_over_5ms_s": sum(s for s in late if s > 0.005)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=630.0, help="size of the checkpointed state")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    state = tuning_state(args.mb)
    rows: dict[str, list[dict]] = {"in memory (before)": [], "streamed (eym)": []}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.repeats):  # alternated, so both see the same disk and page cache
            for name, write in (("in memory (before)", in_memory_write), ("streamed (eym)", tuning._save_checkpoint)):
                rows[name].append(stalls_during(write, Path(folder), "bench", **state))
        assert tuning.read_checkpoint(Path(folder) / tuning.CHECKPOINT) is not None
    result = {"date": time.strftime("%Y-%m-%d"), "mb": args.mb, "torch": torch.__version__,
              "rows": {name: {key: sorted(r[key] for r in runs)[len(runs) // 2] for key in runs[0]} for name, runs in rows.items()},
              "runs": rows}
    print("| write | s | longest stall ms | stalls > 5 ms, s |\n|---|---|---|---|")
    for name, r in result["rows"].items():
        print(f"| {name} | {r['write_s']:.2f} | {r['max_stall_ms']:.1f} | {r['stalls_over_5ms_s']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
