"""The /v1 OpenAPI document: request bodies, responses (the error shape included) and the bearer
scheme, for views that read `request.body` themselves (the pipeline parses a body once, into
schemas.GatewayRequest; ninja never parses one on the hot path).

Request bodies are generated from the validating models of schemas.py (`model_json_schema()`), so
the document cannot drift from what the gateway accepts; responses are documentation-only models
of what the views write. Each operation takes its part through `openapi_extra=` (see api.py); the
component schemas they refer to are added to the document by `GatewayAPI`."""

from __future__ import annotations

from typing import Any, Literal

from ninja import NinjaAPI
from pydantic import BaseModel, ConfigDict, Field

from . import schemas

REF = "#/components/schemas/{model}"
SECURITY_SCHEME = "bearerAuth"

# --- component schemas --------------------------------------------------------------------------

_components: dict[str, dict] = {}


def _register(model: type[BaseModel], name: str | None = None) -> dict:
    """Add a pydantic model (and the models it uses) to the components; returns a reference to it."""
    schema = model.model_json_schema(ref_template=REF)
    for def_name, definition in schema.pop("$defs", {}).items():
        _components.setdefault(def_name, definition)
    name = name or model.__name__
    _components[name] = schema
    return {"$ref": REF.format(model=name)}


def _register_schema(name: str, schema: dict) -> dict:
    _components[name] = schema
    return {"$ref": REF.format(model=name)}


def _with_options(model: type[BaseModel], name: str) -> dict:
    """An OpenAI body model plus our fields riding along it (metadata, cache, async, batch_id,
    callback_url), as one schema."""
    body = model.model_json_schema(ref_template=REF)
    options = schemas.GatewayOptions.model_json_schema(ref_template=REF)
    for source in (body, options):
        for def_name, definition in source.pop("$defs", {}).items():
            _components.setdefault(def_name, definition)
    body["properties"].update(options["properties"])
    body["title"] = name
    body["description"] = (model.__doc__ or "").strip() + (
        " Our fields ride along the OpenAI body: `metadata` (source_id, source_type, priority, budget_id, "
        "tags, semantic_cache, semantic_cache_threshold), "
        "`cache`, `async` (answer 202 and run later), `batch_id`, `callback_url`.")
    return _register_schema(name, body)


# Errors: OpenAI's shape, everywhere on /v1.
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class Error(BaseModel):
    """Every /v1 error: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorDetail


# Responses (documentation only: the views write these dicts themselves).
class _Doc(BaseModel):
    model_config = ConfigDict(extra="allow")


class ChatCompletion(_Doc):
    """OpenAI's chat completion object (as the provider's adapter returns it)."""

    id: str
    object: str
    created: int | None = None
    model: str | None = None
    choices: list[dict[str, Any]]
    usage: dict[str, Any] | None = None


class Embedding(_Doc):
    object: str
    index: int
    embedding: list[float] | str


class EmbeddingList(_Doc):
    object: Literal["list"]
    data: list[Embedding]
    model: str | None = None
    usage: dict[str, Any] | None = None


class SeedResult(_Doc):
    """The seed envelope's answer: the request id and the chat completion."""

    id: str
    status: Literal["completed"]
    result: ChatCompletion


class AsyncAccepted(_Doc):
    """`async: true`: the request is admitted and stored; poll GET /v1/requests/{id}."""

    id: str
    object: Literal["request"]
    status: str


class AsyncRequest(_Doc):
    id: str
    object: Literal["request"]
    status: str
    model: str | None
    created_at: int | None
    started_at: int | None
    completed_at: int | None
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    usage: dict[str, Any] | None


