"""Service-account tokens: the TokenRequest API and service-account issuer discovery.

Why this exists: a workload identity is a Kubernetes service-account token
exchanged at Azure AD for an Azure token.  The token is a JWT the API server
signs (``POST serviceaccounts/<name>/token``, what the kubelet does for a
projected volume), and Azure AD checks it against the keys the issuer publishes
(``/.well-known/openid-configuration`` then ``/openid/v1/jwks``, fetched without
credentials).  This module does both as kube-apiserver does
(``pkg/registry/core/serviceaccount/storage/token.go``, ``pkg/serviceaccount``):

* :class:`SigningKey` -- the server's RSA key, its ``kid`` (base64url of the
  SHA-256 of the DER SubjectPublicKeyInfo) and its JWK; RS256 signing;
* :class:`ServiceAccountTokens` -- the TokenRequest REST create (validation,
  bound-object lookups and their refusals, the maximum expiration, the
  response) and :meth:`ServiceAccountTokens.issue`, which builds and signs the
  claims exactly as ``serviceaccount.Claims`` does (``iss``, ``sub``, ``aud``,
  ``exp``, ``iat``, ``nbf``, ``jti`` and the private ``kubernetes.io`` claim);
* :func:`openid_configuration` and :meth:`SigningKey.jwks`, the two discovery
  documents.

The legacy extended expiration of projected tokens
(``--service-account-extend-token-expiration``, ``warnafter``) is not emulated:
a token expires when its TokenRequest says.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from .errors import FieldError, KubeApiError, bad_request, error
from .meta import JSON, format_time
from .resources import BY_STORAGE
from .store import Store

__all__ = [
    "DEFAULT_EXPIRATION_SECONDS",
    "DEFAULT_MAX_TOKEN_EXPIRATION",
    "DISCOVERY_PATH",
    "JWKS_PATH",
    "MIN_EXPIRATION_SECONDS",
    "TOKEN_REQUEST_API_VERSION",
    "IssuedToken",
    "ServiceAccountTokens",
    "SigningKey",
    "openid_configuration",
]

TOKEN_REQUEST_API_VERSION = "authentication.k8s.io/v1"
_GROUP = "authentication.k8s.io"
DISCOVERY_PATH = "/.well-known/openid-configuration"
JWKS_PATH = "/openid/v1/jwks"

DEFAULT_EXPIRATION_SECONDS = 3600  # SetDefaults_TokenRequestSpec
MIN_EXPIRATION_SECONDS = 600  # ValidateTokenRequest: "less than 10 minutes"
_MAX_EXPIRATION_SECONDS = 1 << 32  # ValidateTokenRequest: "larger than 2^32 seconds"
DEFAULT_MAX_TOKEN_EXPIRATION = 48 * 3600


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int_b64url(value: int) -> str:
    return _b64url(value.to_bytes((value.bit_length() + 7) // 8, "big"))


def _compact_json(obj: Any) -> bytes:
    # go-jose marshals the merged claims as a map: keys sorted, no spaces
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


class SigningKey:
    """The server's service-account signing key, generated on first use and then kept."""

    @cached_property
    def private_key(self) -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    @cached_property
    def kid(self) -> str:
        """kube's key id: base64url (unpadded) of SHA-256 of the DER SubjectPublicKeyInfo."""
        der = self.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return _b64url(hashlib.sha256(der).digest())

    def jwk(self) -> JSON:
        """The public key as go-jose writes it in the JWKS (keys in that order)."""
        numbers = self.private_key.public_key().public_numbers()
        return {
            "use": "sig",
            "kty": "RSA",
            "kid": self.kid,
            "alg": "RS256",
            "n": _int_b64url(numbers.n),
            "e": _int_b64url(numbers.e),
        }

    def jwks(self) -> JSON:
        """``GET /openid/v1/jwks``."""
        return {"keys": [self.jwk()]}

    def sign(self, claims: JSON) -> str:
        """A compact RS256 JWS of ``claims`` with kube's header (``alg`` and ``kid``, no typ)."""
        header = _b64url(_compact_json({"alg": "RS256", "kid": self.kid}))
        payload = _b64url(_compact_json(claims))
        signing_input = f"{header}.{payload}".encode()
        signature = self.private_key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        return f"{header}.{payload}.{_b64url(signature)}"


