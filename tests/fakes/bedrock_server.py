"""A fake AWS Bedrock runtime on loopback: `POST /model/{modelId}/converse` (JSON) and
`/converse-stream` (the AWS event-stream binary framing: prelude with total and header lengths and
its CRC32, typed headers, JSON payload, message CRC32). Every request's SigV4 signature is checked
against the credentials the fake knows (ACCESS_KEY / SECRET_KEY, region REGION), recomputed with
botocore from what arrived: a wrong signature gets Bedrock's 403 InvalidSignatureException.

Behaviour by model id, as in the other fakes: `fail-<status>` (an error with `x-amzn-ErrorType`;
429 is ThrottlingException), `tool-...` (a toolUse block), `cache-...` (cache read/write tokens),
`streamerror-...` (an exception frame after the first delta). Errors are `{"message": ...}`.
"""

from __future__ import annotations

import re
import zlib
from urllib.parse import unquote

import orjson
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from .openai_server import FakeOpenAI

ACCESS_KEY = "AKIDFAKEBEDROCK00001"
SECRET_KEY = "fake-bedrock-secret-key/abc+def"
SESSION_TOKEN = "fake-session-token"
REGION = "eu-west-3"
ERRORS = {400: "ValidationException", 403: "AccessDeniedException", 404: "ResourceNotFoundException",
          429: "ThrottlingException", 500: "InternalServerException", 503: "ServiceUnavailableException"}


def frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One AWS event-stream message (string headers, type 7)."""
    raw = b"".join(len(n).to_bytes(1, "big") + n.encode() + b"\x07" + len(v.encode()).to_bytes(2, "big")
                   + v.encode() for n, v in headers.items())
    total = 12 + len(raw) + len(payload) + 4
    prelude = total.to_bytes(4, "big") + len(raw).to_bytes(4, "big")
    message = prelude + zlib.crc32(prelude).to_bytes(4, "big") + raw + payload
    return message + zlib.crc32(message).to_bytes(4, "big")


def event(name: str, data: dict) -> bytes:
    return frame({":event-type": name, ":content-type": "application/json", ":message-type": "event"},
                 orjson.dumps(data))


def _error(status: int, message: str | None = None) -> web.Response:
    kind = ERRORS.get(status, "InternalServerException")
    return web.json_response({"message": message or f"fake bedrock error {status}"}, status=status,
                             headers={"x-amzn-ErrorType": f"{kind}:http://internal.amazon.com/coral/"})


def signature_ok(request: web.Request, body: bytes) -> bool:
    """Recompute the SigV4 signature of what arrived with the known credentials."""
    auth = request.headers.get("authorization", "")
    match = re.match(r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/bedrock/aws4_request, "
                     r"SignedHeaders=([^,]+), Signature=([0-9a-f]{64})$", auth)
    if not match or match.group(1) != ACCESS_KEY or match.group(3) != REGION:
        return False
    names = match.group(4).split(";")
    headers = {n: request.headers[n] for n in names if n in request.headers}
    if len(headers) != len(names):
        return False
    url = f"http://{request.headers['host']}{request.raw_path}"
    signed = AWSRequest(method=request.method, url=url, data=body, headers=headers)
    signed.context["timestamp"] = request.headers.get("x-amz-date", "")
    signer = SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY, SESSION_TOKEN), "bedrock", REGION)
    expected = signer.signature(signer.string_to_sign(signed, signer.canonical_request(signed)), signed)
    return expected == match.group(5)


class FakeBedrock(FakeOpenAI):
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/model/{model}/converse", self.converse)
        app.router.add_post("/model/{model}/converse-stream", self.converse)
        return app

    async def converse(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = orjson.loads(raw or b"{}")
        model = unquote(request.match_info["model"])
        self.requests.append({"path": request.path, "raw_path": request.raw_path, "headers": dict(request.headers),
                              "body": body, "raw": raw, "model": model, "query": dict(request.query)})
        if not signature_ok(request, raw):
            return _error(403, "The request signature we calculated does not match the signature you provided.")
        if request.headers.get("x-amz-security-token") != SESSION_TOKEN:
            return _error(403, "The security token included in the request is invalid.")
        if model.startswith("fail-"):
            return _error(int(model.split("-")[1]))
        last = next((m for m in reversed(body.get("messages", [])) if m["role"] == "user"), {"content": []})
        text = "Echo: " + " ".join(b["text"] for b in last["content"] if "text" in b)
        usage = {"inputTokens": sum(len(b.get("text", "").split()) for m in body.get("messages", [])
                                    for b in m["content"]) + 2, "outputTokens": len(text.split())}
        if model.startswith("cache-"):
            usage.update(cacheReadInputTokens=11, cacheWriteInputTokens=7)
        usage["totalTokens"] = sum(usage.values())
        tool = model.startswith("tool-")
        content = [{"text": text}]
        if tool:
            content = [{"text": "Let me check."},
                       {"toolUse": {"toolUseId": "tooluse_01", "name": "get_weather", "input": {"city": "Paris"}}}]
        stop = "tool_use" if tool else "end_turn"
        if not request.path.endswith("/converse-stream"):
            return web.json_response({"output": {"message": {"role": "assistant", "content": content}},
                                      "stopReason": stop, "usage": usage, "metrics": {"latencyMs": 5}})
        resp = web.StreamResponse(headers={"content-type": "application/vnd.amazon.eventstream"})
        await resp.prepare(request)
        await resp.write(event("messageStart", {"role": "assistant", "p": "abc"}))
        for i, word in enumerate(content[0]["text"].split()):
            await resp.write(event("contentBlockDelta", {"contentBlockIndex": 0,
                                                         "delta": {"text": word if i == 0 else " " + word}}))
            if model.startswith("streamerror-"):
                await resp.write(frame({":exception-type": "modelStreamErrorException",
                                        ":content-type": "application/json", ":message-type": "exception"},
                                       orjson.dumps({"message": "Model stream failed"})))
                await resp.write_eof()
                return resp
        await resp.write(event("contentBlockStop", {"contentBlockIndex": 0}))
        if tool:
            await resp.write(event("contentBlockStart", {"contentBlockIndex": 1, "start": {
                "toolUse": {"toolUseId": "tooluse_01", "name": "get_weather"}}}))
            for piece in ('{"city": ', '"Paris"}'):
                await resp.write(event("contentBlockDelta", {"contentBlockIndex": 1,
                                                             "delta": {"toolUse": {"input": piece}}}))
            await resp.write(event("contentBlockStop", {"contentBlockIndex": 1}))
        await resp.write(event("messageStop", {"stopReason": stop}))
        await resp.write(event("metadata", {"usage": usage, "metrics": {"latencyMs": 5}}))
        await resp.write_eof()
        return resp
