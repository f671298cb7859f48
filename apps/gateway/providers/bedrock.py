"""AWS Bedrock's Converse API (`POST {api_base}/model/{modelId}/converse` and `/converse-stream`),
signed with SigV4 (botocore's signer), translated to and from the OpenAI shape.

Endpoint: `https://bedrock-runtime.{region}.amazonaws.com`, the region being the deployment's
`region`, else the provider option `region`; `api_base` overrides it (a VPC endpoint, a fake).
Credentials: the provider's secret (stored encrypted like any other), either JSON
`{"aws_access_key_id", "aws_secret_access_key", "aws_session_token"?}` or
`ACCESS_KEY_ID:SECRET_ACCESS_KEY[:SESSION_TOKEN]`; without a secret, botocore's default chain
(environment, the provider option `profile` or the default profile, config files, instance role),
resolved once per profile and refreshed when it is about to expire.
Request: system messages become `system` text blocks; content parts become text / image blocks,
tool calls `toolUse` blocks and tool messages `toolResult` blocks (in a user turn); max_tokens,
temperature, top_p and stop go to `inferenceConfig`; tools to `toolConfig`.
Response: stop reasons mapped (end_turn/stop_sequence -> stop, max_tokens -> length, tool_use ->
tool_calls, guardrail_intervened/content_filtered -> content_filter).
Usage (`usage_of`): Bedrock's inputTokens excludes the prompt cache, so prompt_tokens =
inputTokens + cacheReadInputTokens + cacheWriteInputTokens, with the cache reads and writes as
cached_tokens and cache_write_tokens; outputTokens is completion_tokens.
Streams: the AWS event-stream binary framing (botocore's decoder, each frame's CRCs checked):
messageStart, contentBlockStart, contentBlockDelta, contentBlockStop, messageStop, then metadata
(the usage); an exception frame mid-stream raises. Bedrock's embeddings (InvokeModel) are not
offered here.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from urllib.parse import quote

import httpx
import orjson
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials, ReadOnlyCredentials
from botocore.eventstream import EventStreamBuffer, EventStreamError
from yarl import URL

from .. import http
from .base import GATEWAY_USAGE, Completion, ProviderAdapter, ProviderError, Target, Usage, register
from .transport import _network_error, error_from_response, post_json

SERVICE = "bedrock"
DEFAULT_REGION = "us-east-1"

STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter",
}
_IMAGE_FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg", "image/gif": "gif",
                  "image/webp": "webp"}


# --- credentials ------------------------------------------------------------------------------

_chains: dict[str, tuple[float, ReadOnlyCredentials]] = {}


def _from_secret(secret: str) -> ReadOnlyCredentials:
    secret = secret.strip()
    if secret.startswith("{"):
        try:
            data = orjson.loads(secret)
        except orjson.JSONDecodeError:
            raise ProviderError("the Bedrock credential is not valid JSON", status=500, code="provider_misconfigured")
        key, private, token = (data.get("aws_access_key_id"), data.get("aws_secret_access_key"),
                               data.get("aws_session_token"))
    else:
        key, _, rest = secret.partition(":")
        private, _, token = rest.partition(":")
    if not key or not private:
        raise ProviderError("the Bedrock credential needs an access key id and a secret access key", status=500,
                            code="provider_misconfigured")
    return ReadOnlyCredentials(key, private, token or None)


def _from_chain(profile: str) -> ReadOnlyCredentials:
    """botocore's default chain (blocking: the caller runs it in a thread)."""
    import botocore.session

    session = botocore.session.Session(profile=profile or None)
    found = session.get_credentials()
    if found is None:
        raise ProviderError("no AWS credentials: set a provider secret, or the environment / a profile",
                            status=500, code="provider_misconfigured")
    return found.get_frozen_credentials()


async def credentials(target: Target) -> ReadOnlyCredentials:
    if target.secret:
        return _from_secret(target.secret)
    profile = str(target.options.get("profile") or "")
    hit = _chains.get(profile)
    if hit is not None and hit[0] > time.monotonic():
        return hit[1]
    frozen = await asyncio.to_thread(_from_chain, profile)
    _chains[profile] = (time.monotonic() + 300, frozen)  # re-read: temporary credentials rotate
    return frozen


def region_of(target: Target) -> str:
    return target.region or str(target.options.get("region") or "") or DEFAULT_REGION


def url_of(target: Target, action: str) -> str:
    """The model id is percent-encoded (an ARN's `/` must be), then put in the normal form the HTTP
    clients send (`:` unescaped): the signature must cover the path exactly as it goes out, since
    AWS recomputes it from the path it receives."""
    base = target.api_base or f"https://bedrock-runtime.{region_of(target)}.amazonaws.com"
    return str(URL(f"{base.rstrip('/')}/model/{quote(target.upstream_model, safe='')}/{action}"))


