"""apps/gateway/h1.py, the lean HTTP/1.1 client of non-streaming upstream calls, against raw servers
on loopback that answer the way real ones can: keep-alive, chunked, until close, cut short, silent,
malformed, over TLS."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from apps.gateway import h1
from apps.gateway.providers.base import ProviderError
from apps.gateway.providers.transport import post_json

OK = b'{"ok":true}'


class RawServer:
    """A TCP server on 127.0.0.1 whose `answer(request, reader, writer)` writes what the test wants.
    Keeps the requests it read and counts connections."""

    def __init__(self, answer, tls: ssl.SSLContext | None = None):
        self.answer, self.tls = answer, tls
        self.requests: list[bytes] = []
        self.connections = 0
        self.ended = asyncio.Event()  # a connection's reader saw the client's end

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/v1/chat/completions"
        return self

    async def __aexit__(self, *exc):
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.ended.set()
                    return
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                if await self.answer(request, reader, writer) == "close":
                    writer.close()
                    return
        except ConnectionError:
            self.ended.set()


def answered(body: bytes = OK, *, status: bytes = b"200 OK", extra: bytes = b""):
    async def answer(request, reader, writer):
        writer.write(b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s"
                     % (status, len(body), extra, body))
        await writer.drain()
    return answer


def client(**kw) -> h1.Client:
    return h1.Client(**{"connect_timeout": 2.0, "read_timeout": 5.0, **kw})


async def _until_no_open_idle(c: h1.Client, server: RawServer) -> None:
    """Let the client's loop turn until it has read what the server last did to its idle connection
    (none pooled at all when it came in the same read as the answer)."""
    idle = c.idle.get(("http", "127.0.0.1", server.port), [])
    for _ in range(100):
        if not any(conn.open for conn in idle):
            return
        await asyncio.sleep(0)


async def test_answers_come_back_whole_over_one_kept_alive_connection():
    async with RawServer(answered(extra=b"Retry-After: 7\r\n")) as server:
        c = client()
        first = await c.post(server.url, headers={"authorization": "Bearer up"}, content=b'{"a":1}',
                             params={"api-version": "2024-10-21"})
        second = await c.post(server.url, headers={}, content=b"{}")

    assert (first.status, first.content, first.headers["retry-after"]) == (200, OK, "7")
    assert second.content == OK
    assert server.connections == 1
    head = server.requests[0].decode()
    assert head.startswith("POST /v1/chat/completions?api-version=2024-10-21 HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{server.port}\r\n" in head
    assert "authorization: Bearer up\r\n" in head
    assert "Content-Length: 7\r\n" in head and head.endswith('\r\n\r\n{"a":1}')


async def test_a_chunked_answer_is_put_together():
    async def chunked(request, reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for part in (b'{"ok":', b"true}"):
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
        writer.write(b"0\r\n\r\n")

    async with RawServer(chunked) as server:
        c = client()
        assert (await c.post(server.url, headers={}, content=b"{}")).content == OK
        assert (await c.post(server.url, headers={}, content=b"{}")).content == OK
    assert server.connections == 1


async def test_an_answer_that_runs_until_close_is_whole_and_its_connection_is_not_reused():
    async def until_close(request, reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n" + OK)
        await writer.drain()
        return "close"

    async with RawServer(until_close) as server:
        c = client()
        assert (await c.post(server.url, headers={}, content=b"{}")).content == OK
        assert (await c.post(server.url, headers={}, content=b"{}")).content == OK
    assert server.connections == 2


async def test_connection_close_from_the_server_is_honoured():
    async with RawServer(answered(extra=b"Connection: close\r\n")) as server:
        c = client()
        await c.post(server.url, headers={}, content=b"{}")
        await c.post(server.url, headers={}, content=b"{}")
    assert server.connections == 2


async def test_a_connection_the_server_closed_while_idle_is_not_taken_again():
    closed = asyncio.Event()

    async def answer_then_hang_up(request, reader, writer):
        await answered()(request, reader, writer)
        if len(server.requests) == 1:
            writer.close()
            await writer.wait_closed()
            closed.set()
            return "close"

    async with RawServer(answer_then_hang_up) as server:
        c = client()
        await c.post(server.url, headers={}, content=b"{}")
        await closed.wait()
        await _until_no_open_idle(c, server)
        assert (await c.post(server.url, headers={}, content=b"{}")).content == OK
    assert server.connections == 2


async def test_a_connection_whose_server_spoke_out_of_turn_is_not_taken_again():
    spoke = asyncio.Event()

    async def answer_then_more(request, reader, writer):
        await answered()(request, reader, writer)
        if len(server.requests) == 1:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")  # nobody asked
            await writer.drain()
            spoke.set()

    async with RawServer(answer_then_more) as server:
        c = client()
        await c.post(server.url, headers={}, content=b"{}")
        await spoke.wait()
        await _until_no_open_idle(c, server)
        assert (await c.post(server.url, headers={}, content=b"{}")).content == OK
    assert server.connections == 2


async def test_the_read_timeout_counts_from_the_last_byte_received():
    async def slow_but_steady(request, reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(OK))
        for byte in OK[:3]:
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.write(bytes([byte]))
        writer.write(OK[3:])

    async with RawServer(slow_but_steady) as server:
        response = await client(read_timeout=0.25).post(server.url, headers={}, content=b"{}")
    assert response.content == OK


async def test_silence_past_the_read_timeout_fails_and_drops_the_connection():
    async def silent(request, reader, writer):
        await reader.read()  # until the client gives up
        server.ended.set()
        return "close"

    async with RawServer(silent) as server:
        c = client(read_timeout=0.1)
        with pytest.raises(h1.UpstreamTimeout):
            await c.post(server.url, headers={}, content=b"{}")
        await asyncio.wait_for(server.ended.wait(), 5)
    assert not c.idle.get(("http", "127.0.0.1", server.port))


async def test_an_answer_cut_short_or_malformed_is_a_connection_error():
    async def cut(request, reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + OK)
        return "close"

    async def garbage(request, reader, writer):
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()

    for answer in (cut, garbage):
        async with RawServer(answer) as server:
            with pytest.raises(h1.UpstreamConnectionError):
                await client().post(server.url, headers={}, content=b"{}")


async def test_an_interim_100_continue_is_skipped():
    async def continue_first(request, reader, writer):
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await answered()(request, reader, writer)

    async with RawServer(continue_first) as server:
        response = await client().post(server.url, headers={}, content=b"{}")
    assert (response.status, response.content) == (200, OK)


async def test_a_refused_connection_is_a_connection_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(h1.UpstreamConnectionError):
        await client().post(f"http://127.0.0.1:{port}/v1", headers={}, content=b"{}")


async def test_a_header_with_a_line_break_is_refused_before_anything_is_sent():
    async with RawServer(answered()) as server:
        with pytest.raises(ValueError, match="line break"):
            await client().post(server.url, headers={"x-a": "b\r\nx-injected: 1"}, content=b"{}")
    assert server.connections == 0


async def test_a_cancelled_call_closes_its_connection():
    started = asyncio.Event()

    async def hold(request, reader, writer):
        started.set()
        await reader.read()
        server.ended.set()
        return "close"

    async with RawServer(hold) as server:
        c = client()
        call = asyncio.ensure_future(c.post(server.url, headers={}, content=b"{}"))
        await started.wait()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await asyncio.wait_for(server.ended.wait(), 5)  # the server saw the connection end
    assert not c.idle.get(("http", "127.0.0.1", server.port))


def _self_signed(tmp_path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = tmp_path / "cert.pem"
    key_pem = tmp_path / "key.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_pem, key_pem)
    return server, ssl.create_default_context(cafile=str(cert_pem))


async def test_tls_answers_with_a_trusted_certificate_and_refuses_an_untrusted_one(tmp_path):
    server_tls, trusting = _self_signed(tmp_path)
    async with RawServer(answered(), tls=server_tls) as server:
        assert (await client(ssl_context=trusting).post(server.url, headers={}, content=b"{}")).content == OK
        with pytest.raises(h1.UpstreamConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            await client().post(server.url, headers={}, content=b"{}")  # the system's trust store


async def test_post_json_maps_the_clients_failures_to_provider_errors(settings):
    settings.GATEWAY_HTTP_TRANSPORT = "native"
    settings.GATEWAY_UPSTREAM_READ_TIMEOUT_S = 0.1

    async def silent(request, reader, writer):
        await reader.read()
        return "close"

    async with RawServer(silent) as server:
        with pytest.raises(ProviderError) as timed_out:
            await post_json(server.url, headers={}, body={})
    with pytest.raises(ProviderError) as refused:
        await post_json(server.url, headers={}, body={})  # the server is gone

    assert (timed_out.value.code, timed_out.value.status, timed_out.value.retryable) == ("upstream_timeout", 504, True)
    assert (refused.value.code, refused.value.status, refused.value.retryable) == ("upstream_unreachable", 502, True)
