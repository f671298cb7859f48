"""Request validation: the OpenAI chat-completions and embeddings bodies with our extra fields, and
the seed's `{"request": {...}}` envelope, parsed once into one typed object (`GatewayRequest`).
Types are strict (`"max_tokens": "5"` or `"stream": "false"` are 400, never passed on as strings),
strings of ours carry no control characters, and nesting is bounded. Errors name the bad field."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from apps.keys import outbound

from .errors import GatewayError, invalid_request
from .tokens import estimate_messages, estimate_text, prompt_bytes

MAX_DEPTH = 64  # nesting of objects and arrays in a body; deeper is refused (400)
CHAT = "chat"
EMBEDDINGS = "embeddings"


def _no_control(value: str | None) -> str | None:
    if value is not None and any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must not contain control characters")
    return value


Label = Annotated[str, AfterValidator(_no_control)]

# `metadata.tags`: short labels a client attaches to a request (ledger, filters, group-by, and the
# `tag:<name>` budgets and rate limits). Capped so a client cannot blow up counters or rollups.
MAX_TAGS = 10
MAX_TAG_LENGTH = 64
MAX_END_USER_LENGTH = 256  # OpenAI's `user`: the application's end user


def _tags_clean(value: list[str] | None) -> list[str] | None:
    """Order kept, duplicates dropped."""
    return list(dict.fromkeys(value)) if value else value


Tag = Annotated[str, Field(min_length=1, max_length=MAX_TAG_LENGTH), AfterValidator(_no_control)]
EndUser = Annotated[str, Field(max_length=MAX_END_USER_LENGTH), AfterValidator(_no_control)]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True, strict=True)


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(_Open):
    include_usage: bool = False


class GatewayMetadata(_Open):
    """The seed's metadata. Other keys are allowed and ignored."""

    source_id: Label | None = Field(default=None, max_length=100)
    source_type: Literal["application", "service"] | None = None
    priority: int | None = Field(default=None, ge=0, le=9)
    budget_id: Label | None = Field(default=None, max_length=100)
    tags: Annotated[list[Tag], AfterValidator(_tags_clean)] | None = Field(default=None, max_length=MAX_TAGS)
    # The semantic cache (apps/gateway/semantic.py): on or off for this request, and its threshold.
    semantic_cache: bool | None = None
    semantic_cache_threshold: float | None = Field(default=None, ge=0, le=1)


class GatewayOptions(BaseModel):
    """Fields of ours that ride along an OpenAI body; removed before the body goes upstream."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)
    metadata: GatewayMetadata | None = None
    cache: bool | None = None
    async_: bool | None = Field(default=None, alias="async")
    batch_id: Label | None = Field(default=None, max_length=100)
    callback_url: Label | None = Field(default=None, max_length=1000)

    @field_validator("callback_url")
    @classmethod
    def _public_destination(cls, v: str | None) -> str | None:
        """Refuse a callback to a non-public address now, without DNS (no lookup on the request
        path); delivery checks the address it actually connects to, names included."""
        if v is not None:
            try:
                outbound.url_check(v, resolve=False)
            except outbound.DestinationRefused as exc:
                raise PydanticCustomError("callback_url", "{reason}", {"reason": str(exc)}) from None
        return v


class ChatBody(_Open):
    model: Label = Field(min_length=1, max_length=200)
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: int | None = None
    user: EndUser | None = None


class EmbeddingsBody(_Open):
    model: Label = Field(min_length=1, max_length=200)
    input: str | list[str]
    dimensions: int | None = Field(default=None, ge=1)
    encoding_format: Literal["float", "base64"] | None = None
    user: EndUser | None = None


_OUR_FIELDS = ("metadata", "cache", "async", "batch_id", "callback_url")


def _param(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[dict[str,any]]", "function-after", "literal"):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def _raise_validation(exc: ValidationError, prefix: str = "") -> None:
    err = exc.errors(include_url=False)[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function"))))
    param = _param(loc)
    if prefix:
        param = f"{prefix}.{param}" if param else prefix
    msg = err["msg"]
    if err["type"] == "missing":
        msg = "is required"
    elif err["type"] == "extra_forbidden":
        msg = "is not a recognised field"
    raise invalid_request(f"Invalid value for '{param}': {msg}.", param=param)


def parse_json(raw: bytes) -> dict:
    if not raw:
        raise invalid_request("The request body is empty; expected a JSON object.")
    if b"\\u0000" in raw:
        raise invalid_request("The request body contains a NUL character (\\u0000), which is not allowed.")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid_request(f"The request body is not valid JSON: {exc}.")
    if not isinstance(data, dict):
        raise invalid_request("The request body must be a JSON object.")
    check_depth(data)
    return data


def check_depth(data: Any) -> None:
    """Refuse nesting deeper than MAX_DEPTH (a body of 1,000 nested lists is an attack, not a prompt)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise invalid_request(f"The request body is nested more than {MAX_DEPTH} levels deep.",
                                  code="too_deeply_nested")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values() if isinstance(v, dict | list))
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value if isinstance(v, dict | list))


