"""An alias's capabilities (chat, embeddings) are inferred from its models when not set by hand."""

from __future__ import annotations

import logging
from decimal import Decimal

import openai
import pytest

from apps.gateway.capabilities import model_is_embedding
from apps.gateway.selectors import routing_table_load
from tests import factories as f

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(("name", "expected"), [
    ("text-embedding-3-small", True),    # genai-prices: priced for input only
    ("gemini-embedding-001", True),
    ("gpt-4o-mini", False),              # genai-prices: priced for output too
    ("nomic-embed-text", True),          # by name
    ("embed-english-v3.0", True),
    ("mock-embedding", True),
    ("house-model-7b", None),            # unknown: the defaults apply
    ("embedded-systems-expert", None),
])
def test_model_is_embedding(name, expected):
    assert model_is_embedding(name) is expected


def alias_to(upstream_model: str, alias: str, **flags):
    mock = f.ProviderFactory(name=f"mock-{alias}", kind="mock")
    model_alias = f.ModelAliasFactory(alias=alias, **flags)
    f.DeploymentFactory(alias=model_alias, provider=mock, upstream_model=upstream_model)
    f.PriceFactory(model=alias, input_usd_per_mtok=Decimal("0.02"), output_usd_per_mtok=Decimal("0"))
    return model_alias


def test_routing_table_infers_capabilities_and_explicit_values_win():
    alias_to("text-embedding-3-small", "emb")
    alias_to("gpt-4o-mini", "chat")
    alias_to("text-embedding-3-small", "forced", supports_embeddings=False, supports_chat=True)
    table = routing_table_load()
    assert (table.aliases["emb"].supports_embeddings, table.aliases["emb"].supports_chat) == (True, False)
    assert (table.aliases["chat"].supports_embeddings, table.aliases["chat"].supports_chat) == (False, True)
    assert (table.aliases["forced"].supports_embeddings, table.aliases["forced"].supports_chat) == (False, True)


def test_embeddings_work_without_the_flag_and_a_chat_model_error_names_the_setting_only_in_the_log(
        live_gateway, caplog):
    alias_to("text-embedding-3-small", "my-embedder")
    alias_to("gpt-4o-mini", "my-chat")
    key = f.ApiKeyFactory()
    client = openai.OpenAI(base_url=f"{live_gateway}/v1", api_key=key.secret, max_retries=0)

    assert client.embeddings.create(model="my-embedder", input="hello").data

    with caplog.at_level(logging.WARNING, logger="apps.gateway.pipeline"), \
            pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="my-chat", input="hello")
    body = err.value.body
    assert body["code"] == "model_not_embedding"
    assert "supports_embeddings" not in body["message"]
    assert any("my-chat" in r.getMessage() and "supports_embeddings: true" in r.getMessage() for r in caplog.records)


def test_admin_shows_effective_capabilities(admin_client):
    alias_to("text-embedding-3-small", "emb-admin")
    page = admin_client.get("/admin/gateway/modelalias/").content.decode()
    assert "yes (inferred)" in page and "no (inferred)" in page
