"""The deployment manifests in ``daemonset/``: rendered, schema-checked, held to their promises.

Layout: ``crds/`` (the four CRDs), ``nmi/`` (namespace, nmi's RBAC and DaemonSet) and
``mic/`` (a kustomize Component: the MIC's RBAC, Deployment and exception) are composed by
two entry points, ``daemonset/`` (standard mode: crds + nmi + mic) and
``daemonset/managed/`` (managed mode: crds + nmi with ``--operation-mode=managed``).
This file checks the layout, both entry points and nmi's objects; the MIC's objects are
held to their promises in ``test_manifests_mic.py``.

Everything runs offline:

* ``kubectl kustomize`` renders each entry point (skipped only where kubectl is absent);
* built-in kinds are validated against the Kubernetes OpenAPI schemas shipped in the
  ``kubernetes-validate`` package (strict: unknown fields are errors);
* custom resources are validated with ``jsonschema`` against the ``openAPIV3Schema`` of
  the CRDs in ``crds/crds.yaml``, read the way the API server reads it (``nullable``,
  ``x-kubernetes-int-or-string``, embedded resources), and a pruning pass reports the
  fields the API server would silently drop;
* ``kubectl apply -k --dry-run=client`` still needs API discovery and a GET per object,
  so it runs against a stub API server on loopback that knows the kinds and has none of
  the objects, and must see no write; a second stub that has never seen the CRDs shows
  why ``crds/`` is applied first on a fresh cluster.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
import subprocess
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from nmi.cli import build_parser
from nmi.kube import objects
from nmi.tokens.credentials import CredentialError, client_certificate_from, client_secret_from
from nmi_sandbox import manifests as world

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "daemonset"  # the standard-mode entry point
MANAGED = DEPLOY / "managed"  # the managed-mode entry point
CRDS_DIR = DEPLOY / "crds"
NMI_DIR = DEPLOY / "nmi"
MIC_DIR = DEPLOY / "mic"
EXAMPLES = DEPLOY / "examples"
ENTRY_POINTS = {"standard": DEPLOY, "managed": MANAGED}
PIECES = (CRDS_DIR, NMI_DIR, MIC_DIR)
NAMESPACE = "nmi-system"
GROUP = "aadpodidentity.k8s.io"
GROUP_VERSION = f"{GROUP}/v1"
# A Kubernetes version whose schemas kubernetes-validate ships (it has 1.25 onwards).
K8S_VERSION = "1.30"
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl is not installed: cannot render or dry-run the kustomization"
)

Obj = dict[str, Any]


# ------------------------------------------------------------------------------- loading


def _docs(text: str) -> list[Obj]:
    return [d for d in yaml.safe_load_all(text) if d]


def _manifest_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.yaml") if p.name != "kustomization.yaml")


def _load(folder: Path) -> list[Obj]:
    return [obj for path in _manifest_files(folder) for obj in _docs(path.read_text())]


def _ident(obj: Obj) -> str:
    meta = obj.get("metadata", {})
    ns = meta.get("namespace")
    return f"{obj['kind']}/{ns}/{meta['name']}" if ns else f"{obj['kind']}/{meta['name']}"


def _one(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [
        o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


CRD_SOURCES = _load(CRDS_DIR)
NMI_SOURCES = _load(NMI_DIR)
MIC_SOURCES = _load(MIC_DIR)
# Everything the standard entry point installs, as written in the files.
SOURCES = CRD_SOURCES + NMI_SOURCES + MIC_SOURCES
EXAMPLE_OBJECTS = _load(EXAMPLES)
CRDS: dict[str, Obj] = {crd["spec"]["names"]["kind"]: crd for crd in CRD_SOURCES}
CUSTOM_KINDS = {
    "AzureIdentity": "azureidentities",
    "AzureIdentityBinding": "azureidentitybindings",
    "AzureAssignedIdentity": "azureassignedidentities",
    "AzurePodIdentityException": "azurepodidentityexceptions",
}


def _kubectl(*args: str, kubeconfig: Path | None = None) -> str:
    assert KUBECTL is not None
    cmd = [KUBECTL]
    if kubeconfig is not None:
        cmd += ["--kubeconfig", str(kubeconfig), "--cache-dir", str(kubeconfig.parent / "cache")]
    proc = subprocess.run(
        [*cmd, *args], capture_output=True, text=True, timeout=60, check=False, cwd=ROOT
    )
    assert proc.returncode == 0, f"kubectl {' '.join(args)} failed:\n{proc.stderr}"
    return proc.stdout


def _render(folder: Path) -> list[Obj]:
    if KUBECTL is None:
        pytest.skip(f"kubectl is not installed: cannot render {folder.relative_to(ROOT)}/")
    return _docs(_kubectl("kustomize", str(folder)))


@pytest.fixture(scope="module")
def rendered() -> list[Obj]:
    """The standard-mode install: ``kubectl kustomize daemonset/``."""
    return _render(DEPLOY)


@pytest.fixture(scope="module")
def rendered_managed() -> list[Obj]:
    """The managed-mode install: ``kubectl kustomize daemonset/managed/``."""
    return _render(MANAGED)


@pytest.fixture(scope="module", params=sorted(ENTRY_POINTS))
def entry_point(request: pytest.FixtureRequest) -> tuple[Path, list[Obj]]:
    """Each entry point (standard, managed) with what it renders."""
    folder = ENTRY_POINTS[request.param]
    return folder, _render(folder)


@pytest.fixture(scope="module")
def rendered_examples() -> list[Obj]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: cannot render daemonset/examples/")
    return _docs(_kubectl("kustomize", str(EXAMPLES)))


# --------------------------------------------------------------- kustomizations, rendering

NMI_OBJECTS = [
    f"Namespace/{NAMESPACE}",
    *(f"CustomResourceDefinition/{p}.{GROUP}" for p in CUSTOM_KINDS.values()),
    f"ServiceAccount/{NAMESPACE}/nmi",
    "ClusterRole/nmi",
    "ClusterRoleBinding/nmi",
    f"DaemonSet/{NAMESPACE}/nmi",
]
MIC_OBJECTS = [
    f"ServiceAccount/{NAMESPACE}/nmi-mic",
    "ClusterRole/nmi-mic",
    "ClusterRoleBinding/nmi-mic",
    f"Role/{NAMESPACE}/nmi-mic",
    f"RoleBinding/{NAMESPACE}/nmi-mic",
    f"Deployment/{NAMESPACE}/nmi-mic",
    f"AzurePodIdentityException/{NAMESPACE}/nmi-mic",
]
# The containers of each entry point, as "Kind/name/container": all of them run one image.
CONTAINERS = {
    "standard": {"DaemonSet/nmi/nmi", "Deployment/nmi-mic/mic"},
    "managed": {"DaemonSet/nmi/nmi"},
}
MANAGED_ARG = "--operation-mode=managed"


def _kustomization(folder: Path) -> Obj:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


def _containers(objs: list[Obj]) -> dict[str, Obj]:
    """Every container (init containers too) of every workload, as "Kind/name/container"."""
    out: dict[str, Obj] = {}
    for obj in objs:
        pod = obj.get("spec", {}).get("template", {}).get("spec")
        if pod is None:
            continue
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            out[f"{obj['kind']}/{obj['metadata']['name']}/{container['name']}"] = container
    return out


def _image(entry: Obj) -> str:
    return f"{entry.get('newName', entry['name'])}:{entry['newTag']}"


def test_each_piece_lists_every_manifest_of_its_folder() -> None:
    for folder in (*PIECES, EXAMPLES):
        kust = _kustomization(folder)
        assert sorted(kust["resources"]) == sorted(p.name for p in _manifest_files(folder)), folder
        # Pieces are leaves: the entry points compose them, set the namespace and the image.
        assert "namespace" not in kust, folder
        assert "images" not in kust, folder
        assert not kust.get("components") and not kust.get("patches"), folder
    assert _kustomization(MIC_DIR)["kind"] == "Component"
    assert _kustomization(MIC_DIR)["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"
    for folder in (CRDS_DIR, NMI_DIR, EXAMPLES, DEPLOY, MANAGED):
        assert _kustomization(folder)["kind"] == "Kustomization", folder


def test_every_manifest_belongs_to_one_piece_or_the_examples() -> None:
    kustomized = {p.parent for p in DEPLOY.rglob("kustomization.yaml")}
    assert kustomized == {DEPLOY, MANAGED, *PIECES, EXAMPLES}
    manifests = {p.parent for p in DEPLOY.rglob("*.y*ml") if p.name != "kustomization.yaml"}
    assert manifests <= {*PIECES, EXAMPLES}, "the entry points hold no manifest of their own"
    assert not list(DEPLOY.rglob("*.yml")), "one spelling: .yaml"
    assert not list(DEPLOY.rglob("README*"))


def test_entry_points_compose_the_pieces() -> None:
    standard, managed = _kustomization(DEPLOY), _kustomization(MANAGED)
    assert standard["resources"] == ["crds", "nmi"]
    assert standard["components"] == ["mic"]
    assert "patches" not in standard, "standard is nmi's default mode: nothing to patch"
    assert managed["resources"] == ["../crds", "../nmi"]
    assert "components" not in managed, "managed mode installs no MIC"
    for kust in (standard, managed):
        assert kust["namespace"] == NAMESPACE
        assert [i["name"] for i in kust["images"]] == ["nmi"]
        assert not any("example" in r for r in kust["resources"])
    assert standard["images"] == managed["images"]


def test_managed_patch_appends_the_operation_mode_to_nmi_only() -> None:
    (patch,) = _kustomization(MANAGED)["patches"]
    assert patch["target"] == {"group": "apps", "version": "v1", "kind": "DaemonSet", "name": "nmi"}
    ops = yaml.safe_load(patch["patch"])
    assert ops == [
        # Guards the index: the build fails if the first container is not nmi.
        {"op": "test", "path": "/spec/template/spec/containers/0/name", "value": "nmi"},
        {"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": MANAGED_ARG},
    ]


def test_every_object_is_labelled_with_its_component() -> None:
    for obj in SOURCES:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "nmi", _ident(obj)
        assert labels["app.kubernetes.io/part-of"] == "nmi", _ident(obj)
        if obj in MIC_SOURCES:
            expected: str | None = "mic"
        elif obj in CRD_SOURCES or obj["kind"] == "Namespace":
            expected = None  # shared by nmi and the MIC
        else:
            expected = "nmi"
        assert labels.get("app.kubernetes.io/component") == expected, _ident(obj)


@needs_kubectl
def test_standard_entry_point_installs_nmi_and_the_mic(rendered: list[Obj]) -> None:
    assert sorted(_ident(o) for o in rendered) == sorted(NMI_OBJECTS + MIC_OBJECTS)
    assert sorted(_ident(o) for o in rendered) == sorted(_ident(o) for o in SOURCES)
    assert sorted(_ident(o) for o in MIC_SOURCES) == sorted(MIC_OBJECTS)
    assert all(o["metadata"].get("namespace") in (None, NAMESPACE) for o in rendered)


@needs_kubectl
def test_managed_entry_point_installs_nmi_and_no_mic_object(rendered_managed: list[Obj]) -> None:
    assert sorted(_ident(o) for o in rendered_managed) == sorted(NMI_OBJECTS)
    for obj in rendered_managed:
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/component") != "mic", _ident(obj)
        assert "mic" not in obj["metadata"]["name"], _ident(obj)
    assert not [o for o in rendered_managed if o["kind"] in ("Deployment", "Role")]
    assert not [o for o in rendered_managed if o["apiVersion"] == GROUP_VERSION]


@needs_kubectl
def test_managed_differs_from_standard_only_by_the_mic_and_the_mode(
    rendered: list[Obj], rendered_managed: list[Obj]
) -> None:
    """nmi's objects, RBAC included, are the same in both modes but for one argument."""
    standard = {_ident(o): o for o in rendered if _ident(o) not in MIC_OBJECTS}
    managed = {_ident(o): copy.deepcopy(o) for o in rendered_managed}
    ds = f"DaemonSet/{NAMESPACE}/nmi"
    (container,) = managed[ds]["spec"]["template"]["spec"]["containers"]
    (std_container,) = standard[ds]["spec"]["template"]["spec"]["containers"]
    assert container["args"] == [*std_container["args"], MANAGED_ARG]
    container["args"].remove(MANAGED_ARG)
    assert managed == standard


