"""The rules a ``response_format`` JSON Schema must meet before it becomes a grammar (shared/structured.py).

One walk over the schema: only keywords the grammar enforces (a constraint it would drop is refused, never
ignored), the limits below, references that resolve inside the document, and at least one finite instance.
Every failure is a ``GKTError`` (400 ``invalid_request``) whose ``param`` is the dotted path of the offending
place, e.g. ``response_format.json_schema.schema.properties.x.minimum``.
"""

from __future__ import annotations

from typing import Any

from shared.errors import InvalidBody

MAX_SCHEMA_BYTES = 65_536  # the schema as compact JSON
MAX_DEPTH = 10  # objects and arrays nested in each other (OpenAI's limit for strict schemas)
MAX_PROPERTIES = 1_000  # property definitions in the whole schema
MAX_ENUM_VALUES = 1_000  # values in the whole schema's enums
MAX_REPEAT = 1_000  # minLength/maxLength/minItems/maxItems: each unit of a bound is a grammar rule
MAX_GRAMMAR_BYTES = 512_000

ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$comment", "deprecated", "readOnly", "writeOnly", "$schema",
    "$id",
})
# Keywords the grammar enforces. Anything else that constrains a value is refused (see the module docstring).
SUPPORTED = frozenset({
    "type", "enum", "const", "anyOf", "$ref", "$defs", "definitions", "properties", "required",
    "additionalProperties", "items", "prefixItems", "minItems", "maxItems", "format", "minLength", "maxLength",
})
FORMATS = frozenset({"date", "time", "date-time", "uuid"})
TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
DEFS = ("$defs", "definitions")


def refuse(path: str, message: str) -> InvalidBody:
    """The 400 for a schema problem at ``path`` (a dotted path from the request's top level)."""
    return InvalidBody(f"{path}: {message}", param=path)


def join(*parts: str) -> str:
    return ".".join(parts)


def check(schema: dict[str, Any], field: str) -> None:
    """Raise the first problem of ``schema`` (already valid JSON Schema) as a 400 naming its place."""
    _Checker(schema, field).run()


