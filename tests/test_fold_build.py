"""The compiled fold (setup.py: projections/fold.py built by Cython with projections/fold.pxd) is the one in use, and
it computes exactly what its source computes as plain Python: states byte for byte and every derived event."""

from __future__ import annotations

import os
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest

import projections.fold as fold
from bench.gen_history import generate
from projections import fold_source, is_compiled
from projections.rules import RuleBook

RULES = Path(__file__).resolve().parent.parent / "deploy" / "rules" / "default.yaml"
PURE = os.environ.get("LEADLEDGER_PURE_PYTHON") == "1"


@pytest.mark.skipif(PURE, reason="LEADLEDGER_PURE_PYTHON=1 runs the source")
def test_the_compiled_fold_is_in_use() -> None:
    assert is_compiled(fold), f"{fold.__file__}: the fold is not compiled; run `bash deploy/setup.sh`"
    assert type(fold.LeadState("x").__class__.__dict__.get("seen")).__name__ == "getset_descriptor"


@pytest.mark.skipif(PURE or not is_compiled(fold), reason="no compiled fold to compare")
def test_compiled_and_source_folds_agree_on_a_generated_history(tmp_path: Path) -> None:
    src = fold_source("leadledger_fold_source")
    assert not is_compiled(src)
    later = RULES.read_text().replace('version: "2026-11-default"', 'version: "later"')
    later = later.replace('effective_from: "2026-01-01T00:00:00Z"', 'effective_from: "2026-02-01T00:00:00Z"')
    (tmp_path / "later.yaml").write_text(later)
    book = RuleBook.from_paths([str(RULES), str(tmp_path / "later.yaml")])
    assert len(book.sets) == 2
    events = generate(12_000, 300, seed=5, days=60)

    def states(module: ModuleType) -> list[bytes]:
        led = module.Ledger(book)
        led.apply_all(events, chunk=5_000)
        return [s.to_bytes() for s in led.states()]

    def derived(module: ModuleType) -> list[bytes]:
        led = module.Ledger(book, emit=True)
        return [orjson.dumps(d) for ev in events[:4_000] for d in led.apply(ev)]

    compiled_states, source_states = states(fold), states(src)
    assert len(compiled_states) > 300
    assert compiled_states == source_states
    compiled_derived, source_derived = derived(fold), derived(src)
    assert any(b'"lead_handed_off"' in d for d in compiled_derived)
    assert compiled_derived == source_derived


EDGE_TIMESTAMPS = [
    "2024-02-29T00:00:00.000000+00:00", "2000-02-29T23:59:59.999999+00:00", "1970-01-01T00:00:00.000000+00:00",
    "1969-12-31T23:59:59.999999+00:00", "2023-02-29T00:00:00.000000+00:00", "2100-02-29T00:00:00.000000+00:00",
    "2026-04-31T00:00:00.000000+00:00", "2026-13-01T00:00:00.000000+00:00", "2026-00-01T00:00:00.000000+00:00",
    "2026-01-00T00:00:00.000000+00:00", "2026-01-01T24:00:00.000000+00:00", "2026-01-01T23:60:00.000000+00:00",
    "2026-01-01T23:00:60.000000+00:00", "2026-01-01 23:00:00.000000+00:00", "2026-01-01T23:00:00.000000+01:00",
    "2026-01-01T23:00:00.000000-00:00", "2026-01-01T23:00:00,000000+00:00", "2026-01-01T23:00:00.00000a+00:00",
    "1699-12-31T23:59:59.999999+00:00", "2201-01-01T00:00:00.000000+00:00", "0001-01-01T00:00:00.000000+00:00",
    "9999-12-31T23:59:59.999999+00:00", "2026-01-01T00:00:00+00:00", "2026-01-01T00:00:00.000000Z",
    "2026-01-01T00:00:00.000000+0000", "２０２６-01-01T00:00:00.000000+00:00", "2026-01-01T00:00:00.000000+00:0٠",
]


def _outcome(f: Any, s: str) -> Any:
    try:
        return f(s)
    except Exception as e:  # the same exception type either way (the message may differ)
        return type(e)


@pytest.mark.skipif(PURE or not is_compiled(fold), reason="no compiled fold to compare")
def test_compiled_epoch_seconds_equal_datetime_timestamp() -> None:
    """The compiled fold reads wire-format timestamps digit by digit (``epoch_s``): exactly datetime's float, and
    datetime's own answer (or error) for everything else."""
    rnd = random.Random(11)
    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
    wire = [(epoch + timedelta(microseconds=rnd.randrange(-8 * 10**15, 7 * 10**15))).isoformat(timespec="microseconds")
            for _ in range(100_000)]
    for s in [*wire, *EDGE_TIMESTAMPS]:
        assert _outcome(fold.epoch_s, s) == _outcome(lambda x: datetime.fromisoformat(x).timestamp(), s), s


@pytest.mark.skipif(PURE, reason="LEADLEDGER_PURE_PYTHON=1 runs the sources")
def test_the_other_compiled_modules_are_in_use() -> None:
    import events.wire
    import projections.log_fold

    for module in (projections.log_fold, events.wire):
        assert is_compiled(module), f"{module.__file__}: not compiled; run `bash deploy/setup.sh`"


@pytest.mark.skipif(PURE, reason="no compiled modules to compare")
def test_compiled_envelope_check_and_log_fold_agree_with_their_sources() -> None:
    """events.wire.check_envelope and projections.log_fold (the back-test's sorting of touchpoints and decoding of
    lead-keyed records) compiled and as plain Python: the same answers on every case of their tests."""
    import events.wire
    import projections.log_fold
    from hypothesis import given, settings

    from projections import source_module
    from tests.test_backtest_reader import Rec, touchpoint_cases
    from tests.test_events import ENVELOPES

    root = Path(__file__).resolve().parent.parent
    wire_src = source_module(root / "events" / "wire.py", "leadledger_wire_source")
    log_src = source_module(root / "projections" / "log_fold.py", "leadledger_log_fold_source")
    assert not is_compiled(wire_src) and not is_compiled(log_src)

    @settings(max_examples=2000, deadline=None)
    @given(ENVELOPES)
    def same_check(ev: dict) -> None:
        assert events.wire.check_envelope(ev) == wire_src.check_envelope(ev)

    same_check()
    recs = [Rec(k, v) for k, v in touchpoint_cases()]
    compiled: dict[str, list] = {}
    source: dict[str, list] = {}
    projections.log_fold.collect_anonymous(recs, compiled)
    log_src.collect_anonymous(recs, source)
    assert compiled == source and len(compiled) > 50
    raw = [v if v is not None else b"" for _k, v in touchpoint_cases()]
    assert projections.log_fold.lead_records(raw) == log_src.lead_records(raw)
    assert projections.log_fold.lead_records(raw)[1] == 4  # undecodable, not an object, "yesterday", empty
