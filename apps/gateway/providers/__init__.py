"""Provider adapters; importing this package registers every kind."""

from . import mock, openai_compatible  # noqa: F401
from .base import Completion, ProviderAdapter, ProviderError, Target, Usage, adapter_for

__all__ = ["Completion", "ProviderAdapter", "ProviderError", "Target", "Usage", "adapter_for"]