class _Checker:
    """Walks a schema once: supported keywords, limits, resolvable references, a finite instance exists."""

    def __init__(self, root: dict[str, Any], field: str) -> None:
        self.root = root
        self.field = field
        self.properties = 0
        self.enum_values = 0

    def run(self) -> None:
        self.node(self.root, self.field, 0)
        if not _Finite(self.root).of(self.root):
            raise refuse(self.field, "no finite document satisfies the schema (a required property refers back "
                         "to its own object without end); make the recursive property optional")

    def node(self, s: Any, path: str, depth: int) -> None:
        if not isinstance(s, dict):
            raise refuse(path, "boolean schemas are not supported here; use {} for any value")
        for key in s:
            if key not in SUPPORTED and key not in ANNOTATIONS:
                raise refuse(join(path, key), f"'{key}' is not supported in structured output")
        constraining = [k for k in s if k in SUPPORTED and k not in DEFS]
        for combinator in ("$ref", "anyOf"):
            if combinator in s and (extra := [k for k in constraining if k != combinator]):
                raise refuse(join(path, extra[0]), f"'{extra[0]}' beside '{combinator}' is not supported; "
                             f"move it into the referenced schema or into each alternative")
        for defs in DEFS:
            for name, sub in (s.get(defs) or {}).items():
                self.node(sub, join(path, defs, name), depth)
        if "$ref" in s:
            self.ref(s["$ref"], join(path, "$ref"))
        for i, alt in enumerate(s.get("anyOf") or []):
            self.node(alt, join(path, "anyOf", str(i)), depth)
        if "enum" in s:
            self.enum_values += len(s["enum"])
            if self.enum_values > MAX_ENUM_VALUES:
                raise refuse(join(path, "enum"), f"more than {MAX_ENUM_VALUES} enum values in the schema")
        types = s.get("type")
        if isinstance(types, list) and not ({"enum", "const"} & s.keys()):
            for t in types:  # each type is checked as its own alternative (how it is compiled)
                self.typed(s, t, path, depth)
        elif not ({"enum", "const"} & s.keys()):
            self.typed(s, types, path, depth)

    def typed(self, s: dict[str, Any], t: str | None, path: str, depth: int) -> None:
        if t in (None, "object"):
            props = s.get("properties") or {}
            if props or isinstance(s.get("additionalProperties"), dict):
                self.nest(path, depth)
            self.properties += len(props)
            if self.properties > MAX_PROPERTIES:
                raise refuse(join(path, "properties"), f"more than {MAX_PROPERTIES} properties in the schema")
            for name, sub in props.items():
                self.node(sub, join(path, "properties", name), depth + 1)
            for i, name in enumerate(s.get("required") or []):
                if name not in props:
                    raise refuse(join(path, "required", str(i)), f"required property '{name}' is not defined "
                                 "in 'properties'")
            if isinstance(extra := s.get("additionalProperties"), dict):
                self.node(extra, join(path, "additionalProperties"), depth + 1)
        if t in (None, "array"):
            self.array(s, path, depth)
        if t in (None, "string"):
            self.string(s, path, t)

    def array(self, s: dict[str, Any], path: str, depth: int) -> None:
        if "prefixItems" in s:
            if extra := [k for k in ("items", "minItems", "maxItems") if k in s]:
                raise refuse(join(path, extra[0]), f"'{extra[0]}' beside 'prefixItems' is not supported "
                             "(prefixItems fixes the array's length)")
            self.nest(path, depth)
            for i, sub in enumerate(s["prefixItems"]):
                self.node(sub, join(path, "prefixItems", str(i)), depth + 1)
            return
        for bound in ("minItems", "maxItems"):
            if bound in s and "items" not in s:
                raise refuse(join(path, bound), f"'{bound}' needs 'items' (the schema of each element)")
            if s.get(bound, 0) > MAX_REPEAT:
                raise refuse(join(path, bound), f"must be at most {MAX_REPEAT}")
        if s.get("minItems", 0) > s.get("maxItems", MAX_REPEAT):
            raise refuse(join(path, "minItems"), "must not exceed maxItems")
        if "items" in s:
            self.nest(path, depth)
            self.node(s["items"], join(path, "items"), depth + 1)

    def string(self, s: dict[str, Any], path: str, t: str | None) -> None:
        bounds = [k for k in ("minLength", "maxLength") if k in s]
        if "format" in s:
            if s["format"] not in FORMATS:
                raise refuse(join(path, "format"), f"format '{s['format']}' is not supported; supported: "
                             f"{', '.join(sorted(FORMATS))}")
            if bounds:
                raise refuse(join(path, bounds[0]), f"'{bounds[0]}' beside 'format' is not supported")
        for bound in bounds:
            if t != "string":
                raise refuse(join(path, bound), f"'{bound}' needs \"type\": \"string\"")
            if s[bound] > MAX_REPEAT:
                raise refuse(join(path, bound), f"must be at most {MAX_REPEAT}")
        if s.get("minLength", 0) > s.get("maxLength", MAX_REPEAT):
            raise refuse(join(path, "minLength"), "must not exceed maxLength")

    def nest(self, path: str, depth: int) -> None:
        if depth >= MAX_DEPTH:
            raise refuse(path, f"objects and arrays nest deeper than {MAX_DEPTH} levels")

    def ref(self, ref: Any, path: str) -> None:
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise refuse(path, "only references inside the schema ('#/$defs/...') are supported")
        if _resolve(self.root, ref) is None:
            raise refuse(path, f"'{ref}' does not resolve to a schema in this document")


def _resolve(root: dict[str, Any], ref: str) -> Any:
    node: Any = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node if isinstance(node, dict) else None


class _Finite:
    """Whether a (sub)schema has a finite instance: the least fixpoint over its references."""

    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root
        self.known: dict[str, bool] = {}

    def of(self, s: dict[str, Any]) -> bool:
        while True:  # Kleene iteration: references start as "no finite instance" and only ever turn true
            before = dict(self.known)
            result = self._node(s, set())
            if self.known == before:
                return result

    def _node(self, s: dict[str, Any], seen: set[str]) -> bool:
        if "enum" in s or "const" in s:
            return True
        if (ref := s.get("$ref")) is not None:
            if ref in seen:
                return self.known.get(ref, False)
            target = _resolve(self.root, ref) or {}
            self.known[ref] = self.known.get(ref, False) or self._node(target, seen | {ref})
            return self.known[ref]
        if "anyOf" in s:
            return any(self._node(alt, seen) for alt in s["anyOf"])
        types = s.get("type")
        return any(self._typed(s, t, seen) for t in (types if isinstance(types, list) else [types]))

    def _typed(self, s: dict[str, Any], t: str | None, seen: set[str]) -> bool:
        if t in (None, "object") and (props := s.get("properties")):
            if not all(self._node(props[name], seen) for name in s.get("required") or []):
                return False
        if t in (None, "array"):
            if "prefixItems" in s:
                return all(self._node(sub, seen) for sub in s["prefixItems"])
            if s.get("minItems", 0) > 0 and isinstance(s.get("items"), dict):
                return self._node(s["items"], seen)
        return True