@needs_kubectl
def test_render_rewrites_the_image_of_every_container(
    entry_point: tuple[Path, list[Obj]],
) -> None:
    folder, objs = entry_point
    (entry,) = _kustomization(folder)["images"]
    containers = _containers(objs)
    mode = next(m for m, f in ENTRY_POINTS.items() if f == folder)
    assert set(containers) == CONTAINERS[mode]
    assert {name: c["image"] for name, c in containers.items()} == dict.fromkeys(
        containers, _image(entry)
    )


def _set_image(entry_point: Path, spec: str) -> None:
    """``kustomize edit set image <spec>`` in ``entry_point``; without the kustomize binary
    (kubectl has no ``edit``), the same edit of its ``images:`` stanza."""
    kustomize = shutil.which("kustomize")
    if kustomize is not None:
        subprocess.run(
            [kustomize, "edit", "set", "image", spec], cwd=entry_point, check=True, timeout=60
        )
        return
    name, _, image = spec.partition("=")
    new_name, _, new_tag = image.rpartition(":")
    path = entry_point / "kustomization.yaml"
    kust = yaml.safe_load(path.read_text())
    kust["images"] = [i for i in kust.get("images", []) if i["name"] != name]
    kust["images"].append({"name": name, "newName": new_name, "newTag": new_tag})
    path.write_text(yaml.safe_dump(kust))


@needs_kubectl
@pytest.mark.parametrize("mode", sorted(ENTRY_POINTS))
def test_set_image_at_the_entry_point_reaches_every_container(mode: str, tmp_path: Path) -> None:
    tree = tmp_path / "daemonset"
    shutil.copytree(DEPLOY, tree)
    folder = tree / ENTRY_POINTS[mode].relative_to(DEPLOY)
    image = "registry.example/team/nmi:9.8.7"
    _set_image(folder, f"nmi={image}")
    containers = _containers(_docs(_kubectl("kustomize", str(folder))))
    assert set(containers) == CONTAINERS[mode]
    assert {c["image"] for c in containers.values()} == {image}


@needs_kubectl
def test_examples_render_as_loaded(rendered_examples: list[Obj]) -> None:
    assert sorted(_ident(o) for o in rendered_examples) == sorted(
        _ident(o) for o in EXAMPLE_OBJECTS
    )


# ------------------------------------------------------- Kubernetes OpenAPI (built-in kinds)


def _builtin(objs: list[Obj]) -> list[Obj]:
    return [o for o in objs if o["apiVersion"] != GROUP_VERSION]