def split_options(data: dict) -> tuple[dict, GatewayOptions]:
    """Separate our fields from the OpenAI body. The OpenAI SDK's own `metadata` (a map of
    strings for stored completions) is accepted as ours."""
    ours = {k: data.pop(k) for k in _OUR_FIELDS if k in data}
    try:
        return data, GatewayOptions.model_validate(ours)
    except ValidationError as exc:
        _raise_validation(exc)
        raise  # unreachable


def chat_body(data: dict) -> tuple[dict, GatewayOptions]:
    """Validate an OpenAI chat-completions body; returns the upstream body and our options."""
    data, options = split_options(data)
    try:
        ChatBody.model_validate(data)
    except ValidationError as exc:
        _raise_validation(exc)
    if data.get("stream_options") and not data.get("stream"):
        raise invalid_request("'stream_options' is only allowed when 'stream' is true.", param="stream_options")
    return data, options


def embeddings_body(data: dict) -> tuple[dict, GatewayOptions]:
    data, options = split_options(data)
    try:
        EmbeddingsBody.model_validate(data)
    except ValidationError as exc:
        _raise_validation(exc)
    if data["input"] in ("", []):
        raise invalid_request("Invalid value for 'input': must not be empty.", param="input")
    return data, options


def seed_envelope(data: dict) -> tuple[dict, GatewayOptions]:
    """The seed's `{"request": {model, messages, options, metadata}}`, as a chat body and options."""
    req = data.get("request")
    if not isinstance(req, dict):
        raise invalid_request("Invalid value for 'request': is required and must be an object.", param="request")
    unknown = set(req) - {"model", "messages", "options", "metadata"}
    if unknown:
        name = sorted(unknown)[0]
        raise invalid_request(f"Invalid value for 'request.{name}': is not a recognised field.",
                              param=f"request.{name}")
    opts = req.get("options") or {}
    if not isinstance(opts, dict):
        raise invalid_request("Invalid value for 'request.options': must be an object.", param="request.options")
    known = {"temperature", "max_tokens", "stream", "cache", "async", "batch_id", "callback_url"}
    for name in opts:
        if name not in known:
            raise invalid_request(f"Invalid value for 'request.options.{name}': is not a recognised field.",
                                  param=f"request.options.{name}")
    body: dict[str, Any] = {"model": req.get("model"), "messages": req.get("messages")}
    for name in ("temperature", "max_tokens", "stream"):
        if opts.get(name) is not None:
            body[name] = opts[name]
    for name in ("cache", "async", "batch_id", "callback_url"):
        if name in opts:
            body[name] = opts[name]
    if "metadata" in req:
        body["metadata"] = req["metadata"]
    try:
        return chat_body(body)
    except GatewayError as exc:
        if exc.param:
            top = exc.param.split(".")[0].split("[")[0]
            where = "request.options" if top in known else "request"
            exc.param = f"{where}.{exc.param}"
            exc.message = exc.message.replace("'", "'" + where + ".", 1)
        raise


# --- the one typed request ----------------------------------------------------------------------


