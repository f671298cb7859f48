"""Provider adapters; importing this package registers every kind."""

from . import anthropic, azure_openai, bedrock, gemini, mock, openai, openai_compatible, vertex  # noqa: F401
from .base import GATEWAY_USAGE, Completion, ProviderAdapter, ProviderError, Target, Usage, adapter_for

__all__ = ["GATEWAY_USAGE", "Completion", "ProviderAdapter", "ProviderError", "Target", "Usage", "adapter_for"]