def openid_configuration(issuer: str) -> JSON:
    """``GET /.well-known/openid-configuration`` (``serviceaccount.openIDMetadata``)."""
    return {
        "issuer": issuer,
        "jwks_uri": f"{issuer}{JWKS_PATH}",
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
    }


@dataclass(frozen=True)
class IssuedToken:
    """A signed token, its claims and its expiration (``status.expirationTimestamp``)."""

    token: str
    claims: JSON
    expiration: datetime.datetime


def _invalid(name: str, errors: list[FieldError]) -> KubeApiError:
    """``errors.NewInvalid`` for the TokenRequest kind (``name`` omitted when empty)."""
    text = str(errors[0]) if len(errors) == 1 else "[" + ", ".join(map(str, errors)) + "]"
    details: JSON = {}
    if name:
        details["name"] = name
    details["group"] = _GROUP
    details["kind"] = "TokenRequest"
    details["causes"] = [e.cause() for e in errors]
    return error(422, "Invalid", f'TokenRequest.{_GROUP} "{name}" is invalid: {text}', details)


def _decode_error(field: str, value: Any, go_type: str) -> KubeApiError:
    kind = {bool: "bool", str: "string", list: "array", dict: "object"}.get(type(value), "number")
    return bad_request(
        f'TokenRequest in version "v1" cannot be handled as a TokenRequest: json: cannot '
        f"unmarshal {kind} into Go struct field {field} of type {go_type}"
    )


def _gvk_string(api_version: str, kind: str) -> str:
    group, _, version = api_version.rpartition("/")
    return f"{group}/{version}, Kind={kind}"


def _as_datetime(now: datetime.datetime | float | None) -> datetime.datetime:
    if now is None:
        return datetime.datetime.now(datetime.UTC)
    if isinstance(now, datetime.datetime):
        return now if now.tzinfo is not None else now.replace(tzinfo=datetime.UTC)
    return datetime.datetime.fromtimestamp(now, datetime.UTC)


OnIssue = Callable[[str, str, str, JSON], None]


