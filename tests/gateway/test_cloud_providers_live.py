"""Cloud deployments (AWS Bedrock; Gemini and Claude on Vertex AI) through a live gateway, as a new
user would try them: the OpenAI SDK (chat, stream), the anthropic SDK (/v1/messages, stream) and
the Responses API, each call signed or authenticated, answered and in the ledger with its cost."""

from decimal import Decimal

import anthropic
import openai
import orjson
import pytest

from apps.analytics.models import UsageEvent
from apps.keys import crypto
from tests import factories as f
from tests.fakes import bedrock_server

CLOUDS = ["bedrock", "vertex-gemini", "vertex-claude"]


@pytest.fixture(params=CLOUDS)
def cloud(request, live_gateway, bedrock_upstream, vertex_upstream):
    """A model alias `m` routed to the cloud deployment, and a key for it."""
    if request.param == "bedrock":
        secret = orjson.dumps({"aws_access_key_id": bedrock_server.ACCESS_KEY,
                               "aws_secret_access_key": bedrock_server.SECRET_KEY,
                               "aws_session_token": bedrock_server.SESSION_TOKEN}).decode()
        kind, base, model, region = ("bedrock", bedrock_upstream.base_url, "anthropic.claude-3-haiku-20240307-v1:0",
                                     bedrock_server.REGION)
    else:
        secret = orjson.dumps(vertex_upstream.service_account_info()).decode()
        model = "gemini-2.0-flash" if request.param == "vertex-gemini" else "claude-3-5-haiku@20241022"
        kind, base, region = "vertex", vertex_upstream.base_url, "europe-west4"
    provider = f.ProviderFactory(name=f"p-{request.param}", kind=kind, api_base=base,
                                 credential=f.ProviderCredentialFactory(encrypted_secret=crypto.encrypt(secret)))
    alias = f.ModelAliasFactory(alias="m")
    f.DeploymentFactory(alias=alias, provider=provider, upstream_model=model, region=region)
    f.PriceFactory(model="m", input_usd_per_mtok=Decimal("1"), output_usd_per_mtok=Decimal("2"))
    return request.param, f.ApiKeyFactory()


def test_openai_sdk_chat_and_stream(live_gateway, cloud):
    name, key = cloud
    client = openai.OpenAI(base_url=f"{live_gateway}/v1", api_key=key.secret, max_retries=0)

    resp = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello"}])
    chunks = list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "one two"}],
                                                 stream=True, stream_options={"include_usage": True}))

    assert resp.choices[0].message.content == "Echo: hello"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Echo: one two"
    rows = list(UsageEvent.objects.order_by("timestamp"))
    assert [(r.provider, r.status, r.estimated) for r in rows] == [(f"p-{name}", 200, False)] * 2
    assert all(r.cost > 0 for r in rows)
    assert rows[1].completion_tokens == chunks[-1].usage.completion_tokens


def test_anthropic_sdk_and_responses_api(live_gateway, cloud):
    name, key = cloud
    an = anthropic.Anthropic(base_url=live_gateway, api_key=key.secret, max_retries=0)
    oa = openai.OpenAI(base_url=f"{live_gateway}/v1", api_key=key.secret, max_retries=0)

    msg = an.messages.create(model="m", max_tokens=20, messages=[{"role": "user", "content": "hi"}])
    with an.messages.stream(model="m", max_tokens=20, messages=[{"role": "user", "content": "hi"}]) as stream:
        final = stream.get_final_message()
    resp = oa.responses.create(model="m", input="hi")
    with oa.responses.stream(model="m", input="hi") as rstream:
        rfinal = rstream.get_final_response()

    assert msg.content[0].text == final.content[0].text == resp.output_text == rfinal.output_text == "Echo: hi"
    rows = list(UsageEvent.objects.order_by("timestamp").values_list("request_type", "provider", "status", "cost"))
    assert [r[:3] for r in rows] == [("messages", f"p-{name}", 200)] * 2 + [("responses", f"p-{name}", 200)] * 2
    assert all(r[3] > 0 for r in rows)
