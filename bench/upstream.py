"""A minimal, fast fake OpenAI upstream for the benchmark: raw asyncio + httptools (+ uvloop).

Every request gets the same non-streaming chat.completion with usage, over HTTP/1.1 keep-alive.
It does as little work as possible so the numbers measure the gateway, not the fake.

    python bench/upstream.py --port 9100
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

import httptools
import orjson

BODY = orjson.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1_700_000_000, "model": "bench-up",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Echo: hello from the benchmark"},
                 "finish_reason": "stop", "logprobs": None}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18},
})
RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(BODY)) + BODY


class Upstream(asyncio.Protocol):
    __slots__ = ("transport", "parser")

    def connection_made(self, transport):
        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_complete(self) -> None:
        self.transport.write(RESPONSE)
        if not self.parser.should_keep_alive():
            self.transport.close()


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Upstream, host, port, backlog=1024, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    args = parser.parse_args()
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
