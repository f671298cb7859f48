"""A Bedrock deployment through a live gateway: the OpenAI SDK (chat, stream), the anthropic SDK
(/v1/messages) and the Responses API, every call signed, answered and in the ledger with its cost."""

from decimal import Decimal

import anthropic
import openai
import orjson
import pytest

from apps.analytics.models import UsageEvent
from apps.keys import crypto
from tests import factories as f
from tests.fakes import bedrock_server as fake


@pytest.fixture
def key(live_gateway, bedrock_upstream):
    secret = orjson.dumps({"aws_access_key_id": fake.ACCESS_KEY, "aws_secret_access_key": fake.SECRET_KEY,
                           "aws_session_token": fake.SESSION_TOKEN}).decode()
    provider = f.ProviderFactory(name="p-bedrock", kind="bedrock", api_base=bedrock_upstream.base_url,
                                 credential=f.ProviderCredentialFactory(encrypted_secret=crypto.encrypt(secret)))
    alias = f.ModelAliasFactory(alias="m")
    f.DeploymentFactory(alias=alias, provider=provider, upstream_model="anthropic.claude-3-haiku-20240307-v1:0",
                        region=fake.REGION)
    f.PriceFactory(model="m", input_usd_per_mtok=Decimal("1"), output_usd_per_mtok=Decimal("2"))
    return f.ApiKeyFactory()


def test_openai_sdk_chat_and_stream(live_gateway, key):
    client = openai.OpenAI(base_url=f"{live_gateway}/v1", api_key=key.secret, max_retries=0)

    resp = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello"}])
    chunks = list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "one two"}],
                                                 stream=True, stream_options={"include_usage": True}))

    assert resp.choices[0].message.content == "Echo: hello"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Echo: one two"
    rows = list(UsageEvent.objects.order_by("timestamp"))
    assert [(r.provider, r.status, r.estimated) for r in rows] == [("p-bedrock", 200, False)] * 2
    assert all(r.cost > 0 for r in rows)
    assert rows[1].completion_tokens == chunks[-1].usage.completion_tokens


def test_anthropic_sdk_and_responses_api(live_gateway, key):
    an = anthropic.Anthropic(base_url=live_gateway, api_key=key.secret, max_retries=0)
    oa = openai.OpenAI(base_url=f"{live_gateway}/v1", api_key=key.secret, max_retries=0)

    msg = an.messages.create(model="m", max_tokens=20, messages=[{"role": "user", "content": "hi"}])
    with an.messages.stream(model="m", max_tokens=20, messages=[{"role": "user", "content": "hi"}]) as stream:
        final = stream.get_final_message()
    resp = oa.responses.create(model="m", input="hi")

    assert msg.content[0].text == final.content[0].text == resp.output_text == "Echo: hi"
    rows = list(UsageEvent.objects.order_by("timestamp").values_list("request_type", "provider", "cost"))
    assert [r[:2] for r in rows] == [("messages", "p-bedrock"), ("messages", "p-bedrock"),
                                     ("responses", "p-bedrock")]
    assert len({r[2] for r in rows}) == 1 and rows[0][2] > 0
