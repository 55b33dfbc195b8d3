"""An Azure Resource Manager emulator for the controller (MIC): VMs, scale sets, identities.

Why it exists: the controller puts user-assigned managed identities on the
nodes' VMs and VM scale sets through ARM, with the production client path -
``azure.mgmt.compute.aio.ComputeManagementClient`` over an ``azure.identity.aio``
credential.  ARM cannot be reached from here, and a mock of the SDK would test
nothing but the mock, so this package stands in for the other end of the wire:
an HTTPS server (certificate from :class:`nmi_sandbox.tls.CertificateAuthority`)
that answers what the real SDK sends, the way ARM and Microsoft.Compute answer.

Emulated faithfully:

* paths exactly as ARM's, matched case-insensitively: ``GET``/``PATCH``
  ``/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/
  virtualMachines/{vm}`` and ``.../virtualMachineScaleSets/{vmss}``, ``GET``
  ``.../virtualMachineScaleSets/{vmss}/virtualMachines/{instanceId}`` and the
  operation status ``/subscriptions/{sub}/providers/Microsoft.Compute/
  locations/{location}/operations/{id}``;
* ``api-version`` required (``MissingApiVersionParameter``; a malformed one
  ``InvalidApiVersionParameter``; a well-formed one compute does not have
  ``NoRegisteredProviderFound`` with ARM's wording), accepting the version
  azure-mgmt-compute 39 sends (2026-04-01) and older ones back to 2018-06-01
  (2019-12-01 is aad-pod-identity's);
* bearer tokens: RS256 signature against the Azure AD / IMDS emulators' keys,
  ``aud`` one of the ARM audiences (compared as Entra ID does, with or without
  the trailing ``/``: Entra ID puts ``https://management.azure.com`` in the
  token for the scope ``https://management.azure.com/.default``), expiry with
  five minutes' skew, optionally the tenant; failures are 401 with ARM's codes
  (``AuthenticationFailed``, ``InvalidAuthenticationToken``,
  ``InvalidAuthenticationTokenAudience``, ``ExpiredAuthenticationToken``,
  ``InvalidAuthenticationTokenTenant``) and a ``WWW-Authenticate: Bearer
  authorization_uri=..., error="invalid_token"`` challenge;
* the GET shapes (``id``, ``name``, ``type``, ``location``, ``identity`` with
  ``principalId``/``tenantId`` for the system identity and
  ``userAssignedIdentities`` {id: {principalId, clientId}}, ``properties``
  with ``provisioningState``, ``etag``); ARM omits ``identity`` for type None;
* the identity PATCH merge and its errors (see
  :func:`nmi_sandbox.arm.resources.merge_identity`): ``{}`` adds, ``null``
  removes, a type without ``UserAssigned`` drops them all; an identity that
  does not exist fails the whole PATCH with ``FailedIdentityOperation`` whose
  message quotes the identity id (``... Response: '{"error":{"code":"NotFound",
  "message":"Resource '<id>' was not found."}}'.'.``), and
  ``LinkedAuthorizationFailed`` (403) quotes the denied ids comma-separated in
  ``on the linked scope(s) '<ids>'`` - both parse with aad-pod-identity's
  ``extractIdentitiesFromError`` pattern;
* long-running operations as compute runs them: PATCH answers 200 with the
  resource (the target identity block, ``provisioningState: Updating``) and
  ``Azure-AsyncOperation`` (``.../locations/{loc}/operations/{id}?p=...&api-version=...``),
  ``Location`` (same, ``monitor=true``) and ``Azure-AsyncNotification``;
  the operation answers ``{"startTime","status":"InProgress","name"}`` until
  ``operation_duration`` has passed, then ``Succeeded`` (with ``endTime``) or
  ``Failed`` with ``error``.  GETs show the identities in effect - what a
  node's IMDS serves - which change only when the operation succeeds.  A
  PATCH while an operation runs preempts it, as compute does: the old one
  ends ``Canceled`` with ``OperationPreempted`` and the new one merges onto
  the old one's target (``concurrent_patches = "conflict"`` answers 409
  instead);
* throttling with 429, ``Retry-After`` and the ``x-ms-ratelimit-remaining-*``
  headers, compute's ``TooManyRequests`` or ARM's
  ``SubscriptionRequestsThrottled`` body; ``x-ms-request-id`` (the operation
  id for a PATCH, as compute does), ``x-ms-correlation-request-id`` and
  ``x-ms-routing-request-id`` on every answer.

Knobs (``patch_latency``, ``get_latency``, ``operation_duration``,
:meth:`ArmServer.throttle`, :meth:`ArmServer.fail_identity`,
:meth:`ArmServer.fail_next_operation`, :meth:`ArmServer.fail_next`) and
counters (``requests`` keyed ``"GET vmss"``, ``"PATCH vm"``, ``"GET operation"``,
``outcomes``, ``log`` with each caller's ``appid``/``oid``, ``patches``)
let tests drive and observe the controller; helpers (``add_identity``,
``add_vm``, ``add_vmss``, ``set_identities``, ``identities_on``,
``provider_id``, ``client_ids_on_node``) build the world and read it back,
and ``client_ids_on_node`` is what the IMDS emulator's ``identities_on_node``
hook calls so that a node serves only identities ARM shows on it.

Deliberate limits: only the identity block of a PATCH is applied (other keys
are recorded in ``patches`` and ignored); no PUT, DELETE, list or
instance-view; the rate-limit headers count down but only the knobs throttle;
the per-resource identity limit (``max_identities``, 100) and the wording of
its error, of the "Request requires identities to be assigned" refusal of an
empty ``UserAssigned`` set, and of the ``Location`` (``monitor=true``) answers
are the emulator's best reading, not verified against Azure.
"""

from __future__ import annotations

from .gateway import DEFAULT_AUDIENCES
from .resources import (
    COMPUTE_API_VERSIONS,
    DEFAULT_LOCATION,
    DEFAULT_RESOURCE_GROUP,
    DEFAULT_SUBSCRIPTION,
    SDK_API_VERSION,
    ArmError,
    UserAssignedIdentity,
    identity_resource_id,
    parse_node_id,
)
from .server import ArmServer, PatchRecord, RecordedRequest

__all__ = [
    "COMPUTE_API_VERSIONS",
    "DEFAULT_AUDIENCES",
    "DEFAULT_LOCATION",
    "DEFAULT_RESOURCE_GROUP",
    "DEFAULT_SUBSCRIPTION",
    "SDK_API_VERSION",
    "ArmError",
    "ArmServer",
    "PatchRecord",
    "RecordedRequest",
    "UserAssignedIdentity",
    "identity_resource_id",
    "parse_node_id",
]