class ServiceAccountTokens:
    """The ``serviceaccounts/token`` subresource of one server, on its store.

    ``issuer`` is read at every issue (the server's URL is only known once it
    listens); ``on_issue(namespace, serviceaccount, pod name or "", claims)`` is
    called for every token signed.
    """

    def __init__(
        self,
        store: Store,
        issuer: Callable[[], str],
        *,
        max_expiration: int = DEFAULT_MAX_TOKEN_EXPIRATION,
        on_issue: OnIssue | None = None,
    ) -> None:
        self._store = store
        self._issuer = issuer
        self.max_expiration = max_expiration
        self.key = SigningKey()
        self._on_issue = on_issue
        # Seconds the API server's clock is ahead of (or behind) the real one for the
        # tokens it issues over HTTP: a fault knob for skewed clusters.
        self.clock_offset = 0.0

    @property
    def issuer(self) -> str:
        return self._issuer()

    def openid_configuration(self) -> JSON:
        return openid_configuration(self.issuer)

    def jwks(self) -> JSON:
        return self.key.jwks()

    # ----------------------------------------------------------------- lookups

    def _get(self, storage: str, namespace: str | None, name: str) -> JSON:
        if not name:
            raise bad_request("resource name may not be empty")
        found = self._store.get(storage, namespace, name)
        if found is None:
            raise BY_STORAGE[storage].not_found(name)
        return found

    def _bound_objects(
        self, namespace: str, name: str, ref: JSON
    ) -> tuple[JSON | None, JSON | None, JSON | None]:
        """(pod, node, secret) of a ``boundObjectRef``; refusals as token.go words them."""
        kind = str(ref.get("kind") or "")
        api_version = str(ref.get("apiVersion") or "")
        ref_name = str(ref.get("name") or "")
        group = api_version.rpartition("/")[0]
        pod = node = secret = None
        if group == "" and kind == "Pod":
            pod = self._get("pods", namespace, ref_name)
            if (pod.get("spec") or {}).get("serviceAccountName") != name:
                raise bad_request(
                    f'cannot bind token for serviceaccount "{name}" to pod running with '
                    "different serviceaccount name."
                )
            bound = pod
            node_name = (pod.get("spec") or {}).get("nodeName")
            if node_name:
                # ServiceAccountTokenPodNodeInfo: a missing node is no error
                node = self._store.get("nodes", None, str(node_name))
        elif group == "" and kind == "Node":
            node = bound = self._get("nodes", None, ref_name)
        elif group == "" and kind == "Secret":
            secret = bound = self._get("secrets", namespace, ref_name)
        else:
            raise bad_request(
                f'cannot bind token for serviceaccount "{name}" to object of kind '
                f'"{_gvk_string(api_version, kind)}"'
            )
        ref_uid = str(ref.get("uid") or "")
        if ref_uid and ref_uid != bound["metadata"].get("uid"):
            # errors.NewConflict(GroupResource{Resource: gvk.Kind}, ...)
            raise error(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {kind} "{ref_name}": the UID in the bound '
                f"object reference ({ref_uid}) does not match the UID in record. The object "
                "might have been deleted and then recreated",
                {"name": ref_name, "kind": kind},
            )
        return pod, node, secret

    # ----------------------------------------------------------------- issuing

    def _sign(
        self,
        sa: JSON,
        audiences: Sequence[str],
        expiration_seconds: int,
        pod: JSON | None,
        node: JSON | None,
        secret: JSON | None,
        when: datetime.datetime,
    ) -> IssuedToken:
        meta = sa["metadata"]
        namespace, name = str(meta["namespace"]), str(meta["name"])
        private: JSON = {
            "namespace": namespace,
            "serviceaccount": {"name": name, "uid": str(meta.get("uid", ""))},
        }

        def ref(obj: JSON) -> JSON:
            return {"name": obj["metadata"]["name"], "uid": obj["metadata"].get("uid", "")}

        if pod is not None:
            private["pod"] = ref(pod)
            if node is not None:
                private["node"] = ref(node)
        elif secret is not None:
            private["secret"] = ref(secret)
        elif node is not None:
            private["node"] = ref(node)
        iat = int(when.timestamp())
        expiration = when + datetime.timedelta(seconds=expiration_seconds)
        claims: JSON = {
            "aud": list(audiences) or [self.issuer],
            "exp": int(expiration.timestamp()),
            "iat": iat,
            "iss": self.issuer,
            "jti": str(uuid.uuid4()),
            "kubernetes.io": private,
            "nbf": iat,
            "sub": f"system:serviceaccount:{namespace}:{name}",
        }
        token = self.key.sign(claims)
        if self._on_issue is not None:
            self._on_issue(namespace, name, ref(pod)["name"] if pod else "", claims)
        return IssuedToken(token, claims, expiration)

    def _capped(self, expiration_seconds: int) -> int:
        if 0 < self.max_expiration < expiration_seconds:
            return self.max_expiration  # "requested expiration ... shortened to ..."
        return expiration_seconds

    def issue(
        self,
        namespace: str,
        name: str,
        *,
        audiences: Sequence[str],
        expiration_seconds: int = DEFAULT_EXPIRATION_SECONDS,
        pod: str | None = None,
        now: datetime.datetime | float | None = None,
    ) -> IssuedToken:
        """Sign a token for service account ``name``, bound to ``pod`` if given.

        The lookups and refusals of a TokenRequest apply (the service account and the
        pod must exist and match), as does the maximum expiration; the 10-minute
        minimum does not, and ``now`` may be any time (to mint expired tokens).
        """
        sa = self._get("serviceaccounts", namespace, name)
        bound: tuple[JSON | None, JSON | None, JSON | None] = (None, None, None)
        if pod is not None:
            bound = self._bound_objects(namespace, name, {"kind": "Pod", "name": pod})
        return self._sign(
            sa, audiences, self._capped(expiration_seconds), *bound, _as_datetime(now)
        )

    def create(self, namespace: str, name: str, body: Any) -> JSON:
        """``POST serviceaccounts/<name>/token``: the TokenRequest answered (201)."""
        if not isinstance(body, dict):
            raise bad_request(
                "the body of the request must be a JSON object, got " + type(body).__name__
            )
        api_version, kind = body.get("apiVersion"), body.get("kind")
        if api_version and api_version != TOKEN_REQUEST_API_VERSION:
            raise bad_request(
                f"the API version in the data ({api_version}) does not match the expected API "
                f"version ({TOKEN_REQUEST_API_VERSION})"
            )
        if kind and kind != "TokenRequest":
            raise bad_request(
                f"the kind in the data ({kind}) does not match the expected kind (TokenRequest)"
            )
        meta = body.get("metadata") or {}
        spec = body.get("spec") or {}
        if not isinstance(meta, dict):
            raise _decode_error("TokenRequest.metadata", meta, "v1.ObjectMeta")
        if not isinstance(spec, dict):
            raise _decode_error("TokenRequest.spec", spec, "v1.TokenRequestSpec")
        audiences = spec.get("audiences")
        if audiences is None:
            audiences = []
        if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
            raise _decode_error("TokenRequestSpec.spec.audiences", audiences, "[]string")
        expiration = spec.get("expirationSeconds")
        if expiration is None:
            expiration = DEFAULT_EXPIRATION_SECONDS
        if not isinstance(expiration, int) or isinstance(expiration, bool):
            raise _decode_error("TokenRequestSpec.spec.expirationSeconds", expiration, "int64")
        ref = spec.get("boundObjectRef")
        if ref is not None and not isinstance(ref, dict):
            raise _decode_error(
                "TokenRequestSpec.spec.boundObjectRef", ref, "v1.BoundObjectReference"
            )

        if meta.get("name") and meta["name"] != name:
            raise _invalid(
                name,
                [
                    FieldError(
                        "Invalid",
                        "metadata.name",
                        "must match the service account name if specified",
                        meta["name"],
                    )
                ],
            )
        if meta.get("namespace") and meta["namespace"] != namespace:
            raise _invalid(
                name,
                [
                    FieldError(
                        "Invalid",
                        "metadata.namespace",
                        "must match the service account namespace if specified",
                        meta["namespace"],
                    )
                ],
            )
        sa = self._get("serviceaccounts", namespace, name)
        if not audiences:
            audiences = [self.issuer]  # the API server's own audiences
        when = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=self.clock_offset)
        errs: list[FieldError] = []
        if expiration < MIN_EXPIRATION_SECONDS:
            errs.append(
                FieldError(
                    "Invalid",
                    "spec.expirationSeconds",
                    "may not specify a duration less than 10 minutes",
                    expiration,
                )
            )
        if expiration > _MAX_EXPIRATION_SECONDS:
            errs.append(
                FieldError(
                    "Invalid",
                    "spec.expirationSeconds",
                    "may not specify a duration larger than 2^32 seconds",
                    expiration,
                )
            )
        if errs:
            raise _invalid("", errs)
        pod = node = secret = None
        out_ref: JSON | None = None
        if ref is not None:
            pod, node, secret = self._bound_objects(namespace, name, ref)
            out_ref = {k: ref[k] for k in ("kind", "apiVersion", "name", "uid") if ref.get(k)}
        expiration = self._capped(expiration)
        issued = self._sign(sa, audiences, expiration, pod, node, secret, when)
        out_meta: JSON = {k: v for k, v in meta.items() if k not in ("name", "namespace")}
        return {
            "kind": "TokenRequest",
            "apiVersion": TOKEN_REQUEST_API_VERSION,
            "metadata": {
                "name": name,
                "namespace": namespace,
                **out_meta,
                "creationTimestamp": format_time(when),
            },
            "spec": {
                "audiences": list(audiences),
                "expirationSeconds": expiration,
                "boundObjectRef": out_ref,
            },
            "status": {
                "token": issued.token,
                "expirationTimestamp": format_time(issued.expiration),
            },
        }