def signed_headers(creds: ReadOnlyCredentials, region: str, url: str, payload: bytes, *,
                   accept: str = "application/json") -> dict[str, str]:
    """SigV4 headers (Authorization, X-Amz-Date, X-Amz-Security-Token) for exactly this POST."""
    request = AWSRequest(method="POST", url=url, data=payload,
                         headers={"content-type": "application/json", "accept": accept})
    SigV4Auth(Credentials(creds.access_key, creds.secret_key, creds.token), SERVICE, region).add_auth(request)
    return dict(request.headers.items())


# --- translation ------------------------------------------------------------------------------


def _arguments(raw) -> dict:
    if isinstance(raw, dict):
        return raw
    try:
        value = orjson.loads(raw or "{}")
    except orjson.JSONDecodeError:
        return {"_raw": raw}
    return value if isinstance(value, dict) else {"value": value}


def _text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


def _blocks(content) -> list[dict]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}] if content else []
    out = []
    for part in content:
        if part.get("type") == "text":
            out.append({"text": part.get("text", "")})
        elif part.get("type") == "image_url":
            image = part.get("image_url") or {}
            url = image.get("url", "") if isinstance(image, dict) else str(image)
            if not url.startswith("data:"):
                raise ProviderError("Bedrock takes images inline only (data: URLs), not by URL", status=400,
                                    code="unsupported")
            head, _, data = url.partition(",")
            fmt = _IMAGE_FORMATS.get(head[5:].split(";")[0], "png")
            out.append({"image": {"format": fmt, "source": {"bytes": data}}})
    return out


def to_request(body: dict) -> dict:
    system: list[dict] = []
    messages: list[dict] = []

    def add(role: str, blocks: list[dict]) -> None:
        if not blocks:
            return
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"].extend(blocks)
        else:
            messages.append({"role": role, "content": blocks})

    for m in body["messages"]:
        role = m.get("role")
        if role in ("system", "developer"):
            text = _text(m.get("content"))
            if text:
                system.append({"text": text})
        elif role == "user":
            add("user", _blocks(m.get("content")))
        elif role == "assistant":
            blocks = _blocks(m.get("content"))
            for call in m.get("tool_calls") or ():
                fn = call.get("function") or {}
                blocks.append({"toolUse": {"toolUseId": call.get("id"), "name": fn.get("name"),
                                           "input": _arguments(fn.get("arguments"))}})
            add("assistant", blocks)
        elif role == "tool":
            add("user", [{"toolResult": {"toolUseId": m.get("tool_call_id"),
                                         "content": [{"text": _text(m.get("content"))}]}}])
    req: dict = {"messages": messages}
    if system:
        req["system"] = system
    config: dict = {}
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if max_tokens:
        config["maxTokens"] = max_tokens
    for ours, theirs in (("temperature", "temperature"), ("top_p", "topP")):
        if body.get(ours) is not None:
            config[theirs] = body[ours]
    stop = body.get("stop")
    if stop:
        config["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
    if config:
        req["inferenceConfig"] = config
    tools = [t for t in body.get("tools") or () if t.get("type", "function") == "function"]
    if tools:
        req["toolConfig"] = {"tools": [{"toolSpec": {
            "name": t["function"]["name"], "description": t["function"].get("description") or t["function"]["name"],
            "inputSchema": {"json": t["function"].get("parameters") or {"type": "object", "properties": {}}}}}
            for t in tools]}
        choice = body.get("tool_choice")
        if choice == "required":
            req["toolConfig"]["toolChoice"] = {"any": {}}
        elif choice == "auto":
            req["toolConfig"]["toolChoice"] = {"auto": {}}
        elif isinstance(choice, dict) and (choice.get("function") or {}).get("name"):
            req["toolConfig"]["toolChoice"] = {"tool": {"name": choice["function"]["name"]}}
    return req


def usage_of(data: dict | None) -> Usage | None:
    """A Converse `usage` object in our convention."""
    if not isinstance(data, dict) or not data:
        return None
    read = int(data.get("cacheReadInputTokens") or 0)
    write = int(data.get("cacheWriteInputTokens") or 0)
    return Usage(prompt_tokens=int(data.get("inputTokens") or 0) + read + write,
                 completion_tokens=int(data.get("outputTokens") or 0), cached_tokens=read, cache_write_tokens=write)


def from_response(data: dict, model: str) -> Completion:
    text, calls = [], []
    for block in ((data.get("output") or {}).get("message") or {}).get("content") or ():
        if "text" in block:
            text.append(block["text"])
        elif "toolUse" in block:
            use = block["toolUse"]
            calls.append({"id": use.get("toolUseId"), "type": "function",
                          "function": {"name": use.get("name"), "arguments": orjson.dumps(use.get("input") or {})
                                       .decode()}})
    message: dict = {"role": "assistant", "content": "".join(text) if text or not calls else None}
    if calls:
        message["tool_calls"] = calls
    usage = usage_of(data.get("usage")) or Usage(estimated=True)
    body = {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "message": message, "logprobs": None,
                                         "finish_reason": STOP_REASONS.get(data.get("stopReason") or "", "stop")}],
            "usage": usage.as_openai()}
    return Completion(body=body, usage=usage)


