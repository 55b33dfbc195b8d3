"""The three PATCH dialects: JSON merge patch, strategic merge patch, RFC 6902 JSON patch.

Why this exists: MIC and kubectl-style clients patch objects (the daemon's peers
patch ``AzureAssignedIdentity`` status, tests patch pods and labels), and each
dialect has its own rules and its own failures -- which media types a custom
resource accepts (no strategic merge), what a malformed body or a failed ``test``
operation answers.  :func:`apply_patch` turns (current object, content type,
body) into the patched object or the real server's error; the registry then
stores the result as an update.

Strategic merge is JSON merge plus ``$patch: delete`` and ``$``-directives
ignored; list merge keys are not emulated (lists are replaced).
"""

from __future__ import annotations

import copy
from typing import Any

from .errors import bad_request, error, unsupported_media_type
from .meta import JSON

__all__ = ["JsonPatchError", "apply_patch", "json_patch", "merge_patch"]

_JSON_PATCH = "application/json-patch+json"
_MERGE_PATCH = "application/merge-patch+json"
_STRATEGIC_PATCH = "application/strategic-merge-patch+json"
_ACCEPTED = f"{_JSON_PATCH}, {_MERGE_PATCH}, application/apply-patch+yaml"


def merge_patch(target: Any, patch: Any, *, strategic: bool = False) -> Any:
    """RFC 7386 JSON merge patch (``strategic``: as the server does for built-in kinds)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if strategic and patch.get("$patch") == "delete":
        return None
    result: JSON = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if strategic and key.startswith("$"):
            continue
        if value is None:
            result.pop(key, None)
        else:
            merged = merge_patch(result.get(key), value, strategic=strategic)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
    return result


class JsonPatchError(Exception):
    pass


def _json_equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _pointer(path: Any) -> list[str]:
    if not isinstance(path, str):
        raise JsonPatchError("missing path")
    if path == "":
        return []
    if not path.startswith("/"):
        raise JsonPatchError(f"invalid path: {path}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _index(container: list[Any], token: str, *, allow_end: bool) -> int:
    if token == "-" and allow_end:
        return len(container)
    if not token.isdigit() or (len(token) > 1 and token.startswith("0")):
        raise JsonPatchError(f"invalid array index: {token}")
    idx = int(token)
    if idx > len(container) or (idx == len(container) and not allow_end):
        raise JsonPatchError(f"array index out of bounds: {idx}")
    return idx


def _resolve(doc: Any, tokens: list[str]) -> Any:
    cur = doc
    for tok in tokens:
        if isinstance(cur, dict):
            if tok not in cur:
                raise JsonPatchError(f"missing value at /{'/'.join(tokens)}")
            cur = cur[tok]
        elif isinstance(cur, list):
            cur = cur[_index(cur, tok, allow_end=False)]
        else:
            raise JsonPatchError(f"missing value at /{'/'.join(tokens)}")
    return cur


def _jp_add(doc: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    parent = _resolve(doc, tokens[:-1])
    last = tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, last, allow_end=True), value)
    else:
        raise JsonPatchError(f"cannot add to /{'/'.join(tokens)}")
    return doc


def _jp_remove(doc: Any, tokens: list[str]) -> Any:
    if not tokens:
        raise JsonPatchError("cannot remove the document root")
    parent = _resolve(doc, tokens[:-1])
    last = tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise JsonPatchError(f"unable to remove nonexistent key: {last}: missing value")
        return parent.pop(last)
    if isinstance(parent, list):
        return parent.pop(_index(parent, last, allow_end=False))
    raise JsonPatchError(f"cannot remove /{'/'.join(tokens)}")


def json_patch(doc: JSON, ops: list[Any]) -> Any:
    """Apply RFC 6902 operations to a copy of ``doc``; JsonPatchError if one fails."""
    out: Any = copy.deepcopy(doc)
    for op in ops:
        if not isinstance(op, dict):
            raise JsonPatchError("patch operation must be an object")
        kind = op.get("op")
        path = _pointer(op.get("path"))
        if kind in ("add", "replace", "test") and "value" not in op:
            raise JsonPatchError(f"missing value for op {kind}")
        if kind == "add":
            out = _jp_add(out, path, copy.deepcopy(op["value"]))
        elif kind == "remove":
            _jp_remove(out, path)
        elif kind == "replace":
            _resolve(out, path)
            if path:
                _jp_remove(out, path)
            out = _jp_add(out, path, copy.deepcopy(op["value"]))
        elif kind == "move":
            source = _pointer(op.get("from"))
            value = _resolve(out, source)
            if source:
                _jp_remove(out, source)
            out = _jp_add(out, path, value)
        elif kind == "copy":
            value = copy.deepcopy(_resolve(out, _pointer(op.get("from"))))
            out = _jp_add(out, path, value)
        elif kind == "test":
            if not _json_equal(_resolve(out, path), op["value"]):
                raise JsonPatchError(f"testing value {op.get('path')} failed: test failed")
        else:
            raise JsonPatchError(f"Unexpected kind: {kind}")
    return out


def apply_patch(current: JSON, content_type: str, patch: Any, *, custom: bool) -> JSON:
    """``current`` patched with ``patch`` sent as ``content_type`` (``custom``: a CRD)."""
    if content_type == _JSON_PATCH:
        if not isinstance(patch, list):
            raise bad_request("json: cannot unmarshal object into Go value of type jsonpatch.Patch")
        try:
            patched = json_patch(current, patch)
        except JsonPatchError as e:
            raise error(
                422,
                "Invalid",
                "the server rejected our request due to an error in our request",
                {"causes": [{"reason": "UnexpectedServerResponse", "message": str(e)}]},
            ) from None
    elif content_type in (_MERGE_PATCH, _STRATEGIC_PATCH):
        strategic = content_type == _STRATEGIC_PATCH
        if strategic and custom:
            raise unsupported_media_type(_ACCEPTED)
        if not isinstance(patch, dict):
            raise bad_request(
                "json: cannot unmarshal array into Go value of type map[string]interface {}"
            )
        patched = merge_patch(current, patch, strategic=strategic)
    else:
        raise unsupported_media_type(_ACCEPTED + ("" if custom else ", " + _STRATEGIC_PATCH))
    if not isinstance(patched, dict):
        raise bad_request("the patched object is not a JSON object")
    return patched