class Model(_Doc):
    """An alias (`gpt-4o`), or one of its versions (`gpt-4o@2024-08-06`), which a request may pin."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    parent: str | None = Field(None, description="A version's alias.")
    version: str | None = Field(None, description="A version's name: its label, else its upstream model.")
    share: int | None = Field(None, description="A version's percent of the bare alias's traffic under a rollout "
                                                "(null: no rollout, every version serves the alias).")


class ModelList(_Doc):
    object: Literal["list"]
    data: list[Model]


class Budget(_Doc):
    """A budget that applies to the calling key. Money as exact decimal strings (USD)."""

    id: int
    object: Literal["budget"]
    name: str
    budget_id: str | None
    scope: str
    scope_value: str | None
    end_user: str | None  # a user:* budget counted for the end user asked about (?user=)
    period: str
    enforcement: Literal["hard", "soft"]
    currency: Literal["USD"]
    limit_usd: str
    spent_usd: str
    held_usd: str
    remaining_usd: str
    period_start: str | None
    resets_at: str | None
    timezone: str


class BudgetList(_Doc):
    object: Literal["list"]
    data: list[Budget]


class File(_Doc):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    expires_at: int | None
    status_details: str | None


class _Page(_Doc):
    object: Literal["list"]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileList(_Page):
    data: list[File]


class FileDeleted(_Doc):
    id: str
    object: Literal["file"]
    deleted: bool


class RequestCounts(_Doc):
    total: int
    completed: int
    failed: int


class Batch(_Doc):
    id: str
    object: Literal["batch"]
    endpoint: str
    errors: dict[str, Any] | list[Any] | None
    input_file_id: str
    completion_window: str
    status: str
    output_file_id: str | None
    error_file_id: str | None
    created_at: int | None
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    metadata: dict[str, Any] | None


class BatchList(_Page):
    data: list[Batch]


class BatchCreate(BaseModel):
    """OpenAI's batch: a JSONL file uploaded with purpose `batch`, run against one endpoint."""

    input_file_id: str = Field(max_length=100)
    endpoint: Literal["/v1/chat/completions", "/v1/embeddings"]
    completion_window: Literal["24h"] = "24h"
    metadata: dict[str, str] | None = Field(default=None, max_length=16)


def _seed_envelope() -> dict:
    """`{"request": {model, messages, options, metadata}}`, from the chat and options models."""
    chat = schemas.ChatBody.model_json_schema(ref_template=REF)
    options = schemas.GatewayOptions.model_json_schema(ref_template=REF)
    for source in (chat, options):
        for def_name, definition in source.pop("$defs", {}).items():
            _components.setdefault(def_name, definition)
    chat_props, option_props = chat["properties"], options["properties"]
    inner = {
        "type": "object",
        "additionalProperties": False,
        "required": ["model", "messages"],
        "properties": {
            "model": chat_props["model"],
            "messages": chat_props["messages"],
            "options": {
                "type": "object", "additionalProperties": False,
                "properties": {**{k: chat_props[k] for k in ("temperature", "max_tokens", "stream")},
                               **{k: option_props[k] for k in ("cache", "async", "batch_id", "callback_url")}},
            },
            "metadata": option_props["metadata"],
        },
    }
    return _register_schema("SeedRequest", {
        "title": "SeedRequest", "type": "object", "required": ["request"], "properties": {"request": inner},
        "description": "The seed's request envelope; answered as `{id, status, result}` (result: a chat "
                       "completion), or 202 with `async`."})


ERROR = _register(Error)
CHAT_REQUEST = _with_options(schemas.ChatBody, "ChatCompletionRequest")
EMBEDDINGS_REQUEST = _with_options(schemas.EmbeddingsBody, "EmbeddingsRequest")
SEED_REQUEST = _seed_envelope()
BATCH_CREATE = _register(BatchCreate)

# --- operations ---------------------------------------------------------------------------------

_ERROR_TEXT = {
    400: "Invalid request (a bad field or parameter is named in `param`).",
    401: "Missing, unknown, revoked or expired API key.",
    402: "A hard budget would be exceeded.",
    403: "The key may not use this model, endpoint, source or region.",
    404: "No such model or object (another tenant's objects do not exist for this key).",
    409: "The object is in a state that does not allow this.",
    413: "The request body is too large.",
    429: "A rate limit, concurrency limit or the providers' quota; see `retry-after`.",
    500: "The gateway failed.",
    502: "The provider failed.",
    503: "No deployment available, or the gateway cannot admit the request now.",
    504: "The provider did not answer in time.",
}
_SERVER = (500, 502, 503, 504)
BASE_ERRORS = (400, 401, 403, 429, 500, 503)  # any authenticated /v1 call
PIPELINE_ERRORS = (400, 401, 402, 403, 404, 413, 429, *_SERVER)  # a model call


