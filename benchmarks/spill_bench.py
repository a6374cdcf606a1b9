"""Spill appends: what group-committed fsync costs against plain buffered appends, measured in the same run.

Appends real prediction-event lines to a spill file on the disk under ``--dir`` (default ``./.flywheel``, where spill
files live) in two shapes: one event per append (``publish()`` writing itself once memory is full) and 100 per
append (the delivery thread's batches). Modes: buffered appends with no fsync (the baseline: what a spill cost before
group commit), group commit at each ``--intervals`` value in ms (``FLYWHEEL_SPILL_FSYNC_MS``), and an fsync on every
append (``FLYWHEEL_SPILL_FSYNC_MS=0``). Modes alternate within each of ``--rounds`` rounds and the median round is
printed, so a shared machine's noise hits every mode alike. For group commit it also prints the fsync lag: how long
the first append of each group waited for the fsync that made it durable (the power-loss window).

    python benchmarks/spill_bench.py                  # 5 rounds of 1 s per mode and shape
    python benchmarks/spill_bench.py --rounds 3 --intervals 5,20,100
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from flywheel.events import PredictionEvent, new_id
from flywheel.metrics import FSYNC_LAG_BUCKETS, publisher_metrics
from flywheel.spill import Record, SpillFile

#: Stop a run once its file is this big, so a fast disk does not fill up.
MAX_FILE_BYTES = 256 << 20


@dataclass(frozen=True)
class Result:
    mode: str
    shape: int
    appends_per_second: float
    fsyncs: int
    mean_lag_ms: float | None
    p99_lag_ms: str


def _lines(count: int) -> list[bytes]:
    return [
        Record.of(
            PredictionEvent(
                prediction_id=new_id(), model_version="20260101-000000-abcdef", text=f"a review of some length {i} "
                * 6, label="positive", confidence=0.91, scores={"negative": 0.09, "positive": 0.91}, latency_ms=4.2,
                client_id="checkout-page",
            )
        ).line()
        for i in range(count)
    ]


def _lag_snapshot() -> tuple[float, float, list[float]]:
    """(sum, count, cumulative bucket counts) of the fsync-lag histogram so far."""
    histogram = publisher_metrics().fsync_lag
    total = count = 0.0
    buckets: list[float] = []
    for metric in histogram.collect():
        for sample in metric.samples:
            if sample.name.endswith("_sum"):
                total = sample.value
            elif sample.name.endswith("_count"):
                count = sample.value
            elif sample.name.endswith("_bucket"):
                buckets.append(sample.value)
    return total, count, buckets


def _p99_bucket(before: list[float], after: list[float]) -> str:
    counts = [b - a for a, b in zip(before, after, strict=True)]
    if not counts or counts[-1] == 0:
        return "-"
    for bound, cumulative in zip((*FSYNC_LAG_BUCKETS, float("inf")), counts, strict=True):
        if cumulative >= 0.99 * counts[-1]:
            return f"<= {bound * 1000:g}" if bound != float("inf") else f"> {FSYNC_LAG_BUCKETS[-1] * 1000:g}"
    return "-"


def run(
    directory: Path, mode: str, interval: float | None, *, shape: int, seconds: float, lines: list[bytes]
) -> Result:
    spill = SpillFile.create(directory, f"bench-{mode}-{shape}", fsync_interval=interval)
    payloads = [b"".join(lines[i : i + shape]) for i in range(0, len(lines) - shape + 1, shape)]
    lag_sum, lag_count, lag_buckets = _lag_snapshot()
    appends = 0
    started = time.perf_counter()
    deadline = started + seconds
    try:
        while time.perf_counter() < deadline and spill.size < MAX_FILE_BYTES:
            for payload in payloads[:64]:
                spill.append(payload)
            appends += min(64, len(payloads))
        elapsed = time.perf_counter() - started
        fsyncs = spill.commit.syncs if spill.commit is not None else 0
    finally:
        spill.remove()
    new_sum, new_count, new_buckets = _lag_snapshot()
    syncs = new_count - lag_count
    mean = (new_sum - lag_sum) / syncs * 1000 if syncs else None
    return Result(mode, shape, appends / elapsed, fsyncs, mean, _p99_bucket(lag_buckets, new_buckets) if syncs else "-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path(".flywheel"), help="a directory on the disk to measure")
    parser.add_argument("--seconds", type=float, default=1.0, help="seconds per mode, shape and round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the median is printed")
    parser.add_argument("--intervals", default="20", help="group-commit intervals in ms, comma-separated")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix="spill-bench-", dir=args.dir))
    modes: list[tuple[str, float | None]] = [("buffered (baseline)", None)]
    modes += [(f"group commit {ms} ms", float(ms) / 1000) for ms in args.intervals.split(",")]
    modes.append(("fsync every append", 0.0))
    lines = _lines(6400)
    try:
        print(f"spill appends on {directory} ({len(lines[0])}-byte events), median of {args.rounds} rounds of "
              f"{args.seconds:g} s")
        print(f"{'mode':<22} {'events/append':>13} {'appends/s':>11} {'events/s':>11} {'vs baseline':>11} "
              f"{'fsyncs/s':>8} {'mean lag ms':>11} {'p99 lag ms':>10}")
        for shape in (1, 100):
            rounds: dict[str, list[Result]] = {mode: [] for mode, _ in modes}
            for _ in range(args.rounds):
                for mode, interval in modes:
                    name = mode.split(" (")[0].replace(" ", "-")
                    rounds[mode].append(run(directory, name, interval, shape=shape, seconds=args.seconds, lines=lines))
            baseline = statistics.median(r.appends_per_second for r in rounds[modes[0][0]])
            for mode, _ in modes:
                results = sorted(rounds[mode], key=lambda r: r.appends_per_second)
                result = results[len(results) // 2]
                lag = f"{result.mean_lag_ms:.1f}" if result.mean_lag_ms is not None else "-"
                print(f"{mode:<22} {shape:>13} {result.appends_per_second:>11,.0f} "
                      f"{result.appends_per_second * shape:>11,.0f} {result.appends_per_second / baseline:>11.3f} "
                      f"{result.fsyncs / args.seconds:>8,.0f} {lag:>11} {result.p99_lag_ms:>10}")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