def _k8s_validate(obj: Obj) -> None:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{_ident(obj)} is invalid for Kubernetes {K8S_VERSION}: {path}: {exc.message}")


@pytest.mark.parametrize(
    "obj", _builtin(SOURCES) + _builtin(EXAMPLE_OBJECTS), ids=lambda o: _ident(o)
)
def test_manifest_validates_against_kubernetes_openapi(obj: Obj) -> None:
    _k8s_validate(obj)


@needs_kubectl
def test_rendered_objects_validate_against_kubernetes_openapi(
    entry_point: tuple[Path, list[Obj]],
) -> None:
    _, objs = entry_point
    builtin = _builtin(objs)
    assert builtin
    for obj in builtin:
        _k8s_validate(obj)


@needs_kubectl
def test_rendered_custom_resources_are_accepted_by_their_crds(
    entry_point: tuple[Path, list[Obj]],
) -> None:
    """Custom objects of an entry point (the MIC's exception) against crds/ (strict)."""
    _, objs = entry_point
    for obj in objs:
        if obj["apiVersion"] == GROUP_VERSION:
            _accept(obj)


def test_kubernetes_validate_rejects_a_broken_daemonset() -> None:
    """The offline validation has teeth: an unknown field and a wrong type both fail."""
    ds = copy.deepcopy(_one(SOURCES, "DaemonSet"))
    ds["spec"]["template"]["spec"]["hostNetwrk"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSION, strict=True)
    ds = copy.deepcopy(_one(SOURCES, "DaemonSet"))
    ds["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "30"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSION, strict=True)


# ------------------------------------------------------------------------------------ CRDs

INT_OR_STRING = [{"type": "integer"}, {"type": "string"}]
# Keys a structural schema must not set inside allOf/anyOf/oneOf/not (nor x-kubernetes-*).
NOT_IN_JUNCTORS = {"type", "description", "title", "default", "additionalProperties", "nullable"}


def _structural_problems(node: Any, path: str, *, resource_root: bool = False) -> list[str]:
    """The API server's structural-schema rules (apiextensions-apiserver ValidateStructural).

    As far as these CRDs use schema features: a type everywhere except int-or-string and
    preserve-unknown-fields nodes, the two int-or-string patterns, no generics or
    extensions inside junctors, arrays with items, embedded resources as objects with
    string apiVersion/kind, root metadata restricted to nothing but name/generateName.
    """
    if not isinstance(node, dict):
        return [f"{path}: not a schema"]
    problems: list[str] = []
    preserve = node.get("x-kubernetes-preserve-unknown-fields")
    int_or_string = node.get("x-kubernetes-int-or-string")
    for key, value in (
        ("x-kubernetes-preserve-unknown-fields", preserve),
        ("x-kubernetes-int-or-string", int_or_string),
        ("x-kubernetes-embedded-resource", node.get("x-kubernetes-embedded-resource")),
    ):
        if value is not None and value is not True:
            problems.append(f"{path}: {key} must be true or absent")
    if int_or_string and preserve:
        problems.append(f"{path}: int-or-string excludes preserve-unknown-fields")
    if int_or_string:
        if "type" in node:
            problems.append(f"{path}: int-or-string must not set type")
        if "anyOf" in node and node["anyOf"] != INT_OR_STRING:
            problems.append(f"{path}: int-or-string anyOf must be [integer, string]")
    elif not node.get("type") and preserve is not True:
        problems.append(f"{path}: no type")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: properties and additionalProperties are exclusive")
    if ("properties" in node or "additionalProperties" in node) and node.get("type") != "object":
        problems.append(f"{path}: properties on a non-object")
    if ("items" in node) != (node.get("type") == "array"):
        problems.append(f"{path}: items and type array go together")
    embedded = node.get("x-kubernetes-embedded-resource") is True
    if embedded and (node.get("type") != "object" or "additionalProperties" in node):
        problems.append(f"{path}: an embedded resource must be an object with properties")
    if resource_root and "additionalProperties" in node:
        problems.append(f"{path}: additionalProperties at the root")
    if resource_root or embedded:
        props = node.get("properties", {})
        for key in ("apiVersion", "kind"):
            if key in props and props[key].get("type") != "string":
                problems.append(f"{path}.{key}: must be a string")
        meta = props.get("metadata")
        if meta is not None and meta != {"type": "object"}:
            problems.append(f"{path}.metadata: only name/generateName may be restricted")
    for junctor in ("allOf", "anyOf", "oneOf", "not"):
        if junctor not in node:
            continue
        subs = node[junctor] if isinstance(node[junctor], list) else [node[junctor]]
        allowed = int_or_string and (
            (junctor == "anyOf" and subs == INT_OR_STRING)
            or (junctor == "allOf" and subs and subs[0] == {"anyOf": INT_OR_STRING})
        )
        for i, sub in enumerate(subs):
            if allowed and (junctor == "anyOf" or i == 0):
                continue
            bad = sorted(k for k in sub if k in NOT_IN_JUNCTORS or k.startswith("x-kubernetes-"))
            if bad:
                problems.append(f"{path}.{junctor}[{i}]: {bad} not allowed in a junctor")
            outside = set(node.get("properties", {}))
            if set(sub.get("properties", {})) - outside:
                problems.append(f"{path}.{junctor}[{i}]: fields not specified outside")
            if "metadata" in sub.get("properties", {}):
                problems.append(f"{path}.{junctor}[{i}]: metadata in a nested context")
    for name, child in node.get("properties", {}).items():
        problems += _structural_problems(child, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        problems += _structural_problems(node["additionalProperties"], f"{path}[*]")
    if "items" in node:
        problems += _structural_problems(node["items"], f"{path}[]")
    return problems


def _schema(kind: str) -> Obj:
    (version,) = CRDS[kind]["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def _as_json_schema(node: Obj) -> Obj:
    """An OpenAPI v3 CRD schema as JSON Schema, with the API server's reading of it."""
    out: Obj = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {k: _as_json_schema(v) for k, v in value.items()}
        elif key in ("items", "not") or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = _as_json_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [_as_json_schema(v) for v in value]
        elif key.startswith("x-kubernetes-") or key in ("nullable", "format"):
            continue
        else:
            out[key] = value
    if node.get("x-kubernetes-embedded-resource"):
        # The API server requires apiVersion and kind of an embedded object, non-empty.
        out = {
            "allOf": [
                out,
                {
                    "required": ["apiVersion", "kind"],
                    "properties": {
                        "apiVersion": {"type": "string", "minLength": 1},
                        "kind": {"type": "string", "minLength": 1},
                    },
                },
            ]
        }
    if node.get("nullable"):
        out = {"anyOf": [{"type": "null"}, out]}
    return out


def _validator(kind: str) -> jsonschema.Draft4Validator:
    schema = _as_json_schema(_schema(kind))
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def _pruned(value: Any, node: Obj, path: str = "", *, resource_root: bool = True) -> list[str]:
    """Paths of the fields the API server would prune from ``value`` (drop silently)."""
    out: list[str] = []
    if isinstance(value, dict):
        props = node.get("properties", {})
        extra = node.get("additionalProperties")
        keep_unknown = node.get("x-kubernetes-preserve-unknown-fields") is True
        envelope = resource_root or node.get("x-kubernetes-embedded-resource") is True
        for key, child in value.items():
            where = f"{path}.{key}"
            if envelope and key in ("apiVersion", "kind", "metadata"):
                continue  # kept by the server itself (metadata as ObjectMeta)
            if key in props:
                out += _pruned(child, props[key], where, resource_root=False)
            elif isinstance(extra, dict):
                out += _pruned(child, extra, where, resource_root=False)
            elif not keep_unknown:
                out.append(where)
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for i, item in enumerate(value):
            out += _pruned(item, node["items"], f"{path}[{i}]", resource_root=False)
    return out


def _accept(obj: Obj) -> None:
    """``obj`` must be accepted by its CRD, and stored without losing a field."""
    kind = obj["kind"]
    errors = sorted(_validator(kind).iter_errors(obj), key=lambda e: list(e.absolute_path))
    assert not errors, "; ".join(
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
    )
    assert _pruned(obj, _schema(kind)) == [], f"the API server would prune fields of {kind}"


def _reject(obj: Obj) -> None:
    assert not _validator(obj["kind"]).is_valid(obj), f"{obj['kind']} was accepted: {obj}"


@pytest.mark.parametrize("kind", sorted(CUSTOM_KINDS))
def test_crd_validates_as_apiextensions_v1(kind: str) -> None:
    crd = CRDS[kind]
    _k8s_validate(crd)
    spec = crd["spec"]
    plural = CUSTOM_KINDS[kind]
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == f"{plural}.{GROUP}"
    assert crd["metadata"]["annotations"]["api-approved.kubernetes.io"].startswith("unapproved")
    assert spec["group"] == GROUP
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == kind
    assert spec["names"]["plural"] == plural
    assert spec["names"]["singular"] == kind.lower()
    assert spec["names"]["listKind"] == f"{kind}List"
    assert not spec.get("preserveUnknownFields")
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1", True, True)


def test_crds_are_exactly_the_four_kinds() -> None:
    assert sorted(CRDS) == sorted(CUSTOM_KINDS)


@pytest.mark.parametrize("kind", sorted(CUSTOM_KINDS))
def test_crd_schema_is_structural(kind: str) -> None:
    schema = _schema(kind)
    assert schema["type"] == "object"
    assert _structural_problems(schema, kind, resource_root=True) == []
    jsonschema.Draft4Validator.check_schema(_as_json_schema(schema))


def test_structural_check_has_teeth() -> None:
    assert _structural_problems({"type": "object", "properties": {"a": {}}}, "x")
    assert _structural_problems(
        {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "string"}]}, "x"
    )
    assert _structural_problems({"type": "string", "anyOf": [{"type": "string"}]}, "x")
    assert _structural_problems(
        {"type": "object", "properties": {"metadata": {"type": "object", "required": ["x"]}}},
        "x",
        resource_root=True,
    )


PRINTER_COLUMNS = {
    "AzureIdentity": [
        ("Type", ".spec.type"),
        ("ClientID", ".spec.clientID"),
        ("Age", ".metadata.creationTimestamp"),
    ],
    "AzureIdentityBinding": [
        ("AzureIdentity", ".spec.azureIdentity"),
        ("Selector", ".spec.selector"),
        ("Age", ".metadata.creationTimestamp"),
    ],
    "AzureAssignedIdentity": [
        ("Pod", ".spec.pod"),
        ("Namespace", ".spec.podNamespace"),
        ("Node", ".spec.nodename"),
        ("State", ".status.status"),
        ("Age", ".metadata.creationTimestamp"),
    ],
    "AzurePodIdentityException": [("Age", ".metadata.creationTimestamp")],
}


@pytest.mark.parametrize("kind", sorted(CUSTOM_KINDS))
def test_crd_printer_columns(kind: str) -> None:
    (version,) = CRDS[kind]["spec"]["versions"]
    columns = version["additionalPrinterColumns"]
    assert [(c["name"], c["jsonPath"]) for c in columns] == PRINTER_COLUMNS[kind]
    for column in columns:
        assert column["type"] == ("date" if column["name"] == "Age" else "string")


def test_status_subresource_except_on_azureassignedidentity() -> None:
    """MIC writes AzureAssignedIdentity status through the main resource.

    It creates the object with its status and then JSON-patches ``/status/status`` on the
    main resource; a status subresource would make the API server drop both. The other
    three kinds have one.
    """
    for kind in CUSTOM_KINDS:
        (version,) = CRDS[kind]["spec"]["versions"]
        has_status = "status" in version.get("subresources", {})
        assert has_status == (kind != "AzureAssignedIdentity"), kind


# ----------------------------------------------------- custom resources: accepted, rejected

SUB = "00000000-0000-0000-0000-000000000000"
RESOURCE_ID = (
    f"/subscriptions/{SUB}/resourcegroups/rg/providers/"
    "Microsoft.ManagedIdentity/userAssignedIdentities/id1"
)
GO_META = {"creationTimestamp": None}  # what Go writes for the stray embedded ObjectMeta


def _identity(**spec: Any) -> Obj:
    return {
        "apiVersion": GROUP_VERSION,
        "kind": "AzureIdentity",
        "metadata": {"name": "id1", "namespace": "default"},
        "spec": {"type": 0, "resourceID": RESOURCE_ID, "clientID": SUB, **spec},
    }


def _binding(**spec: Any) -> Obj:
    return {
        "apiVersion": GROUP_VERSION,
        "kind": "AzureIdentityBinding",
        "metadata": {"name": "id1-binding", "namespace": "default"},
        "spec": {"azureIdentity": "id1", "selector": "app1", **spec},
    }


def _exception(**spec: Any) -> Obj:
    return {
        "apiVersion": GROUP_VERSION,
        "kind": "AzurePodIdentityException",
        "metadata": {"name": "ex", "namespace": "default"},
        "spec": {"podLabels": {"app": "x"}, **spec},
    }


def _mic_assigned(identity: Obj | None = None, *, state: str = "Assigned") -> Obj:
    """An AzureAssignedIdentity as MIC (v1.6+) writes it: Go-serialised, refs embedded."""
    ident = copy.deepcopy(identity or _identity())
    ident["metadata"].update(
        uid="7f3a2c1e-0000-4000-8000-000000000001",
        resourceVersion="1234",
        generation=1,
        creationTimestamp="2022-01-01T00:00:00Z",
    )
    ident["spec"].setdefault("metadata", GO_META)
    ident["status"] = {"availableReplicas": 0, "metadata": GO_META}
    bind = _binding(weight=0, metadata=GO_META)
    bind["metadata"].update(uid="7f3a2c1e-0000-4000-8000-000000000002", resourceVersion="1235")
    bind["status"] = {"availableReplicas": 0, "metadata": GO_META}
    return {
        "apiVersion": GROUP_VERSION,
        "kind": "AzureAssignedIdentity",
        "metadata": {
            "name": "pod1-default-id1",
            "namespace": "default",
            "labels": {"nodename": "node1"},
            "finalizers": ["azureassignedidentity.finalizers.aadpodidentity.k8s.io"],
        },
        "spec": {
            "azureIdentityRef": ident,
            "azureBindingRef": bind,
            "pod": "pod1",
            "podNamespace": "default",
            "nodename": "node1",
            "replicas": None,
            "metadata": GO_META,
        },
        "status": {"status": state, "availableReplicas": 1, "metadata": GO_META},
    }


def _legacy_identity() -> Obj:
    obj = _identity()
    obj["spec"] = {
        "type": 1,
        "ClientID": SUB,
        "TenantID": SUB,
        "ClientPassword": {"Name": "sp-secret", "Namespace": "default"},
    }
    return obj


def _set(obj: Obj, path: str, value: Any) -> Obj:
    """A copy of ``obj`` with the dotted ``path`` set to ``value``."""
    out = copy.deepcopy(obj)
    *parents, last = path.split(".")
    node = out
    for key in parents:
        node = node[key]
    node[last] = value
    return out


def _drop(obj: Obj, path: str) -> Obj:
    out = copy.deepcopy(obj)
    *parents, last = path.split(".")
    node = out
    for key in parents:
        node = node[key]
    del node[last]
    return out


ACCEPTED: dict[str, Obj] = {
    "identity-msi": _identity(),
    "identity-sp-secret": _identity(
        type=1,
        resourceID="",
        tenantID=SUB,
        clientPassword={"name": "s", "namespace": "default"},
        auxiliaryTenantIDs=[SUB],
        adEndpoint="https://login.microsoftonline.com/",
    ),
    "identity-sp-cert": _identity(type=2, clientPassword={"name": "s", "namespace": "default"}),
    "identity-legacy-capitalised": _legacy_identity(),
    "identity-legacy-mixed-case-secret-ref": _set(
        _legacy_identity(), "spec.ClientPassword", {"name": "s", "namespace": "default"}
    ),
    "identity-legacy-type-0": _set(
        _identity(), "spec", {"type": 0, "ResourceID": RESOURCE_ID, "ClientID": SUB}
    ),
    "identity-quoted-type-0": _identity(type="0"),
    "identity-quoted-type-1": _identity(type="1"),
    "identity-quoted-type-2": _identity(type="2"),
    "identity-no-type": _drop(_identity(), "spec.type"),
    "identity-federated": _drop(_identity(type=3, tenantID=SUB), "spec.resourceID"),
    "identity-federated-quoted": _identity(type="3", tenantID=SUB),
    "identity-federated-legacy-keys": _drop(
        _drop(_identity(type=3, ClientID=SUB, TenantID=SUB), "spec.clientID"), "spec.resourceID"
    ),
    "identity-shadow-annotation": _set(
        _identity(), "metadata.annotations", {"aadpodidentity.k8s.io/federation": "shadow"}
    ),
    "identity-sp-without-tenant-unchanged": _identity(
        type=1, clientPassword={"name": "s", "namespace": "default"}
    ),
    "identity-null-auxiliary-tenants-and-replicas": _identity(
        auxiliaryTenantIDs=None, replicas=None
    ),
    "identity-unused-fields": _identity(adResourceID="x", replicas=1),
    "identity-stray-metadata": {
        **_identity(metadata=GO_META),
        "status": {"availableReplicas": 0, "metadata": GO_META},
    },
    "identity-namespaced-annotation": _set(
        _identity(), "metadata.annotations", {"aadpodidentity.k8s.io/Behavior": "namespaced"}
    ),
    "identity-other-casing-kept": _identity(clientId=SUB),
    "binding": _binding(),
    "binding-legacy-capitalised": _set(
        _binding(), "spec", {"AzureIdentity": "id1", "Selector": "app1"}
    ),
    "binding-weight-and-stray-metadata": {
        **_binding(weight=1, metadata=GO_META),
        "status": {"availableReplicas": 0, "metadata": GO_META},
    },
    "exception": _exception(),
    "exception-legacy-capitalised": _set(_exception(), "spec", {"PodLabels": {"app": "x"}}),
    "exception-stray-metadata": {
        **_exception(metadata=GO_META),
        "status": {"status": "", "metadata": GO_META},
    },
    "assigned-as-mic-writes-it": _mic_assigned(),
    "assigned-created": _mic_assigned(state="Created"),
    "assigned-unassigned": _mic_assigned(state="Unassigned"),
    "assigned-pre-1.5-empty-state": _mic_assigned(state=""),
    "assigned-embedding-a-legacy-identity": _mic_assigned(_legacy_identity()),
    "assigned-embedding-a-quoted-type": _mic_assigned(_identity(type="1")),
    "assigned-without-binding-ref": _drop(_mic_assigned(), "spec.azureBindingRef"),
    "assigned-without-status": _drop(_mic_assigned(), "status"),
    # The project's own fixture builders (nmi_sandbox.manifests), as the tests' world uses them.
    "world-identity": world.azure_identity(name="a", client_id=SUB, resource_id=RESOURCE_ID),
    "world-identity-legacy": world.azure_identity(
        name="a", type=1, client_id=SUB, tenant_id=SUB, secret_name="s", legacy_keys=True
    ),
    "world-binding-legacy": world.binding(name="b", identity="a", selector="app", legacy_keys=True),
    "world-assigned": world.assigned_identity(
        pod_name="p",
        pod_namespace="default",
        node="node1",
        identity=world.azure_identity(name="a", client_id=SUB, resource_id=RESOURCE_ID),
        binding_obj=world.binding(name="b", identity="a", selector="app"),
    ),
    "world-exception": world.exception(name="e", labels={"app": "x"}),
}

REJECTED: dict[str, Obj] = {
    "identity-type-x": _identity(type="x"),
    "identity-type-quoted-4": _identity(type="4"),
    "identity-federated-without-tenant": _identity(type=3),
    "identity-federated-quoted-without-tenant": _identity(type="3"),
    "identity-federated-without-client": _drop(_identity(type=3, tenantID=SUB), "spec.clientID"),
    "identity-type-quoted-empty": _identity(type=""),
    "identity-type-float": _identity(type=1.5),
    "identity-type-bool": _identity(type=True),
    "identity-type-object": _identity(type={"value": 1}),
    "identity-client-id-number": _identity(clientID=123),
    "identity-legacy-client-id-number": _identity(ClientID=123),
    "identity-legacy-resource-id-number": _identity(ResourceID=1),
    "identity-legacy-tenant-id-list": _identity(TenantID=[SUB]),
    "identity-secret-ref-string": _identity(clientPassword="my-secret"),
    "identity-legacy-secret-ref-name-number": _identity(ClientPassword={"Name": 1}),
    "identity-auxiliary-tenants-string": _identity(auxiliaryTenantIDs=SUB),
    "identity-auxiliary-tenant-number": _identity(auxiliaryTenantIDs=[1]),
    "identity-replicas-string": _identity(replicas="1"),
    "identity-spec-metadata-string": _identity(metadata="x"),
    "identity-spec-not-object": _set(_identity(), "spec", ["type", 0]),
    "binding-selector-number": _binding(selector=5),
    "binding-legacy-selector-number": _binding(Selector=5),
    "binding-legacy-identity-object": _binding(AzureIdentity={"name": "id1"}),
    "binding-selector-label-selector": _binding(selector={"matchLabels": {"app": "x"}}),
    "binding-identity-list": _binding(azureIdentity=["id1"]),
    "binding-weight-string": _binding(weight="1"),
    "exception-label-value-number": _exception(podLabels={"app": 1}),
    "exception-legacy-labels-list": _exception(PodLabels=["app=x"]),
    "assigned-state-unknown": _set(_mic_assigned(), "status.status", "Bogus"),
    "assigned-nodename-number": _set(_mic_assigned(), "spec.nodename", 7),
    "assigned-replicas-string": _set(_mic_assigned(), "spec.replicas", "1"),
    "assigned-identity-ref-without-kind": _drop(_mic_assigned(), "spec.azureIdentityRef.kind"),
    "assigned-identity-ref-empty-api-version": _set(
        _mic_assigned(), "spec.azureIdentityRef.apiVersion", ""
    ),
    "assigned-identity-ref-string": _set(_mic_assigned(), "spec.azureIdentityRef", "id1"),
    "assigned-embedded-type-x": _set(_mic_assigned(), "spec.azureIdentityRef.spec.type", "x"),
    "assigned-embedded-selector-number": _set(
        _mic_assigned(), "spec.azureBindingRef.spec.selector", 5
    ),
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_crd_accepts_what_aad_pod_identity_wrote(name: str) -> None:
    _accept(ACCEPTED[name])


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_crd_rejects_wrong_types(name: str) -> None:
    _reject(REJECTED[name])


LEGACY_KEYS = {
    "AzureIdentity": ["ClientID", "ClientPassword", "ResourceID", "TenantID"],
    "AzureIdentityBinding": ["AzureIdentity", "Selector"],
    "AzurePodIdentityException": ["PodLabels"],
}


@pytest.mark.parametrize("kind", sorted(LEGACY_KEYS))
def test_crd_declares_the_legacy_keys_beside_the_camel_ones(kind: str) -> None:
    """Declared, not merely preserved: the API server type-checks them."""
    spec = _schema(kind)["properties"]["spec"]["properties"]
    for key in LEGACY_KEYS[kind]:
        camel = key[0].lower() + key[1:]
        assert spec[key] == {**spec[camel], "description": spec[key]["description"]}
    if kind == "AzureIdentity":
        for ref in ("clientPassword", "ClientPassword"):
            assert set(spec[ref]["properties"]) == {"name", "namespace", "Name", "Namespace"}


def test_embedded_refs_are_typed_like_the_objects_they_copy() -> None:
    embedded = _schema("AzureAssignedIdentity")["properties"]["spec"]["properties"]
    for ref, kind in (
        ("azureIdentityRef", "AzureIdentity"),
        ("azureBindingRef", "AzureIdentityBinding"),
    ):
        node = embedded[ref]
        assert node["x-kubernetes-embedded-resource"] is True
        assert node["x-kubernetes-preserve-unknown-fields"] is True
        own = _schema(kind)["properties"]

        def types(schema: Obj) -> Any:
            if "properties" in schema:
                return {k: types(v) for k, v in schema["properties"].items()}
            return (schema.get("type"), schema.get("nullable"), schema.get("pattern"))

        assert types(node["properties"]["spec"]) == types(own["spec"])
        assert types(node["properties"]["status"]) == types(own["status"])


def test_pruning_check_has_teeth() -> None:
    """A field outside the schema is reported where spec does not keep unknown fields."""
    schema = _schema("AzureIdentity")
    bad = _set(_identity(), "spec.clientPassword", {"name": "s", "nmespace": "x"})
    assert _pruned(bad, schema) == [".spec.clientPassword.nmespace"]
    assert _pruned({**_identity(), "extra": 1}, schema) == [".extra"]


def test_every_example_custom_resource_is_accepted_by_its_crd() -> None:
    customs = [o for o in EXAMPLE_OBJECTS if o["apiVersion"] == GROUP_VERSION]
    assert customs
    for obj in customs:
        _accept(obj)


# ----------------------------------------------------------------------------- the examples


def _examples(kind: str) -> list[Obj]:
    return [o for o in EXAMPLE_OBJECTS if o["kind"] == kind]


def test_examples_cover_every_identity_type_and_a_legacy_object() -> None:
    types = sorted(int(o["spec"]["type"]) for o in _examples("AzureIdentity"))
    assert {0, 1, 2, 3} <= set(types)
    legacy = [
        o
        for o in EXAMPLE_OBJECTS
        if o["apiVersion"] == GROUP_VERSION and any(k[0].isupper() for k in o["spec"])
    ]
    assert legacy, "no example with the pre-1.6 capitalised keys"


def test_example_identities_read_as_nmi_reads_them() -> None:
    secrets = {
        (o["metadata"]["namespace"], o["metadata"]["name"]): objects.Secret.parse(o)
        for o in _examples("Secret")
    }
    bindings = [objects.AzureIdentityBinding.parse(o) for o in _examples("AzureIdentityBinding")]
    for raw in _examples("AzureIdentity"):
        ident = objects.AzureIdentity.parse(raw)
        assert ident.type in (0, 1, 2, 3), ident
        assert re.fullmatch(r"[0-9a-f-]{36}", ident.client_id), ident
        assert any(
            b.azure_identity == ident.meta.name and b.meta.namespace == ident.meta.namespace
            for b in bindings
        ), f"no binding for {ident.meta.key}"
        if ident.type == 0:
            assert re.fullmatch(
                r"(?i)/subscriptions/.+?/resourcegroups/.+?/providers/"
                r"Microsoft\.ManagedIdentity/userAssignedIdentities/.+",
                ident.resource_id,
            )
            continue
        assert ident.tenant_id
        if ident.type == 3:  # federated: no Secret at all
            assert ident.secret_ref is None
            continue
        assert ident.secret_ref is not None
        # nmi reads Secrets from the identity's own namespace unless told otherwise.
        assert ident.secret_ref.namespace == ident.meta.namespace
        secret = secrets[(ident.secret_ref.namespace, ident.secret_ref.name)]
        if ident.type == 1:
            assert "not-a-real" in client_secret_from(secret).for_msal()
        else:
            assert {"certificate", "password"} <= set(secret.data)
            # The placeholder is clearly fake: nmi refuses it as a certificate.
            assert b"NOT-A-REAL" in secret.data["certificate"]
            with pytest.raises(CredentialError):
                client_certificate_from(secret)


def test_example_secrets_hold_only_placeholders() -> None:
    for raw in _examples("Secret"):
        for value in (raw.get("data") or {}).values():
            base64.b64decode(value, validate=True)
        values = [
            *(base64.b64decode(v).decode() for v in (raw.get("data") or {}).values()),
            *(raw.get("stringData") or {}).values(),
        ]
        assert values
        assert all(re.search(r"(?i)not-a-real", v) for v in values), raw["metadata"]["name"]


def test_example_exceptions_for_mic_and_aks_addons() -> None:
    exceptions = {
        (
            o["metadata"]["namespace"],
            o["metadata"]["name"],
        ): objects.AzurePodIdentityException.parse(o)
        for o in _examples("AzurePodIdentityException")
    }
    aks = [e for (ns, _), e in exceptions.items() if ns == "kube-system"]
    assert [dict(e.pod_labels) for e in aks] == [{"kubernetes.azure.com/managedby": "aks"}]
    mic = [e for (_, name), e in exceptions.items() if "mic" in name]
    assert len(mic) == 1
    assert all(v == "mic" for v in mic[0].pod_labels.values())


# ------------------------------------------------------------------------------- DaemonSet

EXPECTED_ARGS = [
    "--node=$(NODE_NAME)",
    "--node-ip=$(HOST_IP)",
    "--http-probe-port=8085",
    "--prometheus-port=9090",
    "--probe-address=127.0.0.1",
    "--prometheus-address=0.0.0.0",
    "--metrics-allowed-sources=",
    "--startup-taint=nmi.aadpodidentity.k8s.io/agent-not-ready",
    "--metadata-header-required=true",
    "--log-format=json",
]


def _daemonset() -> Obj:
    return _one(SOURCES, "DaemonSet", "nmi")


def _container() -> Obj:
    (container,) = _daemonset()["spec"]["template"]["spec"]["containers"]
    return container


def test_daemonset_scheduling() -> None:
    ds = _daemonset()
    assert ds["metadata"]["namespace"] == NAMESPACE
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["terminationGracePeriodSeconds"] == 30
    assert not pod.get("hostPID") and not pod.get("hostIPC")
    assert pod.get("initContainers") is None
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_daemonset_rolls_one_node_at_a_time() -> None:
    strategy = _daemonset()["spec"]["updateStrategy"]
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}


def test_daemonset_container_command_line() -> None:
    container = _container()
    assert container["image"] == "nmi:0.1.0"
    assert "command" not in container, "the image's ENTRYPOINT is nmi"
    assert container["args"] == EXPECTED_ARGS
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["HOST_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.hostIP"}}


