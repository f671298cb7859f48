"""A fake OpenAI-compatible upstream on loopback: real HTTP and SSE, OpenAI's wire format.

Behaviour is chosen by the requested model name, so it works across processes:
  `fail-<status>`   answer with that status and an OpenAI error body (429 carries Retry-After: 0)
  `slow-<ms>`       wait that long before answering
  `break-<n>`       stream n content chunks, then drop the connection
  `drip-<ms>`       stream, waiting that long before each content chunk
  `nousage-...`     leave usage out (streaming and not)
  `tool-...`        call the tool get_weather({"city": "Paris"}) (id call_01), unless the last message
                    is a tool result: then answer as usual
anything else       a deterministic answer echoing the last user message.
Embeddings: `bow-...` models answer a deterministic bag-of-words embedding (`bag_of_words`: the
input's content words, lower-cased, stop words dropped, hashed into 1024 dimensions), so that a
paraphrase using the same content words is close and another question is far; other models answer
[0.1, 0.2, 0.3]. `minilm-...` models answer real sentence embeddings (all-MiniLM-L6-v2, run
with numpy: tests/fakes/minilm.py) when its optional packages are installed.
Every request is recorded (path, headers, JSON body) on `server.requests`.

`server.script_usage(model, usage)` makes the server report that usage object, verbatim, for
that model (each fake in its provider's shape and at its provider's place in a stream): golden
cost tests send real providers' usage through the adapters. Here, with `on_finish_chunk=True`,
a stream carries it on the chunk with the finish reason, as DeepSeek does; otherwise, as OpenAI
does, every chunk has `"usage": null` and a last chunk without choices has the usage.

Batch API (OpenAI's wire format): `POST /v1/files` (multipart: `file`, `purpose=batch`) returns a
File object; `POST /v1/batches` {input_file_id, endpoint, completion_window, metadata} returns a
Batch (`validating`); `GET /v1/batches/{id}` runs every line through the same answers as a chat
call (a `fail-<status>` model fails its line into the error file with that status) and reports
`completed` with `output_file_id` / `error_file_id`, unless `server.batch_hold` is set (then it
stays `in_progress`); `POST /v1/batches/{id}/cancel` -> `cancelling`, then `cancelled` with the
lines it had not run left out; `GET /v1/files/{id}/content` serves the files. An input line whose
`url` is not the batch's endpoint fails the whole batch (`failed`, `errors.data`), as OpenAI does.
`server.batches` keeps each batch (its input lines under `_lines`), `server.batch_cancels` the ids cancelled.

Run standalone for benchmarks: `python -m tests.fakes.openai_server --port 9100`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import re
import socket
import threading
import time
from collections.abc import Callable

import orjson
from aiohttp import web

from tests.fakes import minilm


def _answer(body: dict) -> str:
    last = next((m for m in reversed(body.get("messages", [])) if m.get("role") == "user"), {})
    content = last.get("content") or ""
    if isinstance(content, list):
        content = " ".join(p.get("text", "") for p in content)
    return f"Echo: {content}"


_STOP_WORDS = frozenset((
    "a", "an", "the", "is", "are", "was", "were", "be", "of", "to", "in", "on", "for", "and", "or", "what", "whats",
    "which", "who", "how", "tell", "me", "please", "can", "could", "you", "i", "do", "does", "give", "show",
    "about", "it", "its", "this", "that", "there", "s"))


def bag_of_words(text: str, dims: int = 1024) -> list[float]:
    """A deterministic stand-in for a sentence embedding: content words hashed into `dims` counts
    (a plural's trailing s dropped), unit length."""
    vector = [0.0] * dims
    for word in re.findall(r"[a-z0-9]+", text.lower()):
        if word in _STOP_WORDS:
            continue
        if len(word) > 3 and word.endswith("s"):
            word = word[:-1]
        vector[int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "big") % dims] += 1.0
    norm = sum(x * x for x in vector) ** 0.5 or 1.0
    return [x / norm for x in vector]


