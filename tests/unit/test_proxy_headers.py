"""Metadata pass-through: which headers cross, and what the pod gets when the node IMDS fails.

``_strip`` is pure.  ``MetadataProxy.forward`` runs against a tiny aiohttp server on
127.0.0.1 (an ephemeral port) standing in for the node IMDS.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from nmi.imds.messages import Reply, Request, encode
from nmi.imds.proxy import MAX_BODY, MetadataProxy, _strip

WAIT = 2.0


# -- _strip ---------------------------------------------------------------------------------


def test_strip_removes_hop_by_hop_host_and_content_length_and_keeps_the_rest_in_order() -> None:
    headers = [
        ("Host", "169.254.169.254"),
        ("Metadata", "true"),
        ("Connection", "keep-alive"),
        ("Keep-Alive", "timeout=5"),
        ("x-ms-client-request-id", "r-1"),
        ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
        ("Proxy-Authenticate", "Basic"),
        ("TE", "trailers"),
        ("Trailer", "Expires"),
        ("Trailers", "Expires"),
        ("Transfer-Encoding", "chunked"),
        ("Upgrade", "h2c"),
        ("Content-Length", "12"),
        ("Accept", "application/json"),
        ("metadata", "true"),  # repeated headers stay repeated
    ]
    assert _strip(headers) == [
        ("Metadata", "true"),
        ("x-ms-client-request-id", "r-1"),
        ("Accept", "application/json"),
        ("metadata", "true"),
    ]


def test_strip_removes_headers_named_in_connection_whatever_their_case() -> None:
    headers = [
        ("connection", " X-Trace ,x-DEBUG,  close"),
        ("x-trace", "1"),
        ("X-Debug", "on"),
        ("X-Kept", "yes"),
    ]
    assert _strip(headers) == [("X-Kept", "yes")]


def test_strip_drops_the_extra_names_and_reads_any_iterable_once() -> None:
    headers = iter([("Date", "Mon"), ("Server", "IMDS"), ("Content-Type", "text/plain")])
    assert _strip(headers, frozenset({"date", "server"})) == [("Content-Type", "text/plain")]
    assert _strip([]) == []


# -- forward ----------------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    raw_path: str
    raw_headers: list[tuple[str, str]]
    body: bytes


@dataclass
class NodeImds:
    """The stand-in node IMDS: records requests, answers with ``respond``."""

    endpoint: str = ""
    seen: list[Seen] = field(default_factory=list)
    respond: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None
    handlers: list[asyncio.Task[object]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.append(task)
        self.seen.append(
            Seen(
                request.method,
                request.raw_path,
                [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers],
                await request.read(),
            )
        )
        if self.respond is not None:
            return await self.respond(request)
        return web.json_response({"compute": {"name": "vm-1"}})


@pytest.fixture
async def node_imds() -> AsyncIterator[NodeImds]:
    imds = NodeImds()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", imds.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    imds.endpoint = f"http://{host}:{port}"
    try:
        yield imds
    finally:
        for task in imds.handlers:
            task.cancel()
        await runner.cleanup()


async def started(endpoint: str, timeout: float = WAIT) -> MetadataProxy:
    proxy = MetadataProxy(endpoint=endpoint + "/", timeout=timeout)
    await proxy.start()
    return proxy


@pytest.fixture
async def proxy(node_imds: NodeImds) -> AsyncIterator[MetadataProxy]:
    proxy = await started(node_imds.endpoint)
    try:
        yield proxy
    finally:
        await proxy.close()


def pod_request(
    method: str = "GET", headers: list[tuple[str, str]] | None = None, body: bytes = b""
) -> Request:
    return Request(
        method=method,
        target="(the listener's raw target; forward is given the checked one)",
        headers=headers if headers is not None else [("metadata", "true")],
        peer_ip="10.244.1.7",
        body=body,
    )


def error_of(reply: Reply) -> str:
    doc = json.loads(reply.body)
    return str(doc["error"])


async def within(awaitable: Awaitable[Reply]) -> Reply:
    async with asyncio.timeout(WAIT):
        return await awaitable


TARGET = "/metadata/instance/compute?api-version=2021-02-01&format=json&x=a%26b%3Dc%2Bd"


async def test_method_path_and_query_arrive_as_given_with_only_the_pods_headers(
    node_imds: NodeImds, proxy: MetadataProxy
) -> None:
    headers = [
        ("host", "169.254.169.254"),
        ("metadata", "true"),
        ("connection", "keep-alive, x-hop"),
        ("x-hop", "1"),
        ("x-ms-client-request-id", "r-1"),
    ]
    reply = await within(proxy.forward(pod_request(headers=headers), TARGET))
    assert reply.status == 200
    (seen,) = node_imds.seen
    assert (seen.method, seen.raw_path) == ("GET", TARGET)
    host_port = node_imds.endpoint.removeprefix("http://")
    assert seen.raw_headers == [
        ("Host", host_port),
        ("metadata", "true"),
        ("x-ms-client-request-id", "r-1"),
    ]


async def test_no_forwarding_headers_are_added(node_imds: NodeImds, proxy: MetadataProxy) -> None:
    await within(proxy.forward(pod_request(), "/metadata/instance?api-version=2021-02-01"))
    (seen,) = node_imds.seen
    names = {k.lower() for k, _ in seen.raw_headers}
    assert not names & {"x-forwarded-for", "forwarded", "x-real-ip", "via"}
    assert not any("10.244.1.7" in v for _, v in seen.raw_headers)


async def test_a_body_and_other_methods_pass_with_a_content_length_of_their_own(
    node_imds: NodeImds, proxy: MetadataProxy
) -> None:
    payload = b'{"nonce":"1234567890"}'
    request = pod_request("POST", [("metadata", "true"), ("content-length", "999")], payload)
    reply = await within(proxy.forward(request, "/metadata/attested/document?api-version=x"))
    assert reply.status == 200
    (seen,) = node_imds.seen
    assert (seen.method, seen.body) == ("POST", payload)
    lengths = [v for k, v in seen.raw_headers if k.lower() == "content-length"]
    assert lengths == [str(len(payload))]  # the pod's (wrong) one was not passed on


async def test_the_answer_keeps_its_status_body_and_headers_but_not_date_or_server(
    node_imds: NodeImds, proxy: MetadataProxy
) -> None:
    async def respond(request: web.Request) -> web.StreamResponse:
        return web.Response(
            status=404,
            body=b'{"error":"Not found"}',
            headers={"Content-Type": "application/json; charset=utf-8", "X-Ms-Version": "7"},
        )

    node_imds.respond = respond
    reply = await within(proxy.forward(pod_request(), "/metadata/instance/nothing?api-version=1"))
    assert (reply.status, reply.body) == (404, b'{"error":"Not found"}')
    assert reply.content_type is None  # the upstream's Content-Type is the one sent
    assert sorted(reply.headers) == [
        ("Content-Type", "application/json; charset=utf-8"),
        ("X-Ms-Version", "7"),
    ]
    head = encode(reply, close=False).split(b"\r\n\r\n", 1)[0].lower().split(b"\r\n")
    assert sum(h.startswith(b"date:") for h in head) == 1
    assert [h for h in head if h.startswith(b"server:")] == [b"server: nmi"]
    assert [h for h in head if h.startswith(b"content-length:")] == [b"content-length: 21"]


async def test_redirects_are_passed_on_not_followed(
    node_imds: NodeImds, proxy: MetadataProxy
) -> None:
    async def respond(request: web.Request) -> web.StreamResponse:
        if request.path == "/metadata/versions":
            return web.Response(status=301, headers={"Location": "/elsewhere"})
        return web.Response(status=200, text="followed")

    node_imds.respond = respond
    reply = await within(proxy.forward(pod_request(), "/metadata/versions"))
    assert reply.status == 301
    assert ("Location", "/elsewhere") in reply.headers
    assert len(node_imds.seen) == 1


@pytest.mark.parametrize("size", [300_000, MAX_BODY])
async def test_an_answer_up_to_max_body_is_passed_on_whole(
    node_imds: NodeImds, proxy: MetadataProxy, size: int
) -> None:
    async def respond(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"x" * size)

    node_imds.respond = respond
    reply = await within(proxy.forward(pod_request(), "/metadata/instance"))
    assert reply.status == 200
    assert len(reply.body) == size


async def test_an_answer_over_max_body_is_502(node_imds: NodeImds, proxy: MetadataProxy) -> None:
    async def respond(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"x" * (MAX_BODY + 1))

    node_imds.respond = respond
    reply = await within(proxy.forward(pod_request(), "/metadata/instance"))
    assert (reply.status, error_of(reply)) == (502, "bad_gateway")
    assert not any(k.lower() == "retry-after" for k, _ in reply.headers)


async def test_a_request_body_over_max_body_is_413_and_not_sent(
    node_imds: NodeImds, proxy: MetadataProxy
) -> None:
    request = pod_request("POST", body=b"x" * (MAX_BODY + 1))
    reply = await within(proxy.forward(request, "/metadata/attested/document"))
    assert (reply.status, error_of(reply)) == (413, "invalid_request")
    assert node_imds.seen == []


async def test_a_target_that_is_not_a_path_is_refused_and_not_sent(
    node_imds: NodeImds, proxy: MetadataProxy
) -> None:
    reply = await within(proxy.forward(pod_request(), "@evil.example/metadata/instance"))
    assert (reply.status, error_of(reply)) == (400, "invalid_request")
    assert node_imds.seen == []


async def test_a_refused_connection_is_502() -> None:
    with socket.socket() as bound:  # bound, never listening: connections are refused
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        proxy = await started(f"http://127.0.0.1:{port}")
        try:
            reply = await within(proxy.forward(pod_request(), "/metadata/instance"))
        finally:
            await proxy.close()
    assert reply.status == 502
    assert json.loads(reply.body) == {
        "error": "bad_gateway",
        "error_description": "The node metadata service did not answer",
    }


async def test_a_node_imds_that_does_not_answer_in_time_is_504(node_imds: NodeImds) -> None:
    never = asyncio.Event()

    async def respond(request: web.Request) -> web.StreamResponse:
        await never.wait()  # cancelled by the fixture's teardown
        raise AssertionError("unreachable")

    node_imds.respond = respond
    proxy = await started(node_imds.endpoint, timeout=0.05)
    try:
        reply = await within(proxy.forward(pod_request(), "/metadata/instance"))
    finally:
        await proxy.close()
    assert reply.status == 504
    assert json.loads(reply.body) == {
        "error": "gateway_timeout",
        "error_description": "The node metadata service timed out",
    }
    assert len(node_imds.seen) == 1  # it was asked, and did not answer