def _json(ref: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": ref}}}


def _responses(ok: dict[int, dict], errors: tuple[int, ...], error_schema: dict | None = None) -> dict[int, dict]:
    out = dict(ok)  # int keys, as ninja writes its own default 200
    for status in sorted(set(errors)):
        out[status] = _json(error_schema or ERROR, _ERROR_TEXT[status])
    return out


def operation(*, ok: dict[int, dict], errors: tuple[int, ...] = BASE_ERRORS, body: dict | None = None,
              error_schema: dict | None = None) -> dict:
    """An operation's openapi_extra: its request body, its answers and the errors it may give
    (OpenAI's error shape unless `error_schema`: Anthropic's, for /v1/messages)."""
    extra: dict[str, Any] = {"responses": _responses(ok, errors, error_schema)}
    if body is not None:
        extra["requestBody"] = body
    return extra


def json_body(ref: dict, example: dict | None = None) -> dict:
    media: dict[str, Any] = {"schema": ref}
    if example is not None:
        media["example"] = example
    return {"required": True, "content": {"application/json": media}}


_ASYNC = {202: _json(_register(AsyncAccepted), "Accepted (`async: true`): poll GET /v1/requests/{id}.")}
_SSE = {"text/event-stream": {"schema": {"type": "string"}}}
_CHAT_OK = {"description": "The chat completion; with `stream: true`, server-sent events (OpenAI's chunks).",
            "content": {"application/json": {"schema": _register(ChatCompletion)}, **_SSE}}

CHAT = operation(
    body=json_body(CHAT_REQUEST, {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}],
                                  "max_tokens": 64}),
    ok={200: _CHAT_OK, **_ASYNC}, errors=PIPELINE_ERRORS)
EMBEDDINGS = operation(
    body=json_body(EMBEDDINGS_REQUEST, {"model": "text-embedding-3-small", "input": ["Hello"]}),
    ok={200: _json(_register(EmbeddingList), "The embeddings."), **_ASYNC}, errors=PIPELINE_ERRORS)
SEED = operation(
    body=json_body(SEED_REQUEST, {"request": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}],
                                              "options": {"max_tokens": 64}}}),
    ok={200: {"description": "The result; with `options.stream: true`, server-sent events.",
              "content": {"application/json": {"schema": _register(SeedResult)}, **_SSE}}, **_ASYNC},
    errors=PIPELINE_ERRORS)
MODELS = operation(ok={200: _json(_register(ModelList), "The models this key may use.")})
BUDGET = {**operation(ok={200: _json(_register(BudgetList), "Every budget that applies to the calling key.")}),
          "parameters": [
              {"name": "budget_id", "in": "query", "required": False, "schema": {"type": "string"},
               "description": "Also the budget a request with this metadata.budget_id would hit."},
              {"name": "tag", "in": "query", "required": False,
               "schema": {"type": "array", "items": {"type": "string"}}, "style": "form", "explode": True,
               "description": "Also the budgets of these metadata.tags values (repeatable)."},
              {"name": "user", "in": "query", "required": False, "schema": {"type": "string"},
               "description": "Also this end user's budget (user:<id>, else user:* counted for them)."}]}
REQUEST_GET = operation(ok={200: _json(_register(AsyncRequest), "The async request.")}, errors=(*BASE_ERRORS, 404))

FILE = _register(File)
FILE_UPLOAD = operation(
    body={"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file", "purpose"],
        "properties": {"file": {"type": "string", "format": "binary",
                                "description": "JSONL, one request per line (OpenAI's batch input format)."},
                       "purpose": {"type": "string", "enum": ["batch"]}}},
        "example": {"purpose": "batch", "file": '{"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", '
                                                '"body": {"model": "gpt-4o-mini", "messages": []}}\n'}}}},
    ok={200: _json(FILE, "The stored file.")}, errors=(*BASE_ERRORS, 413))
FILE_GET = operation(ok={200: _json(FILE, "The file.")}, errors=(*BASE_ERRORS, 404))
FILE_LIST = operation(ok={200: _json(_register(FileList), "The key's tenant's files, newest first.")})
FILE_DELETE = operation(ok={200: _json(_register(FileDeleted), "Deleted.")}, errors=(*BASE_ERRORS, 404))
FILE_CONTENT = operation(ok={200: {"description": "The file's content.",
                                   "content": {"application/jsonl": {"schema": {"type": "string"}}}}},
                         errors=(*BASE_ERRORS, 404))

