"""Google Gemini (Generative Language API): `models/{model}:generateContent`,
`:streamGenerateContent?alt=sse` and `:batchEmbedContents`, `x-goog-api-key` auth.

Request: system messages become `systemInstruction`; roles user/assistant become user/model;
tool calls and results become functionCall / functionResponse parts; sampling parameters go to
`generationConfig`. Response: finishReason is mapped (STOP -> stop, MAX_TOKENS -> length, safety
reasons -> content_filter).
Usage (`usage_of`, from usageMetadata): promptTokenCount already includes the cached content, so
it is our prompt_tokens (plus toolUsePromptTokenCount, the input of built-in tools, billed as
input), with cachedContentTokenCount as cached_tokens; thoughtsTokenCount is billed as output and
is outside candidatesTokenCount, so completion_tokens = candidates + thoughts, with the thoughts
as reasoning_tokens. Streams repeat usageMetadata on their events (the last one is complete);
the usage chunk comes after the last event.
"""

from __future__ import annotations

import time
import uuid
from urllib.parse import quote

import orjson

from .base import GATEWAY_USAGE, Completion, ProviderAdapter, ProviderError, Target, Usage, register
from .transport import open_stream, post_json, sse_events

DEFAULT_API_BASE = "https://generativelanguage.googleapis.com"
DEFAULT_API_VERSION = "v1beta"

FINISH_REASONS = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
}


def _text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


def _parts(content) -> list[dict]:
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
            if url.startswith("data:"):
                head, _, data = url.partition(",")
                out.append({"inlineData": {"mimeType": head[5:].split(";")[0] or "image/png", "data": data}})
            else:
                out.append({"fileData": {"fileUri": url}})
    return out


def _arguments(raw) -> dict:
    if isinstance(raw, dict):
        return raw
    try:
        value = orjson.loads(raw or "{}")
    except orjson.JSONDecodeError:
        return {"_raw": raw}
    return value if isinstance(value, dict) else {"value": value}


def to_contents(messages: list[dict]) -> tuple[dict | None, list[dict]]:
    system: list[str] = []
    contents: list[dict] = []
    names: dict[str, str] = {}  # tool_call_id -> function name, for functionResponse

    def add(role: str, parts: list[dict]) -> None:
        if not parts:
            return
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})

    for m in messages:
        role = m.get("role")
        if role in ("system", "developer"):
            system.append(_text(m.get("content")))
        elif role == "user":
            add("user", _parts(m.get("content")))
        elif role == "assistant":
            parts = _parts(m.get("content"))
            for call in m.get("tool_calls") or ():
                fn = call.get("function") or {}
                names[call.get("id", "")] = fn.get("name", "")
                parts.append({"functionCall": {"name": fn.get("name"), "args": _arguments(fn.get("arguments"))}})
            add("model", parts)
        elif role == "tool":
            raw = _text(m.get("content"))
            try:
                response = orjson.loads(raw)
            except orjson.JSONDecodeError:
                response = None
            if not isinstance(response, dict):
                response = {"result": raw}
            add("user", [{"functionResponse": {"name": names.get(m.get("tool_call_id", ""), m.get("name", "")),
                                               "response": response}}])
    instruction = {"parts": [{"text": "\n\n".join(s for s in system if s)}]} if any(system) else None
    return instruction, contents


