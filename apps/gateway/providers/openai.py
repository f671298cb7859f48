"""OpenAI itself (api.openai.com conventions): the OpenAI wire format, bearer auth, and the
optional `OpenAI-Organization` / `OpenAI-Project` headers from the provider's options. Usage is
parsed by the OpenAI wire format's parser (`openai_compatible.usage_of`).

Batch API (a deployment with `provider_batch`): the lines are uploaded as one JSONL file
(`POST /files`, multipart, purpose=batch; each line `{"custom_id", "method": "POST", "url":
"/v1/chat/completions", "body"}`), then `POST /batches` {input_file_id, endpoint,
completion_window: "24h", metadata}; `GET /batches/{id}` until its status is completed, failed,
expired or cancelled; then `GET /files/{output_file_id}/content` and `.../{error_file_id}/content`,
whose lines are `{"id", "custom_id", "response": {"status_code", "request_id", "body"} | null,
"error": {"code", "message"} | null}`. Lines never run carry `error.code` batch_expired or
batch_cancelled. Cancel: `POST /batches/{id}/cancel`.
"""

from __future__ import annotations

from dataclasses import replace

import orjson

from .base import BatchPoll, BatchResult, Completion, Target, Usage, register
from .openai_compatible import OpenAICompatibleAdapter, relayed_usage, usage_of
from .transport import jsonl, request, request_json

DEFAULT_API_BASE = "https://api.openai.com/v1"
BATCH_ENDED = ("completed", "failed", "expired", "cancelled")
CHAT_PATH = "/v1/chat/completions"


def batch_line_result(item: dict) -> BatchResult:
    """One line of a batch's output or error file."""
    custom_id = str(item.get("custom_id") or "")
    response = item.get("response") if isinstance(item.get("response"), dict) else None
    error = item.get("error") if isinstance(item.get("error"), dict) else None
    if response is not None and response.get("status_code") == 200 and isinstance(response.get("body"), dict):
        body = response["body"]
        usage = usage_of(body.get("usage"))
        if usage is not None:
            body["usage"] = relayed_usage(body["usage"], usage)
            return BatchResult(custom_id, "succeeded", Completion(body=body, usage=replace(usage, batch_priced=True)))
        return BatchResult(custom_id, "succeeded",  # no usage: counted by the caller, at the batch price
                           Completion(body=body, usage=Usage(estimated=True, batch_priced=True)))
    if response is not None:
        body = response.get("body") if isinstance(response.get("body"), dict) else {}
        err = body.get("error") if isinstance(body.get("error"), dict) else {}
        return BatchResult(custom_id, "errored", status=int(response.get("status_code") or 502),
                           message=str(err.get("message") or "the upstream failed this request"),
                           code=str(err.get("code") or err.get("type") or "upstream_error"))
    code = str((error or {}).get("code") or "")
    outcome = {"batch_expired": "expired", "batch_cancelled": "canceled"}.get(code, "errored")
    return BatchResult(custom_id, outcome, status=400 if outcome == "errored" else 0,
                       message=str((error or {}).get("message") or ""), code=code or "upstream_error")


@register
class OpenAIAdapter(OpenAICompatibleAdapter):
    kind = "openai"
    supports_batch = True

    def headers(self, target: Target) -> dict:
        headers = super().headers(target)
        if target.options.get("organization"):
            headers["openai-organization"] = str(target.options["organization"])
        if target.options.get("project"):
            headers["openai-project"] = str(target.options["project"])
        return headers

    def url(self, target: Target, path: str) -> str:
        return (target.api_base or DEFAULT_API_BASE).rstrip("/") + path

    def _plain_headers(self, target: Target) -> dict:
        return {k: v for k, v in self.headers(target).items() if k != "content-type"}

    async def batch_submit(self, target: Target, requests: list[tuple[str, dict]], *, metadata: dict) -> str:
        content = b"\n".join(orjson.dumps({"custom_id": cid, "method": "POST", "url": CHAT_PATH, "body": body})
                             for cid, body in requests) + b"\n"
        uploaded = await request_json("POST", self.url(target, "/files"), headers=self._plain_headers(target),
                                      files={"file": ("batch.jsonl", content, "application/jsonl")},
                                      data={"purpose": "batch"}, secrets=(target.secret,))
        created = await request_json("POST", self.url(target, "/batches"), headers=self.headers(target),
                                     body={"input_file_id": uploaded["id"], "endpoint": CHAT_PATH,
                                           "completion_window": "24h", "metadata": metadata},
                                     secrets=(target.secret,))
        return str(created["id"])

    async def batch_poll(self, target: Target, upstream_id: str) -> BatchPoll:
        data = await request_json("GET", self.url(target, f"/batches/{upstream_id}"),
                                  headers=self._plain_headers(target), secrets=(target.secret,))
        status = str(data.get("status") or "")
        return BatchPoll(status=status, ended=status in BATCH_ENDED, data=data)

    async def batch_results(self, target: Target, poll: BatchPoll) -> list[BatchResult]:
        out: list[BatchResult] = []
        for key in ("output_file_id", "error_file_id"):
            file_id = poll.data.get(key)
            if not file_id:
                continue
            content = await request("GET", self.url(target, f"/files/{file_id}/content"),
                                    headers=self._plain_headers(target), secrets=(target.secret,))
            out += [batch_line_result(item) for item in jsonl(content)]
        return out

    async def batch_cancel(self, target: Target, upstream_id: str) -> None:
        await request_json("POST", self.url(target, f"/batches/{upstream_id}/cancel"),
                           headers=self._plain_headers(target), secrets=(target.secret,))
