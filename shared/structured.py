"""Structured output: the OpenAI ``response_format`` field, checked and compiled to a llama.cpp grammar.

``response_format`` is ``{"type": "text"}`` (no constraint), ``{"type": "json_object"}`` (any JSON object) or
``{"type": "json_schema", "json_schema": {"name", "schema", "strict"?, "description"?}}``. A schema is checked
once, when the request is parsed, and every problem is a 400 naming the exact place
(``response_format.json_schema.schema.properties.x.minimum``):

* the schema must be valid JSON Schema (draft 2020-12 meta-schema, checked by ``jsonschema``);
* it must fit the limits of shared/schema_check.py (size, nesting, properties, enum values, repetitions);
* every keyword must be one the grammar enforces (``schema_check.SUPPORTED``); a constraint the grammar would
  drop (``minimum``, ``pattern``, ``oneOf``...) is refused rather than ignored, so that every document the
  grammar allows validates against the schema;
* some instance must be finite (a required property that refers back to its own object forever is refused).

Recursive schemas (``$ref`` cycles with a way out: trees, linked lists) are allowed: a grammar is recursive
too. What is bounded is the schema itself (nesting depth and size), not the depth of an answer.

The grammar comes from llama-cpp-python's JSON-schema-to-GBNF converter (``SchemaConverter``) with three
corrections: literals escape backslashes (a property name or enum value with ``\\`` broke the grammar), a
string character excludes control characters (raw newlines are not JSON), and an empty schema means any JSON
value (the converter made it "any object"). ``strict`` is accepted and changes nothing: the grammar is always
enforced. The grammar is parsed by llama.cpp itself before the request is accepted.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from shared.schema_check import ANNOTATIONS, DEFS, MAX_GRAMMAR_BYTES, MAX_SCHEMA_BYTES, check, join, refuse

# The JSON string character of RFC 8259: no quote, no backslash, no control character; or an escape.
_CHAR_RULE = r'[^"\\\x7F\x00-\x1F] | [\\] (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])'
_FIELD = "response_format.json_schema.schema"


class JSONSchemaSpec(BaseModel):
    """``response_format.json_schema``: a named schema the answer must validate against."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(None, max_length=4096)
    schema_: dict[str, Any] = Field(alias="schema", description="A JSON Schema (draft 2020-12 subset).")
    strict: bool | None = Field(None, description="Accepted for compatibility: the schema is always enforced.")


class TextFormat(BaseModel):
    """No constraint: plain text (the default)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]

    @property
    def grammar(self) -> str | None:
        return None


class JSONObjectFormat(BaseModel):
    """Any JSON object (OpenAI's JSON mode)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["json_object"]

    @property
    def grammar(self) -> str | None:
        return _compiled(json.dumps({"type": "object"}))


class JSONSchemaFormat(BaseModel):
    """A JSON document that validates against ``json_schema.schema``."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["json_schema"]
    json_schema: JSONSchemaSpec
    _grammar: str = PrivateAttr("")

    @model_validator(mode="after")
    def _check(self) -> JSONSchemaFormat:
        # Raised as GKTError (not ValueError) so the 400 names the place inside the schema, not just the field.
        self._grammar = compile_schema(self.json_schema.schema_)
        return self

    @property
    def grammar(self) -> str | None:
        return self._grammar


ResponseFormat = Annotated[TextFormat | JSONObjectFormat | JSONSchemaFormat, Field(discriminator="type")]


def compile_schema(schema: dict[str, Any], field: str = _FIELD) -> str:
    """Check ``schema`` (every failure a ``GKTError`` naming the place under ``field``) and return its GBNF."""
    # Key order kept: the order of "properties" is the order of the answer's keys.
    raw = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    if len(raw.encode("utf-8")) > MAX_SCHEMA_BYTES:
        raise refuse(field, f"the schema is larger than {MAX_SCHEMA_BYTES} bytes")
    if "\\u0000" in raw:  # a NUL would end the grammar's C string early
        raise refuse(field, "the schema must not contain NUL characters")
    return _compiled(raw, field)


@lru_cache(maxsize=256)
def _compiled(raw: str, field: str = _FIELD) -> str:
    """The checked grammar of a schema in canonical JSON (the same schema is checked and compiled once)."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    schema = json.loads(raw)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = join(field, *(str(p) for p in exc.relative_path))
        raise refuse(where, f"not a valid JSON Schema ({exc.message[:200]})") from None
    check(schema, field)
    grammar = _to_gbnf(schema, field)
    if len(grammar) > MAX_GRAMMAR_BYTES:
        raise refuse(field, f"the schema's grammar is larger than {MAX_GRAMMAR_BYTES} bytes; simplify it")
    _parse_check(grammar, field)
    return grammar


def _to_gbnf(schema: dict[str, Any], field: str) -> str:
    from llama_cpp.llama_grammar import PRIMITIVE_RULES, RESERVED_NAMES, SchemaConverter

    class Converter(SchemaConverter):  # type: ignore[misc]
        """llama-cpp-python's converter with the corrections of the module docstring."""

        def _format_literal(self, literal: str) -> str:
            escaped = literal.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
            return f'"{escaped}"'

        def visit(self, schema: dict[str, Any], name: str) -> str:
            rule = name + "-" if name in RESERVED_NAMES else name or "root"  # as the converter names rules
            if not (schema.keys() - ANNOTATIONS - set(DEFS)):  # {}: any JSON value
                return self._add_rule(rule, self._add_primitive("value", PRIMITIVE_RULES["value"]))
            types = schema.get("type")
            if isinstance(types, list) and not ({"enum", "const"} & schema.keys()):
                # Each type with the schema's own keywords (the converter dropped them for a list of types).
                alts = [{**schema, "type": t} for t in types]
                return self._add_rule(rule, self._generate_union_rule(name, alts))
            return str(super().visit(schema, name))

    converter = Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    try:
        resolved = converter.resolve_refs(json.loads(json.dumps(schema)), "")
        converter.visit(resolved, "")
    except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise refuse(field, "the schema cannot be turned into a grammar") from exc
    if "char" in converter._rules:
        converter._rules["char"] = _CHAR_RULE
    return str(converter.format_grammar())


def _parse_check(grammar: str, field: str) -> None:
    """llama.cpp's own parser must accept the grammar (it refuses e.g. left recursion)."""
    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(None, grammar.encode("utf-8"), b"root")
    if not sampler:
        raise refuse(field, "the schema's grammar was refused by llama.cpp (a reference cycle without content?)")
    llama_cpp.llama_sampler_free(sampler)
