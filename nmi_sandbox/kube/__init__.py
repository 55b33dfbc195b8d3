"""An in-process Kubernetes API server that speaks the real wire protocol.

Why this exists: the daemon keeps a live view of the cluster with
``kubernetes_asyncio`` list+watch and reads raw watch lines (and the controller
will elect its leader on a Lease and watch nodes), and no real kube-apiserver --
nor etcd -- can run on the machines the tests, the benchmarks and ``nmi sandbox``
run on.  Mocking the client library would test the mock, so instead this package
serves HTTPS on loopback and the production client path (kubeconfig loading, TLS
with ``certificate-authority-data``, bearer tokens, list pagination, watch
resumption, 410 handling, bookmarks) runs unchanged against it.  The production
daemon never imports it.

What is emulated, as the real kube-apiserver does it:

* one global, monotonically increasing ``resourceVersion`` shared by all
  resources (like the etcd revision); every effective write bumps it, a no-op
  update does not (like the real server);
* GET, LIST (``limit``/``continue`` with consistent snapshots, label and field
  selectors, ``resourceVersion``/``resourceVersionMatch``), WATCH (chunked JSON
  lines, synthetic ADDED events, resumption from history, 410 ``Expired`` as an
  ``ERROR`` event, bookmarks, ``timeoutSeconds``, selector move-in/move-out),
  POST (``generateName``), PUT (optimistic concurrency), PATCH (JSON merge,
  strategic merge treated as JSON merge for built-in types, RFC 6902 JSON
  patch), DELETE (finalizers and ``deletionTimestamp``), DELETE collection, the
  ``status`` subresource and ``pods/binding``;
* service-account tokens: the ``serviceaccounts/token`` subresource
  (TokenRequest: RS256 JWTs with kube's claims, bound to a pod, a secret or a
  node, with its validation and refusals) and service-account issuer discovery
  (``/.well-known/openid-configuration``, ``/openid/v1/jwks``, served without
  authentication); every namespace gets its ``default`` ServiceAccount;
* errors are ``Status`` objects with the real reasons and messages;
* admission and registry behaviour clients can observe: objects cannot be
  created in a missing or terminating namespace, pod status is reset to
  ``Pending`` on create, custom-resource ``status`` is dropped on create and
  ignored on main-resource updates, secrets' ``stringData`` is folded into
  ``data``, namespaces get their ``kubernetes.io/metadata.name`` label, Lease
  MicroTimes must have six fractional digits and come back in UTC, core ``v1``
  and ``events.k8s.io/v1`` events are two views of one storage.  LIST items of
  built-in kinds carry no ``kind``/``apiVersion`` (custom resources do), exactly
  as on the wire of a real server.

Custom resources are stored as given (no structural-schema pruning), so legacy
capitalised keys such as ``ClientID``, ``Selector`` or ``PodLabels`` survive.

The modules, each with one job (none imports a later one):

* :mod:`.meta` -- the JSON type, timestamps, object keys, name and label syntax;
* :mod:`.errors` -- ``Status`` objects and :class:`KubeApiError`;
* :mod:`.resources` -- the resource table and the discovery documents;
* :mod:`.selectors` -- label and field selectors;
* :mod:`.patch` -- the three PATCH dialects;
* :mod:`.admission` -- per-kind defaulting and validation;
* :mod:`.store` -- revisions, history, snapshots, continue tokens, watchers;
* :mod:`.registry` -- the write verbs: preconditions, finalizers, namespaces, binding;
* :mod:`.tokens` -- TokenRequest, the signing key, issuer discovery documents;
* :mod:`.handlers` -- HTTP: authentication, routing, verbs, watch streams;
* :mod:`.server` -- :class:`KubeApiServer`: serving, kubeconfig, direct access, faults.
"""

from .errors import KubeApiError
from .server import KubeApiServer

__all__ = ["KubeApiError", "KubeApiServer"]
