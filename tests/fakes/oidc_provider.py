"""A minimal OpenID Connect provider on loopback, for the SSO tests: real HTTP in a thread.

- `/.well-known/openid-configuration`: the discovery document;
- `/jwks`: the public half of an RSA key generated at start (`cryptography`);
- `/authorize`: no login page: redirects straight back to `redirect_uri` with a code for the
  configured test user (`provider.claims`, set by the test);
- `/token`: exchanges the code (client id and secret, redirect_uri and PKCE checked) for an access
  token and an RS256 id_token (PyJWT) carrying the nonce of the authorization request;
- `/userinfo`: the claims, for the bearer access token.

`provider.tamper` makes the next id_tokens wrong on purpose: `bad_signature` (signed with another
key under the same kid), `wrong_issuer`, `wrong_nonce`, `wrong_audience`, `expired`.
Every request is recorded (method, path, query or form) on `provider.requests`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

CLIENT_ID = "llm-service"
CLIENT_SECRET = "client-secret-for-tests"


class FakeOIDCProvider:
    def __init__(self, *, client_id: str = CLIENT_ID, client_secret: str = CLIENT_SECRET):
        self.client_id = client_id
        self.client_secret = client_secret
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = secrets.token_hex(8)
        self.claims: dict = {}
        self.tamper: str = ""
        self.requests: list[dict] = []
        self._codes: dict[str, dict] = {}
        self._tokens: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle
    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeOIDCProvider:
        provider = self

        class Handler(_Handler):
            pass

        Handler.provider = provider
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="fake-oidc")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(10)

    def reset(self) -> None:
        with self._lock:
            self.claims, self.tamper = {}, ""
            self.requests.clear()
            self._codes.clear()
            self._tokens.clear()

    # --- documents
    def discovery(self) -> dict:
        base = self.issuer
        return {
            "issuer": base,
            "authorization_endpoint": f"{base}/authorize",
            "token_endpoint": f"{base}/token",
            "userinfo_endpoint": f"{base}/userinfo",
            "jwks_uri": f"{base}/jwks",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "scopes_supported": ["openid", "email", "profile", "groups"],
            "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
            "code_challenge_methods_supported": ["S256"],
        }

    def jwks(self) -> dict:
        jwk = json.loads(RSAAlgorithm.to_jwk(self.key.public_key()))
        return {"keys": [{**jwk, "kid": self.kid, "alg": "RS256", "use": "sig"}]}

    def user_claims(self) -> dict:
        return {"sub": "user-1", **self.claims}

    def id_token(self, *, nonce: str | None, claims: dict) -> str:
        now = int(time.time())
        body = {"iss": self.issuer, "aud": self.client_id, "iat": now, "exp": now + 300, **claims}
        if nonce is not None:
            body["nonce"] = nonce
        key = self.key
        if self.tamper == "bad_signature":
            key = self.other_key
        elif self.tamper == "wrong_issuer":
            body["iss"] = "http://127.0.0.1:1/not-the-issuer"
        elif self.tamper == "wrong_nonce":
            body["nonce"] = "not-the-nonce"
        elif self.tamper == "wrong_audience":
            body["aud"] = "another-client"
        elif self.tamper == "expired":
            body["iat"], body["exp"] = now - 3600, now - 600
        return jwt.encode(body, key, algorithm="RS256", headers={"kid": self.kid})

    # --- endpoints (called by the handler)
    def authorize(self, query: dict) -> tuple[int, dict, bytes]:
        if query.get("client_id") != self.client_id or query.get("response_type") != "code":
            return 400, {}, b"bad client_id or response_type"
        code = secrets.token_urlsafe(16)
        with self._lock:
            self._codes[code] = {"nonce": query.get("nonce"), "redirect_uri": query["redirect_uri"],
                                 "claims": self.user_claims(),
                                 "code_challenge": query.get("code_challenge")}
        target = f"{query['redirect_uri']}?{urlencode({'code': code, 'state': query.get('state', '')})}"
        return 302, {"Location": target}, b""

    def token(self, form: dict, authorization: str) -> tuple[int, dict, bytes]:
        client_id, client_secret = form.get("client_id"), form.get("client_secret")
        if authorization.startswith("Basic "):
            client_id, _, client_secret = base64.b64decode(authorization[6:]).decode().partition(":")
        if client_id != self.client_id or client_secret != self.client_secret:
            return _json(401, {"error": "invalid_client"})
        with self._lock:
            grant = self._codes.pop(form.get("code", ""), None)
        if grant is None or form.get("grant_type") != "authorization_code":
            return _json(400, {"error": "invalid_grant"})
        if form.get("redirect_uri") != grant["redirect_uri"]:
            return _json(400, {"error": "invalid_grant", "error_description": "redirect_uri differs"})
        if grant["code_challenge"]:
            verifier = form.get("code_verifier", "")
            challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
            if challenge != grant["code_challenge"]:
                return _json(400, {"error": "invalid_grant", "error_description": "PKCE verifier differs"})
        access = secrets.token_urlsafe(24)
        with self._lock:
            self._tokens[access] = grant["claims"]
        id_claims = {k: v for k, v in grant["claims"].items()}
        return _json(200, {"access_token": access, "token_type": "Bearer", "expires_in": 300,
                           "id_token": self.id_token(nonce=grant["nonce"], claims=id_claims)})

    def userinfo(self, authorization: str) -> tuple[int, dict, bytes]:
        with self._lock:
            claims = self._tokens.get(authorization.removeprefix("Bearer "))
        if claims is None:
            return _json(401, {"error": "invalid_token"})
        return _json(200, claims)


def _json(status: int, body: dict) -> tuple[int, dict, bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(body).encode()


class _Handler(BaseHTTPRequestHandler):
    provider: FakeOIDCProvider

    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, headers: dict, body: bytes) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        p = self.provider
        p.requests.append({"method": "GET", "path": url.path, "params": query})
        if url.path == "/.well-known/openid-configuration":
            self._send(*_json(200, p.discovery()))
        elif url.path == "/jwks":
            self._send(*_json(200, p.jwks()))
        elif url.path == "/authorize":
            self._send(*p.authorize(query))
        elif url.path == "/userinfo":
            self._send(*p.userinfo(self.headers.get("Authorization", "")))
        else:
            self._send(404, {}, b"not found")

    def do_POST(self):  # noqa: N802
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
        p = self.provider
        p.requests.append({"method": "POST", "path": url.path, "params": {k: v for k, v in form.items()
                                                                            if k != "client_secret"}})
        if url.path == "/token":
            self._send(*p.token(form, self.headers.get("Authorization", "")))
        else:
            self._send(404, {}, b"not found")