def test_image_tag_is_the_project_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    containers = _containers(SOURCES)
    assert set(containers) == CONTAINERS["standard"]
    assert {c["image"] for c in containers.values()} == {f"nmi:{version}"}
    for folder in ENTRY_POINTS.values():
        (entry,) = _kustomization(folder)["images"]
        assert (entry["name"], entry["newTag"]) == ("nmi", version), folder


@needs_kubectl
def test_managed_daemonset_runs_nmi_in_managed_mode(rendered_managed: list[Obj]) -> None:
    (container,) = _one(rendered_managed, "DaemonSet", "nmi")["spec"]["template"]["spec"][
        "containers"
    ]
    assert container["args"] == [*EXPECTED_ARGS, MANAGED_ARG]
    args = build_parser().parse_args(container["args"])
    assert args.operation_mode == "managed"


def test_daemonset_args_are_accepted_by_nmi() -> None:
    args = build_parser().parse_args(_container()["args"])
    assert args.operation_mode == "standard"  # nmi's default: the standard entry point's mode
    assert args.node == "$(NODE_NAME)"  # the kubelet expands it, argparse sees it verbatim
    assert args.node_ip == "$(HOST_IP)"
    assert args.http_probe_port == 8085
    assert args.prometheus_port == 9090
    assert args.metadata_header_required is True
    assert args.log_format == "json"


