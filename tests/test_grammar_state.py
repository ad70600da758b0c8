"""The split under a grammar, on the real 0.5B student (shared/grammar.py).

The guidance (the start of a JSON document another model wrote) is cut anywhere; the student's grammar state
is advanced over it, and the student continues under the same grammar with llama-cpp-python's own
``generate`` (the grammar as a logits processor, each received token accepted), as the edge's runners will
run it. Guidance + continuation must parse and validate against the schema every time: greedy and sampled,
at every cut. Text the grammar does not allow ends the valid prefix, without touching the state.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest

from shared.grammar import GrammarError, GrammarState
from shared.models import DEFAULT_STUDENT, resolve
from shared.structured import compile_schema

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer"},
        "languages": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4},
        "role": {"enum": ["engineer", "poet", "mathematician"]},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "languages", "role", "active"],
    "additionalProperties": False,
}
# What a teacher might have written: the cuts below take every prefix of it as guidance.
DOCUMENT = '{"name": "Zoë Ada", "age": 36, "languages": ["English", "Fran'
PROMPT = ("<|im_start|>system\nYou answer with JSON only.<|im_end|>\n<|im_start|>user\nDescribe a fictional "
          "person: name, age, languages, role, active.<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def llm() -> Iterator[Any]:
    import llama_cpp

    model = llama_cpp.Llama(model_path=str(resolve(DEFAULT_STUDENT)), n_ctx=1024, n_threads=1, n_threads_batch=1,
                            verbose=False)
    yield model
    model.close()


@pytest.fixture(scope="module")
def grammar() -> str:
    return compile_schema(SCHEMA)


def continue_under(llm: Any, state: GrammarState, guidance: str, *, temperature: float, seed: int = 0,
                   max_tokens: int = 80) -> str:
    """The student's continuation of ``PROMPT + guidance`` under ``state`` (advanced over the guidance)."""
    import llama_cpp

    llm.set_seed(seed)
    tokens = llm.tokenize((PROMPT + guidance).encode(), add_bos=False, special=True)
    processor = llama_cpp.LogitsProcessorList([state.processor(temperature=temperature, seed=seed)])
    out: list[int] = []
    for tok in llm.generate(tokens, temp=temperature, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                            logits_processor=processor, reset=True):
        if llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), tok):
            break
        state.accept(tok)
        out.append(tok)
        if len(out) >= max_tokens:
            break
    return llm.detokenize(out).decode("utf-8")


CUTS = [0, 1, 9, 13, 17, 25, 30, 44, len(DOCUMENT)]


@pytest.mark.models
@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_guidance_cut_anywhere_plus_student_continuation_validates(
    llm: Any, grammar: str, cut: int, temperature: float
) -> None:
    guidance = DOCUMENT[:cut]
    with GrammarState(llm, grammar) as state:
        assert state.advance(guidance) == len(guidance)
        assert state.text == guidance
        answer = guidance + continue_under(llm, state, guidance, temperature=temperature, seed=cut)
        assert state.complete, answer
    jsonschema.validate(json.loads(answer), SCHEMA)


@pytest.mark.models
def test_json_object_mode_gives_an_object(llm: Any) -> None:
    from shared.structured import JSONObjectFormat

    grammar = JSONObjectFormat(type="json_object").grammar
    assert grammar is not None
    with GrammarState(llm, grammar) as state:
        answer = continue_under(llm, state, "", temperature=0.0, max_tokens=120)
    assert isinstance(json.loads(answer), dict)


@pytest.mark.models
def test_text_outside_the_grammar_ends_the_valid_prefix_and_leaves_the_state(llm: Any, grammar: str) -> None:
    with GrammarState(llm, grammar) as state:
        # Another grammar engine may indent; ours allows one space between tokens, no newlines.
        assert state.valid_prefix('{"name": "A",\n  "age": 3') == len('{"name": "A",')
        assert state.valid_prefix('{"age": 3}') == len('{"')  # properties come in the schema's order
        assert state.valid_prefix('{"name": 5') == len('{"name": ')
        assert state.text == "" and not state.complete
        assert state.advance('{"name": "A", "age": x') == len('{"name": "A", "age": ')
        assert state.text == '{"name": "A", "age": '
        # A refused token raises (llama.cpp itself would abort the process) and changes nothing.
        quote = llm.tokenize(b'"', add_bos=False, special=False)[0]
        with pytest.raises(GrammarError):
            state.accept(quote)
        assert state.advance("36") == 2


@pytest.mark.models
def test_clone_is_independent(llm: Any, grammar: str) -> None:
    with GrammarState(llm, grammar) as state:
        state.advance('{"name": "A"')
        with state.clone() as probe:
            assert probe.advance(', "age": 1') == len(', "age": 1')
        assert state.valid_prefix(', "age": 1') == len(', "age": 1')
        assert state.text == '{"name": "A"'
