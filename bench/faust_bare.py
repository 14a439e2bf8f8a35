"""A bare faust agent that only iterates a topic: the ceiling faust itself puts on a stream (bench_processor.py).

Run: BARE_TOPIC=... BARE_COUNT=N python -m bench.faust_bare worker --without-web -l warn
Prints one JSON line {"events": N, "seconds": s} (first event to N-th event) and exits.
BARE_CONSUMER=leadledger runs it on the processor's consumer (`services.faust_consumer.FetchConsumer`: its fetch wait
and its fetch loop without faust's per-record tasks) instead of faust's own.
"""

from __future__ import annotations

import os
import sys
import time

import faust
import orjson

topic_name = os.environ["BARE_TOPIC"]
count = int(os.environ["BARE_COUNT"])
consumer = os.environ.get("BARE_CONSUMER", "faust")
app = faust.App(f"bare-{topic_name}-{consumer}", broker=f"kafka://{os.environ.get('BARE_BOOTSTRAP', '127.0.0.1:9092')}",
                key_serializer="raw", value_serializer="raw", web_enabled=False,
                consumer_auto_offset_reset="earliest",
                datadir=f"/tmp/faust-bare-{topic_name}-{consumer}")
if consumer == "leadledger":
    from services.faust_consumer import FetchConsumer

    app.transport.Consumer = FetchConsumer  # type: ignore[misc]
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