def test_daemonset_security_context() -> None:
    container = _container()
    sc = container["securityContext"]
    assert sc["runAsUser"] == 0
    assert sc["runAsNonRoot"] is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert not sc.get("privileged")
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sorted(sc["capabilities"]["add"]) == ["NET_ADMIN", "NET_RAW"]
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    pod_sc = _daemonset()["spec"]["template"]["spec"].get("securityContext") or {}
    assert not pod_sc.get("sysctls")


def test_daemonset_volumes() -> None:
    pod = _daemonset()["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in _container()["volumeMounts"]}
    assert set(volumes) == set(mounts)
    host_paths = {n: v["hostPath"] for n, v in volumes.items() if "hostPath" in v}
    assert host_paths == {"xtables-lock": {"path": "/run/xtables.lock", "type": "FileOrCreate"}}
    assert mounts["xtables-lock"]["mountPath"] == "/run/xtables.lock"
    tmp = [n for n, v in volumes.items() if "emptyDir" in v]
    assert sorted(mounts[n]["mountPath"] for n in tmp) == ["/run/nmi", "/tmp"]


def test_daemonset_probes_and_ports() -> None:
    container = _container()
    ready = container["readinessProbe"]
    # The probe server listens on the node's loopback only; the kubelet probes a hostNetwork
    # pod from the node, so it reaches 127.0.0.1 (pods cannot).
    assert ready["httpGet"] == {"host": "127.0.0.1", "path": "/readyz", "port": 8085}
    assert (ready["periodSeconds"], ready["failureThreshold"]) == (5, 3)
    live = container["livenessProbe"]
    assert live["httpGet"] == {"host": "127.0.0.1", "path": "/healthz", "port": 8085}
    assert "--probe-address=127.0.0.1" in container["args"]
    assert (live["initialDelaySeconds"], live["periodSeconds"], live["failureThreshold"]) == (
        10,
        10,
        6,
    )
    assert "--http-probe-port=8085" in container["args"]
    assert container["ports"] == [{"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]
    assert "--prometheus-port=9090" in container["args"]


def test_daemonset_resources_have_no_cpu_limit() -> None:
    resources = _container()["resources"]
    assert resources["requests"] == {"cpu": "50m", "memory": "64Mi"}
    assert resources["limits"] == {"memory": "256Mi"}


def test_daemonset_uses_the_service_account_of_the_role_binding() -> None:
    assert _daemonset()["spec"]["template"]["spec"]["serviceAccountName"] == "nmi"
    sa = _one(SOURCES, "ServiceAccount", "nmi")
    assert sa["metadata"]["namespace"] == NAMESPACE
    crb = _one(SOURCES, "ClusterRoleBinding", "nmi")
    assert crb["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "nmi",
    }
    assert crb["subjects"] == [{"kind": "ServiceAccount", "name": "nmi", "namespace": NAMESPACE}]


def test_namespace_admits_the_daemonset() -> None:
    ns = _one(SOURCES, "Namespace", NAMESPACE)
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"


# ------------------------------------------------------------------------------------ RBAC

EXPECTED_PERMISSIONS = {
    ("", "pods"): {"get", "list", "watch"},
    ("", "secrets"): {"get", "list", "watch"},
    ("", "events"): {"create", "patch"},
    ("", "nodes"): {"get", "patch"},  # the start-up taint of its own node, nothing else
    ("", "serviceaccounts/token"): {"create"},  # federated identities: TokenRequest only
    **{(GROUP, plural): {"get", "list", "watch"} for plural in CUSTOM_KINDS.values()},
}


def _permissions(rules: list[Obj]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def test_rbac_is_least_privilege() -> None:
    roles = [o for o in NMI_SOURCES if o["kind"] in ("ClusterRole", "Role")]
    assert [_ident(r) for r in roles] == ["ClusterRole/nmi"]
    rules = roles[0]["rules"]
    for rule in rules:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, rule
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[key], rule
            assert all("*" not in item for item in rule[key]), rule
    assert _permissions(rules) == EXPECTED_PERMISSIONS


@needs_kubectl
def test_rbac_of_each_entry_point(rendered: list[Obj], rendered_managed: list[Obj]) -> None:
    """nmi's ClusterRole in both modes; the MIC's ClusterRole and Role in standard only."""

    def roles(objs: list[Obj]) -> list[str]:
        kinds = ("ClusterRole", "Role", "ClusterRoleBinding", "RoleBinding")
        return sorted(_ident(o) for o in objs if o["kind"] in kinds)

    assert roles(rendered_managed) == ["ClusterRole/nmi", "ClusterRoleBinding/nmi"]
    assert roles(rendered) == sorted(
        [
            "ClusterRole/nmi",
            "ClusterRoleBinding/nmi",
            "ClusterRole/nmi-mic",
            "ClusterRoleBinding/nmi-mic",
            f"Role/{NAMESPACE}/nmi-mic",
            f"RoleBinding/{NAMESPACE}/nmi-mic",
        ]
    )


def test_rbac_writes_nothing_but_events_the_startup_taint_and_token_requests() -> None:
    writes = {"create", "update", "patch", "delete", "deletecollection"}
    special = {"escalate", "bind", "impersonate", "use", "approve", "sign", "proxy"}
    granted = _permissions(_one(SOURCES, "ClusterRole", "nmi")["rules"])
    writers = {res for res, verbs in granted.items() if verbs & writes}
    # serviceaccounts/token "create" is a TokenRequest (federated identities): it mints a
    # bound token, it writes no object.
    assert writers == {("", "events"), ("", "nodes"), ("", "serviceaccounts/token")}
    assert granted[("", "serviceaccounts/token")] == {"create"}
    assert ("", "serviceaccounts") not in granted
    assert granted[("", "nodes")] == {"get", "patch"}  # never list: one node, by name
    assert not any(verbs & special for verbs in granted.values())
    assert granted[("", "secrets")] == {"get", "list", "watch"}
    assert granted[("", "events")] == {"create", "patch"}


# --------------------------------------------------------- kubectl apply, client dry run


class _StubApi:
    """Discovery for the kinds in play and 404 for every object: a cluster without nmi."""

    def __init__(self, kinds: dict[str, list[tuple[str, str, bool]]]) -> None:
        self.kinds = kinds
        self.requests: list[tuple[str, str]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: Obj) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                stub.requests.append(("GET", self.path))
                code, body = stub.answer(self.path.split("?")[0])
                self._send(code, body)

            def _write(self) -> None:
                stub.requests.append((self.command, self.path))
                self._send(405, {"kind": "Status", "apiVersion": "v1", "code": 405})

            do_POST = do_PUT = do_PATCH = do_DELETE = _write

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, path: str) -> tuple[int, Obj]:
        if path == "/version":
            return 200, {"major": "1", "minor": K8S_VERSION.split(".")[1], "gitVersion": "v0"}
        if path == "/api":
            return 200, {"kind": "APIVersions", "versions": ["v1"]}
        if path == "/apis":
            groups = []
            for gv in self.kinds:
                if "/" in gv:
                    version = {"groupVersion": gv, "version": gv.split("/")[1]}
                    groups.append(
                        {
                            "name": gv.split("/")[0],
                            "versions": [version],
                            "preferredVersion": version,
                        }
                    )
            return 200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}
        for gv, resources in self.kinds.items():
            if path == ("/api/v1" if gv == "v1" else f"/apis/{gv}"):
                entries = [
                    {
                        "name": plural,
                        "singularName": kind.lower(),
                        "namespaced": namespaced,
                        "kind": kind,
                        "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
                    }
                    for plural, kind, namespaced in resources
                ]
                return 200, {
                    "kind": "APIResourceList",
                    "apiVersion": "v1",
                    "groupVersion": gv,
                    "resources": entries,
                }
        return 404, {
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Failure",
            "reason": "NotFound",
            "code": 404,
            "message": f"{path} not found",
        }

    def kubeconfig(self, folder: Path) -> Path:
        path = folder / "kubeconfig.yaml"
        server = f"http://127.0.0.1:{self.server.server_address[1]}"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "stub", "cluster": {"server": server}}],
            "users": [{"name": "stub", "user": {}}],
            "contexts": [{"name": "stub", "context": {"cluster": "stub", "user": "stub"}}],
            "current-context": "stub",
        }
        path.write_text(yaml.safe_dump(config))
        return path


