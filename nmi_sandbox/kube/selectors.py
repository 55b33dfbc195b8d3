"""Label and field selectors: which objects a LIST, WATCH or DELETE collection sees.

Why this exists: the daemon (and the controller to come) narrow their lists and
watches with selectors -- pods by ``spec.nodeName``, assigned identities by label,
nodes by ``metadata.name`` -- and a selector the real server would reject must fail
here too, with the same 400.  This module parses both grammars as apimachinery does
(label selector lexer and parser with ``=``/``==``/``!=``/``in``/``notin``/exists/
``!``/``<``/``>``; field selectors with ``\\``-escapes, restricted to the fields each
resource supports) and turns them into a :class:`Filter`, the predicate the store
applies to snapshots and to every watch event.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import KubeApiError, bad_request
from .meta import JSON, label_value_problem, qualified_name_problem
from .resources import Resource

__all__ = ["Filter", "LabelRequirement", "name_selector", "parse_field_selector"]

_SPECIAL = frozenset("=!(),<>")


def _lex_label_selector(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch in _SPECIAL:
            two = text[i : i + 2]
            if two in ("==", "!="):
                tokens.append((two, two))
                i += 2
            else:
                tokens.append((ch, ch))
                i += 1
        else:
            j = i
            while j < len(text) and not text[j].isspace() and text[j] not in _SPECIAL:
                j += 1
            word = text[i:j]
            tokens.append((word if word in ("in", "notin") else "id", word))
            i = j
    return tokens


@dataclass(frozen=True)
class LabelRequirement:
    key: str
    op: str  # exists | !exists | = | != | in | notin | gt | lt
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, Any]) -> bool:
        present = self.key in labels
        value = str(labels.get(self.key, ""))
        if self.op == "exists":
            return present
        if self.op == "!exists":
            return not present
        if self.op in ("=", "in"):
            return present and value in self.values
        if self.op in ("!=", "notin"):
            return not present or value not in self.values
        if not present:
            return False
        try:
            actual = int(value)
        except ValueError:
            return False
        bound = int(self.values[0])
        return actual > bound if self.op == "gt" else actual < bound


def parse_label_selector(text: str) -> tuple[LabelRequirement, ...]:
    tokens = _lex_label_selector(text)
    if not tokens:
        return ()
    pos = 0

    def peek() -> tuple[str, str]:
        return tokens[pos] if pos < len(tokens) else ("end", "")

    def fail(found: str, expected: str) -> KubeApiError:
        return bad_request(f"unable to parse requirement: found '{found}', expected: {expected}")

    reqs: list[LabelRequirement] = []
    while True:
        kind, text_ = peek()
        if kind == "!":
            pos += 1
            kind, key = peek()
            if kind != "id":
                raise fail(key, "identifier after '!'")
            pos += 1
            req = LabelRequirement(key, "!exists")
        elif kind == "id":
            key = text_
            pos += 1
            op_kind, op_text = peek()
            if op_kind in ("end", ","):
                req = LabelRequirement(key, "exists")
            elif op_kind in ("=", "==", "!="):
                pos += 1
                vkind, vtext = peek()
                value = ""
                if vkind == "id":
                    value = vtext
                    pos += 1
                elif vkind not in ("end", ","):
                    raise fail(vtext, "identifier")
                req = LabelRequirement(key, "!=" if op_kind == "!=" else "=", (value,))
            elif op_kind in ("in", "notin"):
                pos += 1
                if peek()[0] != "(":
                    raise fail(peek()[1], "'('")
                pos += 1
                values: list[str] = []
                while True:
                    vkind, vtext = peek()
                    if vkind == ")" and not values:
                        break
                    if vkind != "id":
                        raise fail(vtext, "identifier")
                    values.append(vtext)
                    pos += 1
                    sep = peek()[0]
                    if sep == ",":
                        pos += 1
                        continue
                    if sep == ")":
                        break
                    raise fail(peek()[1], "',' or ')'")
                pos += 1
                if not values:
                    raise bad_request(
                        "unable to parse requirement: values: Invalid value: null: for 'in', "
                        "'notin' operators, values set can't be empty"
                    )
                req = LabelRequirement(key, op_kind, tuple(values))
            elif op_kind in (">", "<"):
                pos += 1
                vkind, vtext = peek()
                if vkind != "id":
                    raise fail(vtext, "identifier")
                pos += 1
                try:
                    int(vtext)
                except ValueError:
                    raise bad_request(
                        f'unable to parse requirement: values[0]: Invalid value: "{vtext}": '
                        "for 'Gt', 'Lt' operators, the value must be an integer"
                    ) from None
                req = LabelRequirement(key, "gt" if op_kind == ">" else "lt", (vtext,))
            else:
                raise fail(op_text, "'=', '!=', '==', 'in', notin'")
        else:
            raise fail(text_, "!, identifier, or 'end of string'")
        problem = qualified_name_problem(req.key)
        if problem:
            raise bad_request(
                f'unable to parse requirement: key: Invalid value: "{req.key}": {problem}'
            )
        if req.op in ("=", "!=", "in", "notin"):
            for i, v in enumerate(req.values):
                problem = label_value_problem(v)
                if problem:
                    raise bad_request(
                        f"unable to parse requirement: values[{i}][{req.key}]: "
                        f'Invalid value: "{v}": {problem}'
                    )
        reqs.append(req)
        kind, text_ = peek()
        if kind == "end":
            break
        if kind != ",":
            raise fail(text_, "',' or 'end of string'")
        pos += 1
        if peek()[0] == "end":
            raise fail("", "identifier")
    return tuple(reqs)


# --------------------------------------------------------------------------- field selectors


def _split_unescaped(text: str, sep: str) -> list[str]:
    parts: list[str] = []
    buf: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            buf.append(text[i : i + 2])
            i += 2
            continue
        if ch == sep:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
        i += 1
    parts.append("".join(buf))
    return parts


def _unescape_field_value(value: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "\\":
            if i + 1 >= len(value) or value[i + 1] not in "\\,=":
                raise bad_request(f"invalid field selector: invalid escape sequence in '{value}'")
            out.append(value[i + 1])
            i += 2
            continue
        if ch in ",=":
            raise bad_request(f"invalid field selector: unescaped '{ch}' in '{value}'")
        out.append(ch)
        i += 1
    return "".join(out)


def name_selector(name: str) -> str:
    """The field selector ``metadata.name=<name>``, escaped (a watch on one object)."""
    escaped = name.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=")
    return "metadata.name=" + escaped


def parse_field_selector(text: str, res: Resource) -> tuple[tuple[str, bool, str], ...]:
    """(field, equal?, value) terms of a field selector, rejecting unsupported fields."""
    terms: list[tuple[str, bool, str]] = []
    for term in _split_unescaped(text, ","):
        if not term:
            continue
        found: tuple[str, str, str] | None = None
        i = 0
        while i < len(term) and found is None:
            if term[i] == "\\":
                i += 2
                continue
            for op in ("!=", "==", "="):
                if term.startswith(op, i):
                    found = (term[:i], op, term[i + len(op) :])
                    break
            i += 1
        if found is None:
            raise bad_request(f"invalid selector: '{text}'; can't understand '{term}'")
        name, op, raw = found
        value = _unescape_field_value(raw)
        if name not in res.fields:
            raise bad_request(f"field label not supported: {name}")
        terms.append((name, op != "!=", value))
    return tuple(terms)


@dataclass(frozen=True)
class Filter:
    """Which stored objects a LIST or WATCH request sees."""

    res: Resource
    namespace: str | None = None
    labels: tuple[LabelRequirement, ...] = ()
    fields: tuple[tuple[str, bool, str], ...] = ()

    @classmethod
    def build(
        cls,
        res: Resource,
        namespace: str | None,
        label_selector: str | None,
        field_selector: str | None,
    ) -> Filter:
        return cls(
            res,
            namespace if res.namespaced else None,
            parse_label_selector(label_selector or ""),
            parse_field_selector(field_selector or "", res),
        )

    @property
    def has_selectors(self) -> bool:
        return bool(self.labels or self.fields)

    def __call__(self, obj: JSON) -> bool:
        meta = obj.get("metadata") or {}
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        labels = meta.get("labels") or {}
        if not all(req.matches(labels) for req in self.labels):
            return False
        return all(
            (self.res.fields[name](obj) == value) == equal for name, equal, value in self.fields
        )
