"""Secrets: API key digests (HMAC-SHA256, never the key itself) and Fernet encryption at rest."""

import hashlib
import hmac
import secrets
from functools import lru_cache

from cryptography.fernet import Fernet, MultiFernet
from django.conf import settings

API_KEY_PREFIX = "sk-"
DISPLAY_PREFIX_LEN = 10


def api_key_generate() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


MANAGEMENT_TOKEN_PREFIX = "llmt_"


def management_token_generate() -> str:
    """A management API token (/api/); digested like API keys, its own prefix tells them apart."""
    return MANAGEMENT_TOKEN_PREFIX + secrets.token_urlsafe(32)


def api_key_digest(secret: str) -> str:
    return hmac.new(settings.API_KEY_HMAC_SECRET.encode(), secret.encode(), hashlib.sha256).hexdigest()


def api_key_display_prefix(secret: str) -> str:
    return secret[:DISPLAY_PREFIX_LEN]


@lru_cache(maxsize=1)
def _fernet() -> MultiFernet:
    return MultiFernet([Fernet(k.encode() if isinstance(k, str) else k) for k in settings.FERNET_KEYS])


def encrypt(plaintext: str) -> str:
    return _fernet().encrypt(plaintext.encode()).decode()


def decrypt(token: str) -> str:
    return _fernet().decrypt(token.encode()).decode()