@dataclass(slots=True)
class GatewayRequest:
    """A request parsed once: the upstream body (our fields removed), our options, and the bounds
    admission needs, computed here and carried as they are into async and batch work."""

    kind: str
    body: dict
    options: GatewayOptions = field(default_factory=GatewayOptions)
    prompt_bound: int = 0  # upper bound of the prompt's tokens (UTF-8 bytes, images counted at most)
    token_estimate: int = 0  # estimate of the prompt's tokens (TPM limits, fallback usage)
    dialect: str = ""  # the API the client spoke, when not chat completions ("messages", "responses")
    native: dict | None = None  # its body, our fields removed, for a deployment that takes it as it is

    @property
    def model(self) -> str:
        return self.body["model"]

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def include_usage(self) -> bool:
        return bool((self.body.get("stream_options") or {}).get("include_usage"))

    @property
    def asked_max_tokens(self) -> int | None:
        return self.body.get("max_completion_tokens") or self.body.get("max_tokens")

    @property
    def tags(self) -> list[str]:
        """`metadata.tags`, validated (at most MAX_TAGS, each 1-MAX_TAG_LENGTH characters, no control
        characters), duplicates dropped."""
        meta = self.options.metadata
        return list(meta.tags or ()) if meta is not None else []

    @property
    def end_user(self) -> str:
        """OpenAI's `user` field: the calling application's end user ("" when none)."""
        return self.body.get("user") or ""

    @property
    def inputs(self) -> list:
        value = self.body.get("input")
        return value if isinstance(value, list) else [value]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "body": self.body, "options": self.options.model_dump(by_alias=True,
                                                                                          exclude_none=True),
                "prompt_bound": self.prompt_bound, "token_estimate": self.token_estimate,
                "dialect": self.dialect, "native": self.native}

    @classmethod
    def from_dict(cls, data: dict) -> GatewayRequest:
        """A request parsed earlier (stored with async work): nothing is validated or derived again."""
        return cls(kind=data["kind"], body=data["body"], options=GatewayOptions.model_validate(data["options"]),
                   prompt_bound=data["prompt_bound"], token_estimate=data["token_estimate"],
                   dialect=data.get("dialect", ""), native=data.get("native"))


def parse_request(kind: str, data: dict | bytes) -> GatewayRequest:
    """Validate a body (raw JSON or parsed, in OpenAI's or the seed's shape) into a GatewayRequest."""
    if isinstance(data, bytes | bytearray):
        data = parse_json(data)
    else:
        check_depth(data)
    if kind == EMBEDDINGS:
        body, options = embeddings_body(data)
        texts = [str(i) for i in (body["input"] if isinstance(body["input"], list) else [body["input"]])]
        return GatewayRequest(kind=kind, body=body, options=options,
                              prompt_bound=sum(len(t.encode()) for t in texts) + 8,
                              token_estimate=sum(estimate_text(t) for t in texts))
    if "request" in data and "messages" not in data:
        body, options = seed_envelope(data)
    else:
        body, options = chat_body(data)
    extra = [body[k] for k in ("tools", "functions", "response_format") if body.get(k)]
    return GatewayRequest(kind=kind, body=body, options=options,
                          prompt_bound=prompt_bytes(body["messages"], extra),
                          token_estimate=estimate_messages(body["messages"]))


def parse_translated(chat: dict, *, dialect: str, native: dict | None = None) -> GatewayRequest:
    """The translation step of another API's dialect (apps.gateway.dialects): its body, already
    translated to a chat-completions body with our fields, is validated and bounded exactly as a
    chat request is. The prompt bound also covers the native body, which a deployment speaking the
    dialect is sent instead (it may carry what the chat shape drops: thinking blocks, cache_control)."""
    request = parse_request(CHAT, chat)
    request.dialect, request.native = dialect, native
    if native is not None:
        messages = [m for m in native.get("messages") or () if isinstance(m, dict)]
        extra = [native[k] for k in ("system", "tools", "tool_choice", "thinking") if native.get(k)]
        request.prompt_bound = max(request.prompt_bound, prompt_bytes(messages, extra))
    return request
