"""Offline fold throughput, single core: ``python -m bench.bench_fold [--events 1000000] [--leads 50000]``.

Generates the history in memory (bench.gen_history, deterministic) and lays it out as the backtest holds a file it
read (each event decoded from its JSON line, in arrival order: the generator allocates person by person, a layout
no reader produces; also timed, once), then times the backtest path over it
(``Ledger.apply_all``: global dedupe and identity routing in arrival order, then the O(1) fold subject by subject per
chunk of the log; derived events not built), the same fold one event at a time in arrival order (``Ledger.apply``,
the order a processor sees), a pass with derived events built (the processor path), and the backtest path including
JSON decoding of the lines. Figures are events per CPU second of this process (robust on a shared machine). When the
fold is compiled (setup.py), the backtest path is also timed with its source loaded as plain Python, in the same run.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import orjson

import projections.fold as fold
from bench.gen_history import generate
from projections import fold_source, is_compiled
from projections.fold import Ledger
from projections.rules import RuleBook

DEFAULT_RULES = Path(__file__).resolve().parent.parent / "deploy" / "rules" / "default.yaml"


def _time(book: RuleBook, events: list, emit: bool, grouped: bool = False, ledger: type = Ledger) -> tuple[float, Any]:
    """CPU seconds of one single-threaded pass (process time: robust on a shared, loaded machine). Without derived
    events the Ledger keeps no per-subject dedupe windows, as the file back-test (``projections.backtest``)."""
    gc.collect()
    gc.disable()
    try:
        led = ledger(book, emit=emit, window=emit)
        t0 = time.process_time()
        if grouped:
            led.apply_all(events)
        else:
            apply = led.apply
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
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"machine yardstick: {calibrate():.0f} ns per dict.get loop iteration")
    print(f"fold: {Path(str(fold.__file__)).name} ({'compiled, setup.py' if is_compiled(fold) else 'plain Python'})")
    t0 = time.perf_counter()
    events = generate(a.events, a.leads, a.seed)
    print(f"generated {len(events):,} events over {a.leads:,} people in {time.perf_counter() - t0:.1f}s")
    generated = events
    events = [orjson.loads(orjson.dumps(e)) for e in generated]
    # best of two passes each (the first pass in a process also pays for growing the heap), compiled and plain
    # Python alternated when the fold is compiled
    source = fold_source("bench_fold_source").Ledger if is_compiled(fold) else None
    dt = dts = float("inf")
    for _ in range(2):
        d, led = _time(book, events, emit=False, grouped=True)
        dt = min(dt, d)
        if source is not None:
            d, leds = _time(book, events, emit=False, grouped=True, ledger=source)
            dts = min(dts, d)
            assert [s.to_bytes() for s in leds.states()] == [s.to_bytes() for s in led.states()]
            del leds
    n = len(events)
    print(f"fold, backtest path (apply_all):         {n / dt:,.0f} events/s  ({dt:.2f}s for {n:,}, best of 2)")
    stages: dict[str, int] = {}
    for st in led.states():
        stages[st.stage] = stages.get(st.stage, 0) + 1
    print(f"  subjects {len(led.leads) + len(led.anons):,}, duplicates {led.duplicates:,}, "
          f"hand-offs {sum(s.handoffs for s in led.leads.values()):,}, stages {dict(sorted(stages.items()))}")
    dtg, _ = _time(book, generated, emit=False, grouped=True)
    del generated
    print(f"  the same over the generator's objects:  {n / dtg:,.0f} events/s  ({dtg:.2f}s, one pass)")
    if source is not None:
        print(f"  the same, its source as plain Python:  {n / dts:,.0f} events/s  ({dts:.2f}s, best of 2, alternated; "
              f"compiled = {dts / dt:.2f} x plain)")
    dt1, led1 = _time(book, events, emit=False)
    print(f"fold one at a time, arrival order:       {n / dt1:,.0f} events/s  ({dt1:.2f}s for {n:,})")
    assert [s.to_bytes() for s in led1.states()] == [s.to_bytes() for s in led.states()]
    del led1
    m = min(n, 300_000)
    dt2, _ = _time(book, events[:m], emit=True)
    print(f"fold with derived events built:          {m / dt2:,.0f} events/s  ({dt2:.2f}s for {m:,})")
    lines = [orjson.dumps(e) for e in events[:m]]
    del led
    gc.collect()
    gc.disable()
    led = Ledger(book, emit=False, window=False)
    t0 = time.process_time()
    loads = orjson.loads
    led.apply_all(loads(line) for line in lines)
    dt3 = time.process_time() - t0
    gc.enable()
    print(f"decode + fold (JSONL lines, apply_all):  {m / dt3:,.0f} events/s  ({dt3:.2f}s for {m:,})")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