def to_request(body: dict) -> dict:
    instruction, contents = to_contents(body["messages"])
    req: dict = {"contents": contents}
    if instruction:
        req["systemInstruction"] = instruction
    config: dict = {}
    for ours, theirs in (("temperature", "temperature"), ("top_p", "topP"), ("n", "candidateCount"),
                         ("presence_penalty", "presencePenalty"), ("frequency_penalty", "frequencyPenalty"),
                         ("seed", "seed")):
        if body.get(ours) is not None:
            config[theirs] = body[ours]
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if max_tokens:
        config["maxOutputTokens"] = max_tokens
    stop = body.get("stop")
    if stop:
        config["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
    fmt = (body.get("response_format") or {}).get("type")
    if fmt in ("json_object", "json_schema"):
        config["responseMimeType"] = "application/json"
    if config:
        req["generationConfig"] = config
    if body.get("tools"):
        req["tools"] = [{"functionDeclarations": [
            {"name": t["function"]["name"], "description": t["function"].get("description", ""),
             **({"parameters": t["function"]["parameters"]} if t["function"].get("parameters") else {})}
            for t in body["tools"] if t.get("type", "function") == "function"
        ]}]
        choice = body.get("tool_choice")
        if isinstance(choice, str) and choice in ("auto", "required", "none"):
            mode = {"auto": "AUTO", "required": "ANY", "none": "NONE"}[choice]
            req["toolConfig"] = {"functionCallingConfig": {"mode": mode}}
        elif isinstance(choice, dict) and (choice.get("function") or {}).get("name"):
            req["toolConfig"] = {"functionCallingConfig": {"mode": "ANY",
                                                           "allowedFunctionNames": [choice["function"]["name"]]}}
    return req


def usage_of(meta: dict | None) -> Usage | None:
    """A Gemini `usageMetadata` object in our convention; None when there is none."""
    if not isinstance(meta, dict) or not meta:
        return None
    thoughts = int(meta.get("thoughtsTokenCount") or 0)
    return Usage(prompt_tokens=int(meta.get("promptTokenCount") or 0) + int(meta.get("toolUsePromptTokenCount") or 0),
                 completion_tokens=int(meta.get("candidatesTokenCount") or 0) + thoughts,
                 cached_tokens=int(meta.get("cachedContentTokenCount") or 0), reasoning_tokens=thoughts)


def _message(candidate: dict) -> tuple[str, list[dict]]:
    text, calls = [], []
    for part in (candidate.get("content") or {}).get("parts") or ():
        if "text" in part and not part.get("thought"):
            text.append(part["text"])
        elif "functionCall" in part:
            fn = part["functionCall"]
            arguments = orjson.dumps(fn.get("args") or {}).decode()
            calls.append({"id": fn.get("id") or "call_" + uuid.uuid4().hex[:24], "type": "function",
                          "function": {"name": fn.get("name"), "arguments": arguments}})
    return "".join(text), calls


def _finish(candidate: dict, has_calls: bool) -> str | None:
    reason = candidate.get("finishReason")
    if not reason:
        return None
    if has_calls and reason == "STOP":
        return "tool_calls"
    return FINISH_REASONS.get(reason, "stop")


def _blocked(data: dict) -> None:
    feedback = data.get("promptFeedback") or {}
    if not data.get("candidates") and feedback.get("blockReason"):
        raise ProviderError(f"upstream blocked the prompt: {feedback['blockReason']}", status=400,
                            code="upstream_content_filter")


def from_response(data: dict, model: str) -> Completion:
    _blocked(data)
    choices = []
    for i, candidate in enumerate(data.get("candidates") or ()):
        text, calls = _message(candidate)
        message: dict = {"role": "assistant", "content": text if text or not calls else None}
        if calls:
            message["tool_calls"] = calls
        choices.append({"index": candidate.get("index", i), "message": message, "logprobs": None,
                        "finish_reason": _finish(candidate, bool(calls)) or "stop"})
    usage = usage_of(data.get("usageMetadata")) or Usage(estimated=True)
    body = {"id": "chatcmpl-" + (data.get("responseId") or uuid.uuid4().hex), "object": "chat.completion",
            "created": int(time.time()), "model": data.get("modelVersion") or model, "choices": choices,
            "usage": usage.as_openai()}
    return Completion(body=body, usage=usage)


@register
class GeminiAdapter(ProviderAdapter):
    kind = "gemini"
    supports_embeddings = True

    def headers(self, target: Target) -> dict:
        headers = {"content-type": "application/json"}
        if target.secret:
            headers["x-goog-api-key"] = target.secret
        return headers

    def url(self, target: Target, method: str) -> str:
        version = target.options.get("api_version") or DEFAULT_API_VERSION
        model = quote(target.upstream_model.removeprefix("models/"), safe="")
        return f"{(target.api_base or DEFAULT_API_BASE).rstrip('/')}/{version}/models/{model}:{method}"

    async def complete(self, target: Target, body: dict) -> Completion:
        data = await post_json(self.url(target, "generateContent"), headers=self.headers(target),
                               body=to_request(body), secrets=(target.secret,))
        return from_response(data, target.upstream_model)

    async def stream(self, target: Target, body: dict):
        cid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
        model, usage, started, calls_seen = target.upstream_model, None, False, 0
        async with open_stream(self.url(target, "streamGenerateContent"), headers=self.headers(target),
                               body=to_request(body), params={"alt": "sse"}, secrets=(target.secret,)) as resp:
            async for _event, data in sse_events(resp):
                try:
                    payload = orjson.loads(data)
                except orjson.JSONDecodeError:
                    raise ProviderError("upstream sent a stream event that is not JSON", code="upstream_bad_body")
                if "error" in payload:
                    err = payload["error"]
                    message = err.get("message") if isinstance(err, dict) else err
                    raise ProviderError(f"upstream stream error: {message}", code="upstream_stream_error")
                _blocked(payload)
                model = payload.get("modelVersion") or model
                usage = usage_of(payload.get("usageMetadata")) or usage

                def chunk(delta: dict, finish: str | None = None, model: str = model) -> dict:
                    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

                if not started:
                    started = True
                    yield chunk({"role": "assistant", "content": ""})
                for candidate in payload.get("candidates") or ():
                    text, calls = _message(candidate)
                    if text:
                        yield chunk({"content": text})
                    if calls:
                        yield chunk({"tool_calls": [{"index": calls_seen + i, **c} for i, c in enumerate(calls)]})
                        calls_seen += len(calls)
                    finish = _finish(candidate, calls_seen > 0)
                    if finish:
                        yield chunk({}, finish)
        if usage is not None:
            yield {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [], "usage": usage.as_openai(), GATEWAY_USAGE: usage}

    async def embed(self, target: Target, body: dict) -> Completion:
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        if inputs and isinstance(inputs[0], int):
            raise ProviderError("gemini embeddings take text, not token ids", status=400, code="unsupported")
        name = "models/" + target.upstream_model.removeprefix("models/")
        requests = []
        for item in inputs:
            req: dict = {"model": name, "content": {"parts": [{"text": str(item)}]}}
            if body.get("dimensions"):
                req["outputDimensionality"] = body["dimensions"]
            requests.append(req)
        data = await post_json(self.url(target, "batchEmbedContents"), headers=self.headers(target),
                               body={"requests": requests}, secrets=(target.secret,))
        out = [{"object": "embedding", "index": i, "embedding": e.get("values", [])}
               for i, e in enumerate(data.get("embeddings") or ())]
        return Completion(body={"object": "list", "data": out, "model": target.upstream_model,
                                "usage": {"prompt_tokens": 0, "total_tokens": 0}},
                          usage=Usage(estimated=True))
