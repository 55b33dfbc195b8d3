"""Federated identities on this node: which pod presents a service account's token,
and what goes when a pod goes.

Why: the tokens of a federated identity are obtained with a pod's own
service-account token, and cached per service account (every pod of one
service account is the same subject to Azure AD).  That ties them to the
node's pods in three ways, kept together here rather than spread over the
daemon:

* a background renewal presents the token of the pod that asked, or, if it
  is gone, of another live pod of the same service account on this node
  (:meth:`Federation.presenter`); with none left there is nothing to renew;
* when a pod is deleted (or ends, or its name is taken by a new pod), its
  service-account tokens are dropped at once, and when it was the last pod of
  its service account on this node, so are the Azure AD tokens obtained with
  that service account (:meth:`Federation.pod_gone`);
* the metrics of TokenRequests (:meth:`Federation.collect`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Protocol

from prometheus_client.core import Metric

from ..kube.index import ClusterIndex
from ..kube.objects import Pod
from ..kube.token_request import DiscoveryApi, TokenApi, service_account_issuer
from ..ops.metrics import counter, gauge
from .assertions import AssertionCache
from .cache import CacheKey, TokenCache
from .shadow import ShadowTrials

log = logging.getLogger(__name__)


class FederationApi(TokenApi, DiscoveryApi, Protocol):
    """The API client: TokenRequests (POST) and the issuer discovery document (GET)."""


class Federation:
    def __init__(
        self,
        *,
        index: ClusterIndex,
        cache: TokenCache,
        api: FederationApi,
        default_audience: str = "api://AzureADTokenExchange",
    ) -> None:
        self.index = index
        self.default_audience = default_audience
        self.cache = cache
        self._api = api
        self.assertions = AssertionCache(api=api, alive=self.alive)
        self.shadow: ShadowTrials | None = None
        self._discovered = ""

    @property
    def issuer(self) -> str:
        """The service-account issuer Azure AD is shown ("" while unknown)."""
        return self.assertions.issuer or self._discovered

    async def learn_issuer(self) -> str:
        """The issuer, read from the API server's discovery document if no token told it."""
        if not self.issuer:
            self._discovered = await service_account_issuer(self._api)
        return self.issuer

    def alive(self, pod: Pod) -> bool:
        """Whether this very pod (same UID) is still one of the node's callers."""
        current = self.index.pod(pod.meta.namespace, pod.meta.name)
        return current is not None and current.meta.uid == pod.meta.uid and current.can_call

    def presenter(self, namespace: str, service_account: str, preferred: Pod) -> Pod | None:
        """The pod whose token is presented for (namespace, service account)."""
        if self.alive(preferred):
            return preferred
        for pod in self.index.pods():
            if (
                pod.meta.namespace == namespace
                and pod.service_account == service_account
                and pod.can_call
            ):
                return pod
        return None

    def pod_gone(self, pod: Pod) -> None:
        """A pod stopped being a caller: drop what was obtained with its token."""
        self.assertions.forget(pod.meta.uid_or_key)
        namespace, account = pod.meta.namespace, pod.service_account
        if self.presenter(namespace, account, pod) is None:
            subject = f"{namespace}/{account}"
            dropped = self.cache.drop_where(lambda key: key.subject == subject)
            if dropped:
                log.info(
                    "federated tokens dropped: no pod of their service account is left",
                    extra={"fields": {"service_account": subject, "tokens": dropped}},
                )

    def in_use(self, key: CacheKey) -> bool:
        """A federated token is renewed only while a pod of its service account is here."""
        if not key.subject:
            return True
        namespace, _, account = key.subject.partition("/")
        return any(
            p.meta.namespace == namespace and p.service_account == account and p.can_call
            for p in self.index.pods()
        )

    def collect(self) -> Iterable[Metric]:
        a = self.assertions
        yield counter(
            "nmi_service_account_token_requests",
            "TokenRequests sent for federated identities, by result.",
            ["result"],
            [(["issued"], a.requests - a.refused), (["failed"], a.refused)],
        )
        yield gauge(
            "nmi_service_account_tokens", "Service-account tokens held.", [], [([], len(a))]
        )
        shadow = self.shadow
        if shadow is None:
            return
        yield gauge(
            "nmi_federation_shadow_ready",
            "1 when the last federation trial of an identity annotated "
            "aadpodidentity.k8s.io/federation=shadow succeeded for the service account.",
            ["identity", "service_account", "code"],
            [
                ([r.identity, r.service_account, r.code], 1.0 if r.ready else 0.0)
                for r in shadow.results.values()
            ],
        )
        yield counter(
            "nmi_federation_shadow_trials",
            "Federation trials run (and dropped for want of room in the queue).",
            ["result"],
            [(["run"], shadow.trials), (["dropped"], shadow.dropped)],
        )