BATCH = _register(Batch)
BATCH_CREATE_OP = operation(
    body=json_body(BATCH_CREATE, {"input_file_id": "file-abc123", "endpoint": "/v1/chat/completions",
                                  "completion_window": "24h"}),
    ok={200: _json(BATCH, "The batch, validating.")}, errors=(*BASE_ERRORS, 413))
BATCH_GET = operation(ok={200: _json(BATCH, "The batch.")}, errors=(*BASE_ERRORS, 404))
BATCH_LIST = operation(ok={200: _json(_register(BatchList), "The key's tenant's batches, newest first.")})
BATCH_CANCEL = operation(ok={200: _json(BATCH, "The batch, cancelling or cancelled.")},
                         errors=(*BASE_ERRORS, 404, 409))


class GatewayAPI(NinjaAPI):
    """NinjaAPI whose document also carries the component schemas the operations refer to and the
    bearer scheme every /v1 operation requires."""

    def get_openapi_schema(self, *, path_prefix=None, path_params=None):
        schema = super().get_openapi_schema(path_prefix=path_prefix, path_params=path_params)
        components = schema.setdefault("components", {})
        components.setdefault("schemas", {}).update(_components)
        components.setdefault("securitySchemes", {})[SECURITY_SCHEME] = {
            "type": "http", "scheme": "bearer",
            "description": "An API key of the gateway: `Authorization: Bearer sk-...`."}
        schema["security"] = [{SECURITY_SCHEME: []}]
        return schema


# --- other dialects (apps/gateway/dialects): documented loosely, their own SDKs define them --------

_OBJECT = {"type": "object", "additionalProperties": True}
ANTHROPIC_ERROR = _register_schema("AnthropicError", {
    "title": "AnthropicError", "type": "object", "required": ["type", "error"],
    "properties": {"type": {"type": "string", "enum": ["error"]},
                   "error": {"type": "object", "required": ["type", "message"],
                             "properties": {"type": {"type": "string"}, "message": {"type": "string"}}}},
    "description": "Anthropic's error shape, so the `anthropic` SDK raises its own error classes."})
MESSAGES = operation(
    body=json_body({**_OBJECT, "title": "AnthropicMessagesRequest", "required": ["model", "messages", "max_tokens"],
                    "description": "Anthropic's Messages API body (x-api-key or Bearer with our API keys)."},
                   {"model": "gpt-4o-mini", "max_tokens": 64, "messages": [{"role": "user", "content": "Hello"}]}),
    ok={200: {"description": "An Anthropic message; with `stream: true`, Anthropic's server-sent events.",
              "content": {"application/json": {"schema": _OBJECT}, **_SSE}}, **_ASYNC},
    errors=PIPELINE_ERRORS, error_schema=ANTHROPIC_ERROR)
MESSAGES_COUNT_TOKENS = operation(
    body=json_body({**_OBJECT, "title": "AnthropicCountTokensRequest", "required": ["model", "messages"]},
                   {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}]}),
    ok={200: _json({"type": "object", "required": ["input_tokens"],
                    "properties": {"input_tokens": {"type": "integer"}, "estimated": {"type": "boolean"}}},
                   "The prompt's input tokens (the provider's count, or our estimate, flagged).")},
    errors=PIPELINE_ERRORS, error_schema=ANTHROPIC_ERROR)
RESPONSES = operation(
    body=json_body({**_OBJECT, "title": "ResponsesRequest", "required": ["model"],
                    "description": "OpenAI's Responses API body (stateless, or `store` + `previous_response_id`)."},
                   {"model": "gpt-4o-mini", "input": "Hello"}),
    ok={200: {"description": "A response; with `stream: true`, the Responses event sequence.",
              "content": {"application/json": {"schema": _OBJECT}, **_SSE}}, **_ASYNC},
    errors=PIPELINE_ERRORS)
RESPONSE_GET = operation(ok={200: _json(_OBJECT, "A response kept with `store: true`.")},
                         errors=(*BASE_ERRORS, 404))
RESPONSE_DELETE = operation(ok={200: _json(_OBJECT, "Deleted.")}, errors=(*BASE_ERRORS, 404))
