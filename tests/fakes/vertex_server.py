"""A fake Google Vertex AI on loopback, with its own OAuth token endpoint.

- `POST /token`: Google's JWT-bearer grant (`grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`,
  `assertion` = a JWT signed RS256 with the service account's private key, `aud` = Google's token endpoint,
  `scope` = cloud-platform); the signature is checked with the key pair the fake generated, and the
  answer is `{"access_token", "expires_in", "token_type": "Bearer"}`. `service_account_info()` is a
  service account JSON key for it.
- `POST /v1/projects/{project}/locations/{location}/publishers/google/models/{model}:generateContent`
  and `:streamGenerateContent?alt=sse`: the Gemini wire format (answered by the Gemini fake).
- `.../publishers/anthropic/models/{model}:rawPredict` and `:streamRawPredict`: Anthropic's Messages
  format without `model` and with `anthropic_version: vertex-2023-10-16` in the body (answered by
  the Anthropic fake, so its model behaviours apply).
Every model call needs `Authorization: Bearer <a token this fake issued>` (else 401, Google's
error shape). Requests are recorded with the body as sent.
"""

from __future__ import annotations

import itertools

import jwt
import orjson
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .anthropic_server import FakeAnthropic
from .gemini_server import FakeGemini
from .openai_server import FakeOpenAI

PROJECT = "fake-project"
CLIENT_EMAIL = "gateway@fake-project.iam.gserviceaccount.com"
SCOPE = "https://www.googleapis.com/auth/cloud-platform"
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"


def _google_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"code": status, "message": message, "status": "UNAUTHENTICATED"}},
                             status=status)


class _Gemini(FakeGemini):
    def __init__(self, owner: FakeVertex):
        super().__init__()
        self.owner = owner

    async def _record(self, request: web.Request) -> dict:
        return self.owner.last_body


class _Anthropic(FakeAnthropic):
    def __init__(self, owner: FakeVertex):
        super().__init__()
        self.owner = owner

    async def _record(self, request: web.Request) -> dict:
        body = dict(self.owner.last_body)
        # Vertex takes the model in the URL and the version in the body: anything else is a 400
        if "model" in body or body.pop("anthropic_version", None) != "vertex-2023-10-16":
            return {"model": "fail-400", "max_tokens": 1, "messages": []}
        body["model"] = request.match_info["call"].partition(":")[0]
        body["stream"] = request.match_info["call"].endswith(":streamRawPredict")
        return body


class FakeVertex(FakeOpenAI):
    def __init__(self):
        super().__init__()
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.tokens: set[str] = set()
        self.token_requests = 0
        self._serial = itertools.count(1)
        self.last_body: dict = {}
        self.gemini = _Gemini(self)
        self.anthropic = _Anthropic(self)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def service_account_info(self) -> dict:
        pem = self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()).decode()
        return {"type": "service_account", "project_id": PROJECT, "private_key_id": "fake-key-1",
                "private_key": pem, "client_email": CLIENT_EMAIL, "client_id": "1234567890",
                "token_uri": f"{self.base_url}/token"}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/token", self.token)
        app.router.add_post("/v1/projects/{project}/locations/{location}/publishers/{publisher}/models/{call}",
                            self.call)
        return app

    async def token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        form = await request.post()
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        try:
            # google-auth addresses the assertion to Google's token endpoint whatever the key's token_uri
            claims = jwt.decode(str(form.get("assertion", "")), self.key.public_key(), algorithms=["RS256"],
                                audience=[GOOGLE_TOKEN_AUDIENCE, f"{self.base_url}/token"])
        except jwt.PyJWTError as exc:
            return web.json_response({"error": "invalid_grant", "error_description": str(exc)}, status=400)
        if claims.get("iss") != CLIENT_EMAIL or SCOPE not in str(claims.get("scope", "")).split():
            return web.json_response({"error": "invalid_scope"}, status=400)
        token = f"ya29.fake-{next(self._serial)}"
        self.tokens.add(token)
        return web.json_response({"access_token": token, "expires_in": 3600, "token_type": "Bearer"})

    async def call(self, request: web.Request) -> web.StreamResponse:
        # the wrapped fakes get a clone (made before the body is read) with the headers they expect
        inner = request.clone(headers={**request.headers, "x-goog-api-key": "vertex", "x-api-key": "vertex",
                                       "anthropic-version": "vertex"})
        raw = await request.read()
        self.last_body = orjson.loads(raw or b"{}")
        info = request.match_info
        self.requests.append({"path": request.path, "headers": dict(request.headers), "body": self.last_body,
                              "query": dict(request.query), "project": info["project"],
                              "location": info["location"], "publisher": info["publisher"]})
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in self.tokens:
            return _google_error(401, "Request had invalid authentication credentials.")
        if info["publisher"] == "google":
            return await self.gemini.call(inner)
        if info["publisher"] == "anthropic":
            return await self.anthropic.messages(inner)
        return _google_error(404, f"unknown publisher {info['publisher']}")
