"""The consume rate Faust itself allows, as a Faust app: ``faust -A bench.faust_ceiling worker``.

It reads the ingest benchmark's topic the way the worker's ingest agent did before it read
``interactions`` with its own aiokafka consumer (raw bytes, acks=False, ``take_events`` of
``batch_size`` within ``batch_within_s``, concurrency 1) and does nothing with the events but count
them; GET /count says how many and when the first and the last batch came. No worker that consumes
through Faust's per-event stream ingests faster than this (the reason stream.consumer exists), so
``bench ingest`` reports it beside the raw aiokafka read and the worker.
"""

from __future__ import annotations

import time

import faust

from hymirec.settings import load_settings
from stream.credentials import app_options

settings = load_settings()
app = faust.App(settings.app_id, **app_options(settings))
topic = app.topic(settings.topic_interactions, key_serializer="raw", value_serializer="raw", acks=False)
counted: dict[str, float | int | None] = {"events": 0, "first_batch": 0, "first_at": None, "last_at": None}


@app.agent(topic, concurrency=1)
async def count(stream):
    async for events in stream.take_events(settings.batch_size, within=settings.batch_within_s):
        now = time.perf_counter()
        if counted["first_at"] is None:
            counted["first_at"], counted["first_batch"] = now, len(events)
        counted["events"] += len(events)
        counted["last_at"] = now


@app.page("/count")
async def count_page(web, request):
    return web.json(counted)