BUILTIN_KINDS: dict[str, list[tuple[str, str, bool]]] = {
    "v1": [
        ("namespaces", "Namespace", False),
        ("serviceaccounts", "ServiceAccount", True),
        ("secrets", "Secret", True),
    ],
    "apps/v1": [("daemonsets", "DaemonSet", True), ("deployments", "Deployment", True)],
    "rbac.authorization.k8s.io/v1": [
        ("clusterroles", "ClusterRole", False),
        ("clusterrolebindings", "ClusterRoleBinding", False),
        ("roles", "Role", True),
        ("rolebindings", "RoleBinding", True),
    ],
    "apiextensions.k8s.io/v1": [("customresourcedefinitions", "CustomResourceDefinition", False)],
}


def _serve(kinds: dict[str, list[tuple[str, str, bool]]]) -> Iterator[_StubApi]:
    stub = _StubApi(kinds)
    stub.thread.start()
    try:
        yield stub
    finally:
        stub.server.shutdown()
        stub.server.server_close()


@pytest.fixture
def stub_api() -> Iterator[_StubApi]:
    """A cluster that serves the CRDs' kinds (as crds/ makes the API server serve them)."""
    custom = [
        (crd["spec"]["names"]["plural"], kind, crd["spec"]["scope"] == "Namespaced")
        for kind, crd in CRDS.items()
    ]
    yield from _serve({**BUILTIN_KINDS, GROUP_VERSION: custom})


