"""Outbound webhooks (apps/keys/outbound.py): only public destinations, checked on the address a
connection actually uses (so DNS rebinding fails), an operator allow-list for internal receivers,
and one timestamped signature that a receiver can verify and that cannot be replayed later.

DNS is mocked at the module's one seam (`outbound._resolve`); connections are real, to a receiver
on loopback, so a guard that failed would show up as a request the receiver got."""

from __future__ import annotations

import time

import httpx
import pytest

from apps.keys import outbound
from apps.keys.models import AuditLog, Tenant
from apps.keys.services import tenant_webhook_secret, tenant_webhook_secret_rotate
from tests import factories as f
from tests.billing.conftest import WebhookReceiver

PUBLIC = "93.184.216.34"


@pytest.fixture
def receiver():
    r = WebhookReceiver()
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


@pytest.fixture
def no_allow_list(settings):
    settings.WEBHOOK_ALLOWED_HOSTS = []


def port_of(receiver) -> int:
    return receiver.server.server_address[1]


def resolver(*answers):
    """A stand-in for DNS that gives each answer in turn (the last one for ever after)."""
    calls = []

    def resolve(host, port):
        calls.append(host)
        return list(answers[min(len(calls), len(answers)) - 1])

    resolve.calls = calls
    return resolve


FORBIDDEN = [
    "http://127.0.0.1/hook",
    "http://localhost/hook",
    "http://app.localhost/hook",
    "http://10.1.2.3/hook",
    "http://172.16.0.1/hook",
    "http://192.168.1.1/hook",
    "http://100.64.0.1/hook",           # shared address space (carrier NAT)
    "http://169.254.169.254/latest/meta-data/",
    "http://0.0.0.0/hook",
    "http://224.0.0.1/hook",            # multicast
    "http://240.0.0.1/hook",            # reserved
    "http://[::1]/hook",
    "http://[::]/hook",
    "http://[fe80::1]/hook",
    "http://[fd00::1]/hook",
    "http://[::ffff:127.0.0.1]/hook",
    "http://[::ffff:169.254.169.254]/hook",
    "http://[64:ff9b::a9fe:a9fe]/hook",  # NAT64 of 169.254.169.254
    "http://[2002:7f00:1::]/hook",       # 6to4 of 127.0.0.1
    "http://2130706433/hook",
    "http://0x7f000001/hook",
    "http://0177.0.0.1/hook",
    "http://127.1/hook",
    "http://0/hook",
]


@pytest.mark.usefixtures("no_allow_list")
@pytest.mark.parametrize("url", FORBIDDEN)
def test_forbidden_destinations_are_refused_when_configured(url):
    with pytest.raises(outbound.DestinationRefused):
        outbound.url_check(url, resolve=False)


@pytest.mark.usefixtures("no_allow_list")
@pytest.mark.parametrize("url", [u for u in FORBIDDEN if "localhost" not in u])
def test_forbidden_addresses_are_refused_at_connect_time_too(url, monkeypatch):
    """The transport refuses by itself, whatever check came before (none here)."""
    monkeypatch.setattr(outbound, "_resolve", resolver([PUBLIC]))  # never asked: these are literals
    try:
        with outbound.client(timeout=2) as http:
            http.post(url, content=b"{}")
    except outbound.DestinationRefused:
        return
    except httpx.InvalidURL:  # httpx itself rejects some notations (0177.0.0.1): no request either
        return
    pytest.fail(f"{url} was fetched")


@pytest.mark.usefixtures("no_allow_list")
@pytest.mark.parametrize("url", ["ftp://example.com/x", "file:///etc/passwd", "gopher://example.com/", "example.com",
                                 "http:///nohost", "http://exa mple.com/", "http://1.2.3.4.5/"])
def test_other_schemes_and_malformed_urls_are_refused(url):
    with pytest.raises(outbound.DestinationRefused):
        outbound.url_check(url, resolve=True)


@pytest.mark.usefixtures("no_allow_list")
def test_a_name_that_resolves_to_loopback_is_refused_on_configuration_and_on_delivery(receiver, monkeypatch):
    monkeypatch.setattr(outbound, "_resolve", resolver(["127.0.0.1"]))
    url = f"http://hooks.example.test:{port_of(receiver)}/hook"

    with pytest.raises(outbound.DestinationRefused) as refused:
        outbound.url_check(url)
    with pytest.raises(outbound.DestinationRefused):
        outbound.post(url, body=b"{}", headers={}, timeout=2)

    assert receiver.requests == []
    assert "127.0.0.1" not in str(refused.value)  # what a name resolves to is not told to whoever typed it


@pytest.mark.usefixtures("no_allow_list")
def test_a_name_with_one_private_address_among_public_ones_is_refused(monkeypatch):
    monkeypatch.setattr(outbound, "_resolve", resolver([PUBLIC, "10.0.0.7"]))

    with pytest.raises(outbound.DestinationRefused):
        outbound.url_check("https://hooks.example.test/alerts")


@pytest.mark.usefixtures("no_allow_list")
def test_a_public_name_is_accepted(monkeypatch):
    monkeypatch.setattr(outbound, "_resolve", resolver([PUBLIC, "2606:2800:220:1:248:1893:25c8:1946"]))

    outbound.url_check("https://hooks.example.test/alerts")
    outbound.url_check("http://8.8.8.8:8080/alerts")