def _usage(body: dict, text: str) -> dict:
    prompt = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", [])) + 5
    completion = len(text.split())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class FakeOpenAI:
    def __init__(self):
        self.requests: collections.deque[dict] = collections.deque(maxlen=100_000)
        self.scripts: dict[str, dict] = {}  # model -> {"usage": provider-shaped usage, **how to stream it}
        # provider batch APIs (OpenAI's here, Anthropic's in its fake)
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.batch_cancels: list[str] = []
        self.batch_hold = False  # True: batches stay in progress until it is cleared
        # Called (in a thread) with each chat request's body before it is answered: what happens
        # elsewhere while a request is at the provider.
        self.before_answer: Callable[[dict], None] | None = None
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def script_usage(self, model: str, usage: dict, **how) -> str:
        """Report `usage` (in this provider's own shape) for requests to `model`; returns the model."""
        self.scripts[model] = {"usage": usage, **how}
        return model

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/files", self.file_upload)
        app.router.add_get("/v1/files/{file_id}/content", self.file_content)
        app.router.add_post("/v1/batches", self.batch_create)
        app.router.add_get("/v1/batches/{batch_id}", self.batch_retrieve)
        app.router.add_post("/v1/batches/{batch_id}/cancel", self.batch_cancel)
        return app

    # --- Batch API ---

    @staticmethod
    def _unauthorized(request: web.Request) -> web.Response | None:
        if not request.headers.get("authorization", "").startswith("Bearer "):
            return web.json_response({"error": {"message": "You didn't provide an API key.", "type":
                                                "invalid_request_error", "param": None, "code": None}}, status=401)
        return None

    async def file_upload(self, request: web.Request) -> web.Response:
        if (refused := self._unauthorized(request)) is not None:
            return refused
        form = await request.post()
        upload = form.get("file")
        if form.get("purpose") != "batch" or upload is None or not hasattr(upload, "file"):
            return web.json_response({"error": {"message": "purpose must be batch, with a file", "type":
                                                "invalid_request_error", "param": "purpose", "code": None}},
                                     status=400)
        content = upload.file.read()
        file_id = f"file-fake{len(self.files) + 1:04d}"
        self.files[file_id] = content
        self.requests.append({"path": request.path, "headers": dict(request.headers), "body": {
            "purpose": form.get("purpose"), "filename": upload.filename}, "query": {}})
        return web.json_response({"id": file_id, "object": "file", "bytes": len(content),
                                  "created_at": int(time.time()), "filename": upload.filename, "purpose": "batch",
                                  "status": "processed", "expires_at": None, "status_details": None})

    async def file_content(self, request: web.Request) -> web.Response:
        if (refused := self._unauthorized(request)) is not None:
            return refused
        content = self.files.get(request.match_info["file_id"])
        if content is None:
            return web.json_response({"error": {"message": "No such File object", "type": "invalid_request_error",
                                                "param": "id", "code": None}}, status=404)
        self.requests.append({"path": request.path, "headers": dict(request.headers), "body": {}, "query": {}})
        return web.Response(body=content, content_type="application/octet-stream")

    async def batch_create(self, request: web.Request) -> web.Response:
        if (refused := self._unauthorized(request)) is not None:
            return refused
        body = await self._record(request)
        content = self.files.get(body.get("input_file_id", ""))
        if content is None or body.get("completion_window") != "24h" or body.get("endpoint") != "/v1/chat/completions":
            return web.json_response({"error": {"message": "invalid batch", "type": "invalid_request_error",
                                                "param": "input_file_id", "code": None}}, status=400)
        lines = [orjson.loads(line) for line in content.splitlines() if line.strip()]
        batch_id = f"batch_fake{len(self.batches) + 1:04d}"
        self.batches[batch_id] = {
            "id": batch_id, "object": "batch", "endpoint": body["endpoint"], "errors": None,
            "input_file_id": body["input_file_id"], "completion_window": "24h", "status": "validating",
            "output_file_id": None, "error_file_id": None, "created_at": int(time.time()), "in_progress_at": None,
            "expires_at": int(time.time()) + 86400, "finalizing_at": None, "completed_at": None, "failed_at": None,
            "expired_at": None, "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            "metadata": body.get("metadata"), "_lines": lines}
        return web.json_response(self._batch_view(batch_id))

    def _batch_view(self, batch_id: str) -> dict:
        return {k: v for k, v in self.batches[batch_id].items() if not k.startswith("_")}

    def batch_answer(self, body: dict) -> tuple[int, dict]:
        """A line's answer, as the chat endpoint would give it (status, body)."""
        model = body.get("model", "")
        if model.startswith("fail-"):
            status = int(model.split("-")[1])
            return status, {"error": {"message": f"fake upstream error {status}", "type": "invalid_request_error",
                                      "param": None, "code": None}}
        text = _answer(body)
        usage = self.scripts[model]["usage"] if model in self.scripts else _usage(body, text)
        return 200, {"id": "chatcmpl-fakebatch", "object": "chat.completion", "created": int(time.time()),
                     "model": model, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                  "finish_reason": "stop", "logprobs": None}], "usage": usage}

    def _batch_store(self, batch: dict, entries: list[dict], kind: str) -> str | None:
        if not entries:
            return None
        file_id = f"file-{batch['id']}-{kind}"
        self.files[file_id] = b"\n".join(orjson.dumps(e) for e in entries) + b"\n"
        return file_id

    def _batch_run(self, batch: dict) -> None:
        now = int(time.time())
        bad = [i for i, line in enumerate(batch["_lines"]) if line.get("url") != batch["endpoint"]
               or line.get("method") != "POST" or not line.get("custom_id")]
        if bad:
            batch.update(status="failed", failed_at=now, errors={"object": "list", "data": [
                {"code": "invalid_request", "line": i + 1, "message": "bad line", "param": "url"} for i in bad]})
            return
        out, err = [], []
        for n, line in enumerate(batch["_lines"]):
            status, body = self.batch_answer(line["body"])
            entry = {"id": f"batch_req_fake{n}", "custom_id": line["custom_id"],
                     "response": {"status_code": status, "request_id": f"req_fake{n}", "body": body}, "error": None}
            (out if status == 200 else err).append(entry)
        batch.update(status="completed", in_progress_at=batch["in_progress_at"] or now, finalizing_at=now,
                     completed_at=now, output_file_id=self._batch_store(batch, out, "out"),
                     error_file_id=self._batch_store(batch, err, "err"),
                     request_counts={"total": len(batch["_lines"]), "completed": len(out), "failed": len(err)})

    async def batch_retrieve(self, request: web.Request) -> web.Response:
        if (refused := self._unauthorized(request)) is not None:
            return refused
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return web.json_response({"error": {"message": "No such batch", "type": "invalid_request_error",
                                                "param": None, "code": None}}, status=404)
        self.requests.append({"path": request.path, "headers": dict(request.headers), "body": {}, "query": {}})
        now = int(time.time())
        if batch["status"] == "cancelling":
            batch.update(status="cancelled", cancelled_at=now)  # the lines it had not run are in no file
        elif batch["status"] in ("validating", "in_progress"):
            if self.batch_hold:
                batch.update(status="in_progress", in_progress_at=batch["in_progress_at"] or now)
            else:
                self._batch_run(batch)
        return web.json_response(self._batch_view(batch["id"]))

    async def batch_cancel(self, request: web.Request) -> web.Response:
        if (refused := self._unauthorized(request)) is not None:
            return refused
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return web.json_response({"error": {"message": "No such batch", "type": "invalid_request_error",
                                                "param": None, "code": None}}, status=404)
        self.requests.append({"path": request.path, "headers": dict(request.headers), "body": {}, "query": {}})
        self.batch_cancels.append(batch["id"])
        if batch["status"] in ("validating", "in_progress"):
            batch.update(status="cancelling", cancelling_at=int(time.time()))
        return web.json_response(self._batch_view(batch["id"]))

    async def _record(self, request: web.Request) -> dict:
        body = orjson.loads(await request.read() or b"{}")
        self.requests.append({"path": request.path, "headers": dict(request.headers), "body": body,
                              "query": dict(request.query)})
        return body

    @staticmethod
    def _error(status: int) -> web.Response:
        headers = {"retry-after": "0"} if status == 429 else {}
        body = {"error": {"message": f"fake upstream error {status}", "type": "server_error", "param": None,
                          "code": None}}
        return web.json_response(body, status=status, headers=headers)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        if self.before_answer is not None:
            await asyncio.to_thread(self.before_answer, body)
        return await self.chat_for(request, body)

    async def chat_for(self, request: web.Request, body: dict, *, prefilter: bool = False) -> web.StreamResponse:
        """Answer a chat request; `prefilter` opens the stream with a choice-less chunk, as Azure does."""
        model = body.get("model", "")
        if model.startswith("fail-"):
            return self._error(int(model.split("-")[1]))
        if model.startswith("slow-"):
            await asyncio.sleep(int(model.split("-")[1]) / 1000)
        text = _answer(body)
        script = self.scripts.get(model)
        usage = None if model.startswith("nousage") else _usage(body, text)
        if script:
            usage = script["usage"]
        created = int(time.time())
        messages = body.get("messages") or [{}]
        calls = None
        if model.startswith("tool-") and messages[-1].get("role") != "tool":
            calls = [{"id": "call_01", "type": "function",
                      "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
        if not body.get("stream"):
            message = {"role": "assistant", "content": text}
            if calls:
                message = {"role": "assistant", "content": None, "tool_calls": calls}
            data = {"id": "chatcmpl-fake", "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0, "message": message,
                                 "finish_reason": "tool_calls" if calls else "stop", "logprobs": None}]}
            if usage:
                data["usage"] = usage
            return web.Response(body=orjson.dumps(data), content_type="application/json")
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)

        include = (body.get("stream_options") or {}).get("include_usage")
        on_finish = bool(script and script.get("on_finish_chunk"))

        def chunk(delta: dict, finish=None, usage_here=None) -> bytes:
            c = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": created, "model": model,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if usage_here is not None:
                c["usage"] = usage_here
            elif script and include and not on_finish:
                c["usage"] = None  # OpenAI's chunks say so when usage was asked for
            return b"data: " + orjson.dumps(c) + b"\n\n"

        if prefilter:
            await resp.write(b"data: " + orjson.dumps({"id": "", "object": "", "created": 0, "model": "",
                                                       "choices": [], "prompt_filter_results": []}) + b"\n\n")
        await resp.write(chunk({"role": "assistant", "content": ""}))
        words = [] if calls else text.split()
        if calls:
            await resp.write(chunk({"tool_calls": [{"index": 0, "id": "call_01", "type": "function",
                                                    "function": {"name": "get_weather", "arguments": ""}}]}))
            for piece in ('{"city": ', '"Paris"}'):
                await resp.write(chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}))
        limit = int(model.split("-")[1]) if model.startswith("break-") else None
        drip = int(model.split("-")[1]) / 1000 if model.startswith("drip-") else 0
        for i, w in enumerate(words):
            if drip:
                await asyncio.sleep(drip)
            if limit is not None and i >= limit:
                # Let the gateway read and relay what was sent before the drop: a break *mid*-stream.
                await asyncio.sleep(0.05)
                request.transport.close()  # drop the connection mid-stream
                return resp
            await resp.write(chunk({"content": w if i == 0 else " " + w}))
        await resp.write(chunk({}, "tool_calls" if calls else "stop", usage if on_finish else None))
        if include and usage and not on_finish:
            final = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": [], "usage": usage}
            await resp.write(b"data: " + orjson.dumps(final) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def embeddings(self, request: web.Request) -> web.Response:
        return self.embeddings_for(await self._record(request))

    def embeddings_for(self, body: dict) -> web.Response:
        model = body.get("model", "")
        if model.startswith("fail-"):
            return self._error(int(model.split("-")[1]))
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [{"object": "embedding", "index": i,
                 "embedding": self._embedding(model, str(text))} for i, text in enumerate(inputs)]
        tokens = sum(len(str(i).split()) for i in inputs)
        return web.json_response({"object": "list", "data": data, "model": model,
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @staticmethod
    def _embedding(model: str, text: str) -> list[float]:
        if model.startswith("bow-"):
            return bag_of_words(text)
        if model.startswith("minilm-"):
            return minilm.embed(text)
        return [0.1, 0.2, 0.3]

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    # --- running in a background thread (tests) ---

    def start(self) -> FakeOpenAI:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        ready = threading.Event()

        def run():
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            self._runner = web.AppRunner(self.app(), access_log=None)
            self._loop.run_until_complete(self._runner.setup())
            site = web.SockSite(self._runner, sock)
            self._loop.run_until_complete(site.start())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True, name="fake-openai")
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None:
            fut = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
            with contextlib.suppress(Exception):
                fut.result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=9100)
    args = parser.parse_args()
    fake = FakeOpenAI()
    web.run_app(fake.app(), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