@pytest.fixture
def fresh_stub_api() -> Iterator[_StubApi]:
    """A cluster that has never seen the CRDs: the group is not served."""
    yield from _serve(BUILTIN_KINDS)


def _without_last_applied(obj: Obj) -> Obj:
    out = copy.deepcopy(obj)
    annotations = out["metadata"].get("annotations", {})
    assert "kubectl.kubernetes.io/last-applied-configuration" in annotations
    del annotations["kubectl.kubernetes.io/last-applied-configuration"]
    if not annotations:
        del out["metadata"]["annotations"]
    return out


def _apply_dry_run(folder: Path, stub: _StubApi, tmp_path: Path) -> list[Obj]:
    out = _kubectl(
        "apply",
        "-k",
        str(folder),
        "--dry-run=client",
        "--validate=false",
        "-o",
        "yaml",
        kubeconfig=stub.kubeconfig(tmp_path),
    )
    applied = yaml.safe_load(out)
    items = applied["items"] if applied.get("kind") == "List" else [applied]
    assert {method for method, _ in stub.requests} == {"GET"}, "a dry run must not write"
    return [_without_last_applied(o) for o in items]


@needs_kubectl
@pytest.mark.parametrize(
    "folder",
    [DEPLOY, MANAGED, CRDS_DIR, EXAMPLES],
    ids=["standard", "managed", "crds", "examples"],
)
def test_kubectl_apply_dry_run(folder: Path, stub_api: _StubApi, tmp_path: Path) -> None:
    items = _apply_dry_run(folder, stub_api, tmp_path)
    expected = _docs(_kubectl("kustomize", str(folder)))
    assert sorted(items, key=_ident) == sorted(expected, key=_ident)