@pytest.mark.usefixtures("no_allow_list")
def test_dns_rebinding_is_caught_where_the_socket_opens(receiver, monkeypatch):
    """Public when the URL is configured, loopback when the delivery connects: refused, and the
    loopback receiver (which would have answered) gets nothing."""
    rebinding = resolver([PUBLIC], ["127.0.0.1"])
    monkeypatch.setattr(outbound, "_resolve", rebinding)
    url = f"http://rebind.example.test:{port_of(receiver)}/hook"

    outbound.url_check(url)  # configuration time: looks public
    with pytest.raises(outbound.DestinationRefused):
        outbound.post(url, body=b"{}", headers={}, timeout=2)

    assert rebinding.calls == ["rebind.example.test", "rebind.example.test"]
    assert receiver.requests == []


def test_the_allow_list_lets_a_loopback_receiver_through(receiver, settings):
    settings.WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]

    outbound.url_check(receiver.url)
    resp = outbound.post(receiver.url, body=b'{"a":1}', headers={"x-test": "1"}, timeout=5)

    assert resp.status_code == 200
    assert receiver.requests[0]["body"] == b'{"a":1}'


def test_an_allowed_name_connects_to_its_checked_address_with_its_own_host_header(receiver, settings, monkeypatch):
    settings.WEBHOOK_ALLOWED_HOSTS = ["hooks.internal"]
    monkeypatch.setattr(outbound, "_resolve", resolver(["127.0.0.1"]))
    url = f"http://hooks.internal:{port_of(receiver)}/alerts"

    resp = outbound.post(url, body=b"{}", headers={}, timeout=5)

    assert resp.status_code == 200
    assert receiver.requests[0]["headers"]["host"] == f"hooks.internal:{port_of(receiver)}"
    with pytest.raises(outbound.DestinationRefused):  # the allow-list names hosts exactly
        outbound.url_check(f"http://other.internal:{port_of(receiver)}/alerts")


def test_an_allowed_network_lets_its_addresses_through(receiver, settings):
    settings.WEBHOOK_ALLOWED_HOSTS = ["10.0.0.0/8", "127.0.0.0/8"]

    assert outbound.post(receiver.url, body=b"{}", headers={}, timeout=5).status_code == 200
    outbound.url_check("http://10.20.30.40/hook")
    with pytest.raises(outbound.DestinationRefused):
        outbound.url_check("http://192.168.0.1/hook")


def test_redirects_are_not_followed(receiver, settings):
    settings.WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]
    receiver.statuses.append(307)

    resp = outbound.post(receiver.url, body=b"{}", headers={}, timeout=5)

    assert resp.status_code == 307
    assert len(receiver.requests) == 1


# --- signatures -------------------------------------------------------------------------------


def test_a_signature_verifies_and_a_changed_body_or_secret_does_not():
    body = b'{"alert":{"id":1}}'
    header = outbound.signature_header(body=body, secret="whsec_a")

    assert outbound.signature_verify(header=header, body=body, secret="whsec_a")
    assert not outbound.signature_verify(header=header, body=body + b" ", secret="whsec_a")
    assert not outbound.signature_verify(header=header, body=body, secret="whsec_b")
    assert not outbound.signature_verify(header="v1=" + header.split("v1=")[1], body=body, secret="whsec_a")
    assert not outbound.signature_verify(header="", body=body, secret="whsec_a")


def test_a_replayed_delivery_with_an_old_timestamp_is_rejected():
    body = b'{"id":"req_1"}'
    old = int(time.time()) - outbound.SIGNATURE_TOLERANCE_S - 1
    header = outbound.signature_header(body=body, secret="whsec_a", timestamp=old)

    assert not outbound.signature_verify(header=header, body=body, secret="whsec_a")
    assert outbound.signature_verify(header=header, body=body, secret="whsec_a", now=old + 10)
    # Moving the timestamp forward breaks the signature: it signs "<t>.<body>".
    forged = header.replace(f"t={old}", f"t={int(time.time())}")
    assert not outbound.signature_verify(header=forged, body=body, secret="whsec_a")


@pytest.mark.django_db
def test_each_tenant_gets_its_own_secret_stored_encrypted():
    acme, globex = f.TenantFactory(), f.TenantFactory()

    first = tenant_webhook_secret(tenant_id=acme.pk)

    assert first.startswith("whsec_")
    assert tenant_webhook_secret(tenant_id=acme.pk) == first  # made once, then the same
    assert tenant_webhook_secret(tenant_id=globex.pk) != first
    stored = Tenant.objects.values_list("webhook_secret_encrypted", flat=True).get(pk=acme.pk)
    assert stored and first not in stored


@pytest.mark.django_db
def test_rotating_the_secret_invalidates_old_signatures_and_is_audited_without_the_secret():
    tenant = f.TenantFactory()
    old = tenant_webhook_secret(tenant_id=tenant.pk)
    header = outbound.signature_header(body=b"{}", secret=old)

    new = tenant_webhook_secret_rotate(tenant=tenant, actor="ada", via="api")

    assert new != old and tenant_webhook_secret(tenant_id=tenant.pk) == new
    assert not outbound.signature_verify(header=header, body=b"{}", secret=new)
    entry = AuditLog.objects.get(action="rotate_webhook_secret", tenant=tenant)
    assert new not in str(entry.before) + str(entry.after)
