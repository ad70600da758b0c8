"""The structured-output core without a model: ``response_format`` checked and compiled (shared/structured.py).

Every refused schema is a 400 ``invalid_request`` naming the exact place; every accepted one compiles to a
grammar that llama.cpp's own parser takes. No model is loaded (llama.cpp parses grammars without a vocabulary).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from shared.errors import ErrorCode, GKTError
from shared.schema_check import MAX_DEPTH
from shared.structured import ResponseFormat, compile_schema

FORMAT: TypeAdapter[Any] = TypeAdapter(ResponseFormat)
ROOT = "response_format.json_schema.schema"


def fmt(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def refused(schema: Any) -> GKTError:
    with pytest.raises(GKTError) as info:
        FORMAT.validate_python(fmt(schema))
    assert info.value.code is ErrorCode.invalid_request and info.value.status == 400
    assert info.value.param and info.value.message.startswith(info.value.param)
    return info.value


def nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"x": schema}, "required": ["x"]}
    return schema


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"enum": ["a", "b\\c", 'd"e']}, "maxItems": 3},
        "born": {"type": "string", "format": "date"},
        "spouse": {"anyOf": [{"$ref": "#/$defs/ref"}, {"type": "null"}]},
        "score": {"type": ["number", "null"]},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
    "$defs": {"ref": {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]}},
}
LINKED = {  # recursive with a way out: "next" is optional
    "$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"}, "next": {"$ref": "#/$defs/node"}},
                       "required": ["v"]}},
    "$ref": "#/$defs/node",
}


@pytest.mark.parametrize("schema", [PERSON, LINKED, {}, {"type": "array", "items": {"type": "boolean"}},
                                    {"enum": [1, "x", None, {"k": [1]}]}, nested(MAX_DEPTH)])
def test_supported_schemas_compile_to_a_grammar_llama_cpp_parses(schema: dict[str, Any]) -> None:
    grammar = FORMAT.validate_python(fmt(schema)).grammar
    assert grammar and "root ::=" in grammar


def test_json_object_and_text() -> None:
    assert FORMAT.validate_python({"type": "json_object"}).grammar
    assert FORMAT.validate_python({"type": "text"}).grammar is None


@pytest.mark.parametrize(("schema", "param"), [
    ({"type": "object", "properties": {"x": {"type": "integer", "minimum": 0}}}, f"{ROOT}.properties.x.minimum"),
    ({"type": "object", "properties": {"x": {"type": "object", "patternProperties": {"^a": {}}}}},
     f"{ROOT}.properties.x.patternProperties"),
    ({"type": "string", "pattern": "^a+$"}, f"{ROOT}.pattern"),
    ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, f"{ROOT}.oneOf"),
    ({"type": "string", "format": "email"}, f"{ROOT}.format"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, f"{ROOT}.uniqueItems"),
    ({"type": "objekt"}, f"{ROOT}.type"),  # not JSON Schema at all
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}, f"{ROOT}.required.0"),
    ({"$ref": "https://example.com/s.json"}, f"{ROOT}.$ref"),
    ({"$ref": "#/$defs/missing"}, f"{ROOT}.$ref"),
    ({"anyOf": [{"type": "string"}], "minLength": 2}, f"{ROOT}.minLength"),
    ({"type": "array", "minItems": 2}, f"{ROOT}.minItems"),
    ({"type": "string", "maxLength": 100_000}, f"{ROOT}.maxLength"),
    ({"type": "object", "properties": {"a": True}}, f"{ROOT}.properties.a"),
    (nested(MAX_DEPTH + 1), ROOT + ".properties.x" * MAX_DEPTH),
    ({"enum": ["x" * 1000] * 70}, ROOT),  # larger than the size limit
])
def test_unsupported_invalid_or_too_large_schemas_are_refused_naming_the_place(schema: Any, param: str) -> None:
    assert refused(schema).param == param


@pytest.mark.parametrize("schema", [
    # every instance would be infinite: "next" is required and refers back to its own object
    {"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}, "required": ["next"]}},
     "$ref": "#/$defs/n"},
    {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},  # a cycle of names
])
def test_recursion_without_end_is_refused(schema: dict[str, Any]) -> None:
    err = refused(schema)
    assert err.param == ROOT and "finite" in err.message


def test_bad_envelope_fields_are_named() -> None:
    with pytest.raises(ValueError, match="json_schema.name"):
        FORMAT.validate_python({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}})
    with pytest.raises(ValueError, match="type"):
        FORMAT.validate_python({"type": "structural_tag"})


def test_the_schema_key_travels_under_its_own_name() -> None:
    dumped = FORMAT.validate_python(fmt(PERSON)).model_dump()
    assert dumped["json_schema"]["schema"] == PERSON and "schema_" not in json.dumps(dumped)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["type", "properties", "items", "required", "enum", "$ref", "anyOf", "minItems",
                         "maxLength", "format", "$defs", "additionalProperties", "const", "x"]) | st.text(max_size=6),
        inner, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(schema=st.dictionaries(st.sampled_from(["type", "properties", "items", "enum", "$ref", "anyOf"]), JSON,
                              max_size=4))
def test_any_schema_compiles_or_is_a_400(schema: dict[str, Any]) -> None:
    """Whatever a client sends, the answer is a grammar or an invalid_request naming a place: never a crash."""
    try:
        assert compile_schema(schema)
    except GKTError as err:
        assert err.code is ErrorCode.invalid_request and err.param and err.param.startswith(ROOT)


def test_the_answer_keeps_the_schemas_property_order() -> None:
    root = next(line for line in compile_schema(PERSON).splitlines() if line.startswith("root ::="))
    assert root.index("name-kv") < root.index("age-kv")