@needs_kubectl
def test_fresh_cluster_installs_crds_first(fresh_stub_api: _StubApi, tmp_path: Path) -> None:
    """Why crds/ is its own kustomization, applied first on a fresh cluster.

    kubectl maps every object to a served resource before it applies any: without the
    CRDs, the standard entry point's one custom object (the MIC's exception) cannot be
    mapped. crds/ and the managed entry point (no custom object) need nothing served.
    """
    for folder in (CRDS_DIR, MANAGED):
        items = _apply_dry_run(folder, fresh_stub_api, tmp_path)
        assert sorted(_ident(o) for o in items) == sorted(
            _ident(o) for o in _docs(_kubectl("kustomize", str(folder)))
        )
    assert KUBECTL is not None
    kubeconfig = fresh_stub_api.kubeconfig(tmp_path)
    proc = subprocess.run(
        [
            *(KUBECTL, "--kubeconfig", str(kubeconfig), "--cache-dir", str(tmp_path / "cache")),
            *("apply", "-k", str(DEPLOY), "--dry-run=client", "--validate=false", "-o", "name"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    assert 'no matches for kind "AzurePodIdentityException"' in proc.stderr
    assert {method for method, _ in fresh_stub_api.requests} == {"GET"}
    customs = [_ident(o) for o in SOURCES if o["apiVersion"] == GROUP_VERSION]
    assert customs == [f"AzurePodIdentityException/{NAMESPACE}/nmi-mic"]
