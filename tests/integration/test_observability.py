"""Metrics and probes, scraped and parsed as Prometheus and the kubelet would."""

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from nmi_sandbox.world import LoopbackWorld


async def scrape(world: LoopbackWorld) -> dict[str, list[tuple[dict[str, str], float]]]:
    assert world.daemon is not None
    url = f"http://127.0.0.1:{world.daemon.metrics_server.port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples, name: str, **labels: str) -> float:  # type: ignore[no-untyped-def]
    return sum(
        v for lbl, v in samples.get(name, []) if all(lbl.get(k) == x for k, x in labels.items())
    )


async def test_metrics_are_scraped_with_bounded_labels(running: LoopbackWorld) -> None:
    ident = running.add_user_assigned_identity("metrics-id")
    pod = running.add_pod("metrics", selector=ident.selector)
    running.assign(pod, ident)
    lonely = running.add_pod("metrics-lonely")
    await running.pod_visible(pod)
    await running.pod_visible(lonely)
    await running.synced(lambda idx: bool(idx.assignments("default", "metrics")))
    ip = running.pod_ip(pod)
    running.imds.add_resource("https://custom.example.com/api")
    for resource in ("https://management.azure.com", "https://custom.example.com/api"):
        assert (await running.get_token(ip, resource)).status == 200
    assert (await running.get_token(ip)).status == 200  # cache hit
    assert (await running.get_token(running.pod_ip(lonely))).status == 400
    await running.request(ip, "/metadata/identity/oauth2/token")  # probe without Metadata
    await running.request(ip, "/some/random/path/12345", headers={"Metadata": "true"})

    s = await scrape(running)
    assert value(s, "nmi_requests_total", route="token", status="200") == 3
    assert value(s, "nmi_requests_total", route="token", status="400") == 2
    assert value(s, "nmi_token_cache_requests_total", result="hit") == 1
    assert value(s, "nmi_token_cache_requests_total", result="miss") == 2
    assert value(s, "nmi_denied_requests_total", reason="not_found") == 1
    assert (
        value(s, "nmi_upstream_request_duration_seconds_count", source="imds", identity_type="0")
        == 2
    )
    assert (
        value(
            s,
            "aadpodidentity_imds_operations_duration_seconds_count",
            operation_type="adal_token_msi_userassignedid",
        )
        == 2
    )
    compat = s["aadpodidentity_nmi_operations_duration_seconds_count"]
    assert {lbl["resource"] for lbl, _ in compat} <= {"https://management.azure.com", "other"}
    assert {lbl["operation_type"] for lbl, _ in compat} == {"/metadata/identity/oauth2/token"}
    # no raw path or user-chosen resource ever becomes a label value
    for name, entries in s.items():
        for labels, _ in entries:
            assert "12345" not in "".join(labels.values()), name
            assert "custom.example.com" not in "".join(labels.values()), name
    assert value(s, "nmi_kube_synced", resource="pods") == 1
    assert value(s, "nmi_kube_lists_total", resource="azureassignedidentities") >= 1


async def test_probes(running: LoopbackWorld) -> None:
    assert running.daemon is not None
    base = f"http://127.0.0.1:{running.daemon.probes.port}"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/healthz") as resp:
            assert resp.status == 200
        async with session.get(f"{base}/readyz") as resp:
            assert resp.status == 200
            assert (await resp.json())["ready"] is True
        for path in ("/debug/pprof/", "/metrics", "/"):
            async with session.get(f"{base}{path}") as resp:
                assert resp.status == 404