# --- the adapter ------------------------------------------------------------------------------


@register
class BedrockAdapter(ProviderAdapter):
    kind = "bedrock"

    async def _signed(self, target: Target, action: str, req: dict, accept: str) -> tuple[str, dict, bytes, tuple]:
        url = url_of(target, action)
        payload = orjson.dumps(req)
        creds = await credentials(target)
        headers = signed_headers(creds, region_of(target), url, payload, accept=accept)
        return url, headers, payload, (creds.secret_key, creds.token or "")

    async def complete(self, target: Target, body: dict) -> Completion:
        req = to_request(body)
        url, headers, _payload, secrets = await self._signed(target, "converse", req, "application/json")
        # post_json serialises `req` again with orjson: the very bytes that were signed
        data = await post_json(url, headers=headers, body=req, secrets=secrets)
        return from_response(data, target.upstream_model)

    async def stream(self, target: Target, body: dict):
        url, headers, payload, secrets = await self._signed(target, "converse-stream", to_request(body),
                                                            "application/vnd.amazon.eventstream")
        cid, created, model = "chatcmpl-" + uuid.uuid4().hex, int(time.time()), target.upstream_model

        def chunk(delta: dict, finish: str | None = None) -> dict:
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

        request = http.client().build_request("POST", url, content=payload, headers=headers)
        try:
            resp = await http.client().send(request, stream=True)
        except httpx.HTTPError as exc:
            raise _network_error(exc)
        try:
            if resp.status_code >= 400:
                raise error_from_response(resp, await resp.aread(), secrets)
            frames = EventStreamBuffer()
            tools: dict[int, int] = {}
            stopped = False
            try:
                async for data in resp.aiter_bytes():
                    frames.add_data(data)
                    for frame in frames:
                        kind = frame.headers.get(":message-type")
                        event = frame.headers.get(":event-type") or frame.headers.get(":exception-type")
                        try:
                            payload_data = orjson.loads(frame.payload or b"{}")
                        except orjson.JSONDecodeError:
                            raise ProviderError("upstream sent a stream event that is not JSON",
                                                code="upstream_bad_body")
                        if kind in ("exception", "error"):
                            message = payload_data.get("message") or frame.headers.get(":error-message") or event
                            raise ProviderError(f"upstream stream error: {event}: {message}",
                                                code="upstream_stream_error")
                        if event == "messageStart":
                            yield chunk({"role": "assistant", "content": ""})
                        elif event == "contentBlockStart":
                            use = (payload_data.get("start") or {}).get("toolUse")
                            if use:
                                n = tools[payload_data.get("contentBlockIndex", 0)] = len(tools)
                                yield chunk({"tool_calls": [{"index": n, "id": use.get("toolUseId"),
                                                             "type": "function", "function": {
                                                                 "name": use.get("name"), "arguments": ""}}]})
                        elif event == "contentBlockDelta":
                            delta = payload_data.get("delta") or {}
                            if "text" in delta:
                                yield chunk({"content": delta["text"]})
                            elif "toolUse" in delta:
                                n = tools.get(payload_data.get("contentBlockIndex", 0), 0)
                                yield chunk({"tool_calls": [{"index": n, "function": {
                                    "arguments": delta["toolUse"].get("input", "")}}]})
                        elif event == "messageStop":
                            stopped = True
                            yield chunk({}, STOP_REASONS.get(payload_data.get("stopReason") or "", "stop"))
                        elif event == "metadata":
                            usage = usage_of(payload_data.get("usage"))
                            if usage is not None:
                                yield {"id": cid, "object": "chat.completion.chunk", "created": created,
                                       "model": model, "choices": [], "usage": usage.as_openai(),
                                       GATEWAY_USAGE: usage}
                            return
            except EventStreamError as exc:
                raise ProviderError(f"upstream sent a broken event-stream frame ({type(exc).__name__})",
                                    code="upstream_bad_body")
            except httpx.HTTPError as exc:
                raise ProviderError(f"upstream stream broke ({type(exc).__name__})", code="upstream_stream_broken")
            if not stopped:
                raise ProviderError("upstream stream ended before messageStop", code="upstream_stream_broken")
        finally:
            await resp.aclose()
