"""The write verbs' semantics: create, update, patch, delete, and what follows from them.

Why this exists: between an HTTP request (or a test's direct call) and the store
sit the rules the real server's generic registry applies to every write, whatever
the kind:

* create: the namespace must exist and not be terminating, ``generateName``,
  server-owned metadata (uid, creationTimestamp...) set and never taken from the
  body, AlreadyExists; a new namespace gets its ``default`` ServiceAccount right
  away (the ServiceAccount controller's job, done synchronously here);
* update (PUT, PATCH, the ``status`` subresource): optimistic concurrency on
  ``metadata.resourceVersion`` (409 Conflict when stale; custom resources refuse
  an update without one), UID preconditions, status kept apart from the main
  resource where a status subresource exists, a no-op update writes nothing;
* delete: preconditions, finalizers (``deletionTimestamp`` first, removal when the
  last finalizer goes), namespaces terminating and emptied by the namespace
  controller, ``pods/binding``.

Per-kind defaulting and validation are :mod:`.admission`'s, storage and watch
events :mod:`.store`'s.
"""

from __future__ import annotations

import copy
import secrets
import uuid
from typing import Any

from .admission import admit_create, admit_update, next_generation
from .errors import FieldError, bad_request, error, internal
from .meta import JSON, SYSTEM_META, now
from .patch import apply_patch
from .resources import BY_STORAGE, Resource
from .store import Store

__all__ = ["INITIAL_NAMESPACES", "Registry"]

_PROTECTED_NAMESPACES = ("default", "kube-system", "kube-public")
INITIAL_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # k8s.io/apimachinery/pkg/util/rand alphabet


