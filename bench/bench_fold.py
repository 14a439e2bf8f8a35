"""Offline fold throughput, single core: ``python -m bench.bench_fold [--events 1000000] [--leads 50000]``.

Generates the history in memory (bench.gen_history, deterministic), then times ``Ledger.apply`` over it (the
backtest path: global dedupe, identity routing, joins, the O(1) fold; derived events not built), and a second pass
with derived events built (the processor path). Also times the full backtest path including JSON decoding.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Optional

import orjson

from bench.gen_history import generate
from projections.fold import Ledger
from projections.rules import RuleBook

DEFAULT_RULES = Path(__file__).resolve().parent.parent / "deploy" / "rules" / "default.yaml"


def _time(book: RuleBook, events: list, emit: bool) -> tuple[float, Ledger]:
    """CPU seconds of one single-threaded pass (process time: robust on a shared, loaded machine)."""
    gc.collect()
    gc.disable()
    try:
        led = Ledger(book, emit=emit)
        apply = led.apply
        t0 = time.process_time()
        for ev in events:
            apply(ev)
        return time.process_time() - t0, led
    finally:
        gc.enable()


def calibrate() -> float:
    """ns per iteration of a plain dict.get loop: a yardstick of this machine's Python speed
    (~30-40 ns on a current desktop core)."""
    d: dict = {}
    g = d.get
    t0 = time.process_time()
    for i in range(2_000_000):
        g(i)
    return (time.process_time() - t0) / 2_000_000 * 1e9


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--leads", type=int, default=50_000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--rules", action="append", default=None)
    a = p.parse_args(argv)
    book = RuleBook.from_paths(a.rules or [str(DEFAULT_RULES)])
    print(f"machine yardstick: {calibrate():.0f} ns per dict.get loop iteration")
    t0 = time.perf_counter()
    events = generate(a.events, a.leads, a.seed)
    print(f"generated {len(events):,} events over {a.leads:,} people in {time.perf_counter() - t0:.1f}s")
    dt, led = _time(book, events, emit=False)
    n = len(events)
    print(f"fold (backtest path, no derived events): {n / dt:,.0f} events/s  ({dt:.2f}s for {n:,})")
    stages: dict[str, int] = {}
    for st in led.states():
        stages[st.stage] = stages.get(st.stage, 0) + 1
    print(f"  subjects {len(led.leads) + len(led.anons):,}, duplicates {led.duplicates:,}, "
          f"hand-offs {sum(s.handoffs for s in led.leads.values()):,}, stages {dict(sorted(stages.items()))}")
    m = min(n, 300_000)
    dt2, _ = _time(book, events[:m], emit=True)
    print(f"fold with derived events built:          {m / dt2:,.0f} events/s  ({dt2:.2f}s for {m:,})")
    lines = [orjson.dumps(e) for e in events[:m]]
    gc.collect()
    led = Ledger(book, emit=False)
    t0 = time.process_time()
    for line in lines:
        led.apply(orjson.loads(line))
    dt3 = time.process_time() - t0
    print(f"decode + fold (JSONL lines):             {m / dt3:,.0f} events/s  ({dt3:.2f}s for {m:,})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
