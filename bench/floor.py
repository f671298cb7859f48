"""The floor of the gateway's design: a bare ASGI app that does only the round trips every governed
request must make, with the same libraries, so their cost can be told apart from the gateway's own
work (docs/benchmark.md, "The floor of this design").

Per request: read the body, one Redis EVALSHA (admission), the upstream call (through the gateway's
own HTTP/1.1 client, apps/gateway/h1.py; FLOOR_HTTP=aiohttp for an aiohttp session), one INSERT with
a durable commit (psycopg, the ledger row), then the answer. FLOOR_STEPS picks the steps
(any of `redis,upstream,pg`, or `none`). Against bench/upstream.py and the bench's database:

    .venv/bin/python bench/upstream.py --port 9311 &
    FLOOR_STEPS=redis,upstream,pg .venv/bin/uvicorn bench.floor:app --port 9500 --loop uvloop \\
        --http httptools --no-access-log &
    BENCH_KEY=x wrk -t1 -c1 -d6s -s bench/post.lua http://127.0.0.1:9500/

FLOOR_UPSTREAM, FLOOR_REDIS_URL and FLOOR_DATABASE_URL override where it connects (it creates the
table `bench_floor_rows` there).
"""

from __future__ import annotations

import asyncio
import os

import aiohttp
import orjson
import psycopg
import redis.asyncio as aioredis

from apps.gateway import h1

STEPS = set(os.environ.get("FLOOR_STEPS", "redis,upstream,pg").split(","))
UPSTREAM = os.environ.get("FLOOR_UPSTREAM", "http://127.0.0.1:9311/v1/chat/completions")
REDIS_URL = os.environ.get("FLOOR_REDIS_URL", "redis://127.0.0.1:6379/13")
DATABASE_URL = os.environ.get("FLOOR_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/llm_bench")
HEADERS = {"content-type": "application/json", "authorization": "Bearer floor"}
HTTP = os.environ.get("FLOOR_HTTP", "native")
state: dict = {}


async def _start() -> None:
    state["redis"] = aioredis.Redis.from_url(REDIS_URL)
    state["sha"] = await state["redis"].script_load("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    state["http"] = aiohttp.ClientSession()
    state["h1"] = h1.Client(connect_timeout=5, read_timeout=120)
    state["pg"] = await psycopg.AsyncConnection.connect(DATABASE_URL, autocommit=True)
    await state["pg"].execute("CREATE TABLE IF NOT EXISTS bench_floor_rows (id bigserial PRIMARY KEY, request_id text, "
                              "cost numeric, at timestamptz, attempts jsonb)")
    state["lock"] = asyncio.Lock()  # one connection: one statement at a time


async def _stop() -> None:
    await state["http"].close()
    state["h1"].close()
    await state["pg"].close()
    await state["redis"].aclose()


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await _start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await _stop()
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    request = orjson.loads(body)
    if "redis" in STEPS:
        await state["redis"].evalsha(state["sha"], 1, "floor:admitted", 1)
    answer = b'{"ok":true}'
    if "upstream" in STEPS:
        if HTTP == "aiohttp":
            async with state["http"].post(UPSTREAM, data=orjson.dumps(request), headers=HEADERS) as resp:
                answer = await resp.read()
        else:
            answer = (await state["h1"].post(UPSTREAM, headers=HEADERS, content=orjson.dumps(request))).content
    if "pg" in STEPS:
        async with state["lock"]:
            await state["pg"].execute("INSERT INTO bench_floor_rows (request_id, cost, at, attempts) "
                                      "VALUES (%s, %s, now(), %s)", ("floor", "0.0000123", '[{"ok": true}]'))
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": answer})
