"""The OpenAI and Azure OpenAI adapters against fakes of their wire formats."""

import pytest

from apps.gateway.providers import ProviderError, Target, adapter_for

BODY = {"model": "ignored", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 20}


async def test_openai_sends_bearer_and_org_project_headers(upstream):
    t = Target(kind="openai", api_base=upstream.base_url, upstream_model="gpt-4o-mini", secret="sk-openai",
               options={"organization": "org-1", "project": "proj-1"})
    completion = await adapter_for("openai").complete(t, {**BODY, "model": "gpt-4o-mini"})

    sent = upstream.requests[-1]
    assert sent["path"] == "/v1/chat/completions"
    assert sent["headers"]["Authorization"] == "Bearer sk-openai"
    assert (sent["headers"]["openai-organization"], sent["headers"]["openai-project"]) == ("org-1", "proj-1")
    assert completion.body["choices"][0]["message"]["content"] == "Echo: hello"


def azure(server, deployment="my-gpt4o", **options):
    return Target(kind="azure_openai", api_base=server.base_url, upstream_model=deployment, secret="az-key",
                  options=options)


async def test_azure_puts_deployment_in_path_version_in_query_key_in_header(azure_upstream):
    completion = await adapter_for("azure_openai").complete(azure(azure_upstream, api_version="2024-06-01"), BODY)

    sent = azure_upstream.requests[-1]
    assert sent["path"] == "/openai/deployments/my-gpt4o/chat/completions"
    assert sent["query"] == {"api-version": "2024-06-01"}
    assert sent["headers"]["api-key"] == "az-key"
    assert "Authorization" not in sent["headers"]
    assert "model" not in sent["body"]
    assert sent["body"]["max_tokens"] == 20
    assert completion.body["choices"][0]["message"]["content"] == "Echo: hello"


async def test_azure_default_api_version_and_stream_drops_prompt_filter_chunk(azure_upstream):
    chunks = [c async for c in adapter_for("azure_openai").stream(azure(azure_upstream), {**BODY, "stream": True})]

    sent = azure_upstream.requests[-1]
    assert sent["query"] == {"api-version": "2024-10-21"}
    assert sent["body"]["stream_options"] == {"include_usage": True}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["usage"]["completion_tokens"] == 2


async def test_azure_embeddings(azure_upstream):
    completion = await adapter_for("azure_openai").embed(azure(azure_upstream, deployment="emb"),
                                                         {"model": "x", "input": ["a", "b"]})

    assert azure_upstream.requests[-1]["path"] == "/openai/deployments/emb/embeddings"
    assert len(completion.body["data"]) == 2
    assert completion.usage.prompt_tokens == 2


async def test_azure_error_body_maps(azure_upstream):
    with pytest.raises(ProviderError) as exc:
        await adapter_for("azure_openai").complete(azure(azure_upstream, deployment="fail-429"), BODY)

    assert exc.value.status == 429
    assert exc.value.retryable
    assert exc.value.retry_after == 0
