"""The cluster view survives what real API servers do: restarts, compaction, dropped watches."""

import asyncio

from nmi_sandbox.world import LoopbackWorld


async def test_api_server_restart_with_compaction_while_serving(running: LoopbackWorld) -> None:
    ident = running.add_user_assigned_identity("stable-id")
    pod = running.add_pod("stable", selector=ident.selector)
    running.assign(pod, ident)
    await running.pod_visible(pod)
    await running.synced(lambda idx: bool(idx.assignments("default", "stable")))
    ip = running.pod_ip(pod)
    assert (await running.get_token(ip)).status == 200
    assert running.daemon is not None and running.daemon.watch is not None
    pods_informer = next(i for i in running.daemon.watch.informers if i.name == "pods")
    lists_before = pods_informer.lists

    await running.kube.stop()
    # while the API server is down, decisions keep being served from the view
    replies = await asyncio.gather(*(running.get_token(ip) for _ in range(20)))
    assert all(r.status == 200 for r in replies)
    # meanwhile history is compacted: resuming from the old resourceVersion gets 410
    running.kube.compact()
    new_ident = running.add_user_assigned_identity("late-id")
    late = running.add_pod("late", selector=new_ident.selector)
    running.assign(late, new_ident)
    await running.kube.start()
    await running.pod_visible(late)
    await running.synced(lambda idx: bool(idx.assignments("default", "late")))
    reply = await running.get_token(running.pod_ip(late))
    assert reply.status == 200, reply.body
    assert pods_informer.lists > lists_before  # re-listed after 410
    assert (await running.get_token(ip)).status == 200


async def test_dropped_watches_resume_without_relist(running: LoopbackWorld) -> None:
    assert running.daemon is not None and running.daemon.watch is not None
    informers = running.daemon.watch.informers
    for informer in informers:
        await running.kube.wait_for_watchers(informer.name)
    lists = {i.name: i.lists for i in informers}
    running.kube.drop_watches()
    ident = running.add_user_assigned_identity("after-drop-id")
    pod = running.add_pod("after-drop", selector=ident.selector)
    running.assign(pod, ident)
    await running.pod_visible(pod)
    running.kube.create(
        {
            "apiVersion": "aadpodidentity.k8s.io/v1",
            "kind": "AzurePodIdentityException",
            "metadata": {"name": "after-drop", "namespace": "default"},
            "spec": {"podLabels": {"never": "matches"}},
        }
    )
    # every informer has seen an event written after the drop: all have re-watched
    await running.synced(
        lambda idx: (
            bool(idx.assignments("default", "after-drop")) and bool(idx.exceptions_in("default"))
        )
    )
    assert (await running.get_token(running.pod_ip(pod))).status == 200
    assert {i.name: i.lists for i in informers} == lists  # resumed from resourceVersion
    assert all(i.watch_restarts >= 1 for i in informers), {
        i.name: i.watch_restarts for i in informers
    }


async def test_deleted_pod_disappears_from_view(running: LoopbackWorld) -> None:
    pod = running.add_pod("gone")
    await running.pod_visible(pod)
    ip = running.pod_ip(pod)
    running.kube.delete("v1", "Pod", "gone", "default")
    await running.synced(lambda idx: not idx.pods_with_ip(ip))
    reply = await running.get_token(ip)
    assert reply.status == 404
