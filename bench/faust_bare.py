"""A bare faust agent that only iterates a topic: the ceiling faust itself puts on a stream (bench_processor.py).

Run: BARE_TOPIC=... BARE_COUNT=N python -m bench.faust_bare worker --without-web -l warn
Prints one JSON line {"events": N, "seconds": s} (first event to N-th event) and exits.
"""

from __future__ import annotations

import os
import sys
import time

import faust
import orjson

topic_name = os.environ["BARE_TOPIC"]
count = int(os.environ["BARE_COUNT"])
app = faust.App(f"bare-{topic_name}", broker=f"kafka://{os.environ.get('BARE_BOOTSTRAP', '127.0.0.1:9092')}",
                key_serializer="raw", value_serializer="raw", web_enabled=False,
                consumer_auto_offset_reset="earliest",
                datadir=f"/tmp/faust-bare-{topic_name}")
topic = app.topic(topic_name, key_type=bytes, value_type=bytes)


@app.agent(topic)
async def bare(stream: faust.StreamT) -> None:
    n = 0
    t0 = 0.0
    async for _ in stream.events():
        if n == 0:
            t0 = time.perf_counter()
        n += 1
        if n == count:
            sys.stdout.write(orjson.dumps({"events": n, "seconds": time.perf_counter() - t0}).decode() + "\n")
            sys.stdout.flush()
            os._exit(0)


if __name__ == "__main__":
    app.main()