class Registry:
    """The verbs on a :class:`Store`; a new registry seeds the initial namespaces."""

    def __init__(self, store: Store) -> None:
        self.store = store
        ns_res = BY_STORAGE["namespaces"]
        for name in INITIAL_NAMESPACES:
            self.create(ns_res, None, {"metadata": {"name": name}})

    # ----------------------------------------------------------------- create

    def _check_namespace(self, res: Resource, namespace: str | None, name: str) -> None:
        if not res.namespaced or namespace is None:
            return
        ns_obj = self.store.get("namespaces", None, namespace)
        if ns_obj is None:
            raise BY_STORAGE["namespaces"].not_found(namespace)
        if ns_obj["metadata"].get("deletionTimestamp"):
            raise res.forbidden(
                name,
                f"unable to create new content in namespace {namespace} because it is being "
                "terminated",
            )

    def create(
        self, res: Resource, namespace: str | None, view: JSON, *, dry_run: bool = False
    ) -> JSON:
        """Create ``view`` (in ``res``'s shape) in ``namespace``; the stored object."""
        if not isinstance(view.get("metadata", {}), dict):
            raise bad_request("metadata must be an object")
        storage_res = BY_STORAGE[res.storage]
        obj = res.from_view(copy.deepcopy(view))
        obj["apiVersion"], obj["kind"] = storage_res.api_version, storage_res.kind
        meta: JSON = obj.setdefault("metadata", {})
        if res.namespaced:
            given = meta.get("namespace") or ""
            if given and given != namespace:
                raise bad_request(
                    "the namespace of the provided object does not match the namespace sent "
                    "on the request"
                )
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        if meta.get("resourceVersion"):
            raise internal("resourceVersion should not be set on objects to be created")
        name = str(meta.get("name") or "")
        generate = str(meta.get("generateName") or "")
        if not name and not generate:
            raise res.invalid(
                "", [FieldError("Required", "metadata.name", "name or generateName is required")]
            )
        self._check_namespace(res, namespace, name or generate)
        if not name:
            bucket = self.store.objects[res.storage]
            while True:
                name = generate + "".join(secrets.choice(_NAME_CHARS) for _ in range(5))
                if (namespace or "", name) not in bucket:
                    break
            meta["name"] = name
        for system in SYSTEM_META:
            meta.pop(system, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now()
        errs = admit_create(res, obj)
        if errs:
            raise res.invalid(name, errs)
        if self.store.get(res.storage, namespace, name) is not None:
            raise res.already_exists(name)
        if dry_run:
            return obj
        created = self.store.commit(res.storage, "ADDED", obj, None)
        if res.storage == "namespaces":
            self._ensure_default_service_account(name)
        return created

    def _ensure_default_service_account(self, namespace: str) -> None:
        """The ServiceAccount controller: every namespace has a ``default`` service account."""
        if self.store.get("serviceaccounts", namespace, "default") is None:
            sa_res = BY_STORAGE["serviceaccounts"]
            self.create(sa_res, namespace, {"metadata": {"name": "default"}})

    # ----------------------------------------------------------------- update

    def update(
        self,
        res: Resource,
        namespace: str | None,
        name: str,
        view: JSON,
        subresource: str | None = None,
        *,
        dry_run: bool = False,
    ) -> JSON:
        """Replace the object (or, with ``subresource="status"``, its status) by ``view``."""
        storage = res.storage
        existing = self.store.get(storage, namespace, name)
        if existing is None:
            raise res.not_found(name)
        if not isinstance(view.get("metadata", {}), dict):
            raise bad_request("metadata must be an object")
        obj = res.from_view(copy.deepcopy(view))
        meta: JSON = obj.setdefault("metadata", {})
        body_name = str(meta.get("name") or "")
        if body_name != name:
            raise bad_request(
                f"the name of the object ({body_name}) does not match the name on the URL ({name})"
            )
        if res.namespaced and meta.get("namespace") and meta["namespace"] != namespace:
            raise bad_request(
                "the namespace of the provided object does not match the namespace sent on the "
                "request"
            )
        old_meta = existing["metadata"]
        rv = str(meta.get("resourceVersion") or "")
        if rv and rv != old_meta["resourceVersion"]:
            raise res.conflict(
                name,
                "the object has been modified; please apply your changes to the latest version "
                "and try again",
            )
        if not rv and not res.allow_unconditional_update:
            raise res.invalid(
                name,
                [
                    FieldError(
                        "Invalid", "metadata.resourceVersion", "must be specified for an update", 0
                    )
                ],
            )
        if meta.get("uid") and meta["uid"] != old_meta["uid"]:
            raise res.conflict(
                name,
                f"Precondition failed: UID in precondition: {old_meta['uid']}, "
                f"UID in object meta: {meta['uid']}",
            )
        storage_res = BY_STORAGE[storage]
        if subresource == "status":
            cand = copy.deepcopy(existing)
            if "status" in obj:
                cand["status"] = obj["status"]
            else:
                cand.pop("status", None)
        else:
            cand = obj
            meta = cand["metadata"]
            for system in SYSTEM_META:
                if system in old_meta:
                    meta[system] = old_meta[system]
                else:
                    meta.pop(system, None)
            meta["name"] = name
            if res.namespaced:
                meta["namespace"] = namespace
            else:
                meta.pop("namespace", None)
            if res.status_subresource:
                if "status" in existing:
                    cand["status"] = copy.deepcopy(existing["status"])
                else:
                    cand.pop("status", None)
            cand["apiVersion"], cand["kind"] = storage_res.api_version, storage_res.kind
            errs = admit_update(res, cand, existing)
            if errs:
                raise res.invalid(name, errs)
            next_generation(res, cand, existing)
        cand["metadata"]["resourceVersion"] = old_meta["resourceVersion"]
        if cand == existing:
            return existing  # a no-op update writes nothing, like the real server
        if dry_run:
            return cand
        deleting = bool(cand["metadata"].get("deletionTimestamp"))
        if deleting and not cand["metadata"].get("finalizers") and storage != "namespaces":
            deleted = self.store.commit(storage, "DELETED", cand, existing)
            self._after_delete(deleted)
            return deleted
        result = self.store.commit(storage, "MODIFIED", cand, existing)
        if storage == "namespaces" and deleting:
            self._maybe_finish_namespace(name)
        return result

    def patch(
        self,
        res: Resource,
        namespace: str | None,
        name: str,
        content_type: str,
        patch: Any,
        subresource: str | None,
        *,
        dry_run: bool = False,
    ) -> JSON:
        """Patch the object as ``content_type`` says, then update it with the result."""
        existing = self.store.get(res.storage, namespace, name)
        if existing is None:
            raise res.not_found(name)
        current = res.to_view(copy.deepcopy(existing))
        patched = apply_patch(current, content_type, patch, custom=res.custom)
        return self.update(res, namespace, name, patched, subresource, dry_run=dry_run)

    # ----------------------------------------------------------------- delete

    def delete(
        self,
        res: Resource,
        namespace: str | None,
        name: str,
        preconditions: JSON | None = None,
        *,
        dry_run: bool = False,
    ) -> tuple[JSON, bool]:
        """Delete; returns (object, removed-now?)."""
        storage = res.storage
        existing = self.store.get(storage, namespace, name)
        if existing is None:
            raise res.not_found(name)
        old_meta = existing["metadata"]
        pre = preconditions or {}
        if pre.get("uid") and pre["uid"] != old_meta["uid"]:
            raise res.conflict(
                name,
                f"Precondition failed: UID in precondition: {pre['uid']}, "
                f"UID in object meta: {old_meta['uid']}",
            )
        if pre.get("resourceVersion") and pre["resourceVersion"] != old_meta["resourceVersion"]:
            raise res.conflict(
                name,
                f"Precondition failed: ResourceVersion in precondition: {pre['resourceVersion']}, "
                f"ResourceVersion in object meta: {old_meta['resourceVersion']}",
            )
        if storage == "namespaces":
            if name in _PROTECTED_NAMESPACES:
                raise res.forbidden(name, "this namespace may not be deleted")
            if old_meta.get("deletionTimestamp"):
                return existing, False
            cand = copy.deepcopy(existing)
            cand["metadata"]["deletionTimestamp"] = now()
            cand["metadata"]["deletionGracePeriodSeconds"] = 0
            cand.setdefault("status", {})["phase"] = "Terminating"
            if dry_run:
                return cand, False
            result = self.store.commit(storage, "MODIFIED", cand, existing)
            self._purge_namespace(name)
            return result, self.store.get(storage, None, name) is None
        if old_meta.get("finalizers"):
            if old_meta.get("deletionTimestamp"):
                return existing, False
            cand = copy.deepcopy(existing)
            cand["metadata"]["deletionTimestamp"] = now()
            cand["metadata"]["deletionGracePeriodSeconds"] = 0
            if dry_run:
                return cand, False
            return self.store.commit(storage, "MODIFIED", cand, existing), False
        if dry_run:
            return existing, True
        deleted = self.store.commit(storage, "DELETED", copy.deepcopy(existing), existing)
        self._after_delete(deleted)
        return deleted, True

    def _after_delete(self, obj: JSON) -> None:
        ns = obj["metadata"].get("namespace")
        if ns:
            ns_obj = self.store.get("namespaces", None, ns)
            if ns_obj is not None and ns_obj["metadata"].get("deletionTimestamp"):
                self._maybe_finish_namespace(ns)

    def _purge_namespace(self, namespace: str) -> None:
        """The namespace controller: delete everything in a terminating namespace."""
        for storage, bucket in self.store.objects.items():
            res = BY_STORAGE[storage]
            if not res.namespaced:
                continue
            for key in sorted(k for k in bucket if k[0] == namespace):
                if key in bucket:
                    self.delete(res, namespace, key[1])
        self._maybe_finish_namespace(namespace)

    def _maybe_finish_namespace(self, namespace: str) -> None:
        ns_obj = self.store.get("namespaces", None, namespace)
        if ns_obj is None or not ns_obj["metadata"].get("deletionTimestamp"):
            return
        if ns_obj["metadata"].get("finalizers"):
            return
        for storage, bucket in self.store.objects.items():
            if BY_STORAGE[storage].namespaced and any(k[0] == namespace for k in bucket):
                return
        final = copy.deepcopy(ns_obj)
        final["spec"] = {}
        self.store.commit("namespaces", "DELETED", final, ns_obj)

    # ----------------------------------------------------------------- pods/binding

    def bind_pod(self, namespace: str, name: str, body: JSON) -> None:
        """``POST pods/<name>/binding`` (or the legacy ``bindings``): what the scheduler does."""
        res = BY_STORAGE["pods"]
        existing = self.store.get("pods", namespace, name)
        if existing is None:
            raise res.not_found(name)
        target = body.get("target") or {}
        node = target.get("name") if isinstance(target, dict) else None
        if not node:
            raise error(
                422,
                "Invalid",
                f'Binding.meta.k8s.io "{name}" is invalid: target.name: Required value',
                {"name": name, "kind": "Binding"},
            )
        current = (existing.get("spec") or {}).get("nodeName")
        if current:
            raise res.conflict(name, f'pod {name} is already assigned to node "{current}"')
        cand = copy.deepcopy(existing)
        cand.setdefault("spec", {})["nodeName"] = node
        conditions = cand.setdefault("status", {}).setdefault("conditions", [])
        conditions.append(
            {
                "type": "PodScheduled",
                "status": "True",
                "lastProbeTime": None,
                "lastTransitionTime": now(),
            }
        )
        self.store.commit("pods", "MODIFIED", cand, existing)
