"""GSM8K and CommonsenseQA prompts, answer extraction on tricky outputs, dataset loading."""

from pathlib import Path

import pytest

from shared.tasks import CSQA, GSM8K, extract_csqa, extract_gsm8k, gsm8k_gold, normalize_number

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.parametrize(
    "text, expected",
    [
        (" 5 + 3 = 8. The answer is 8.", "8"),
        (" The answer is $1,234.", "1234"),
        (" The answer is 1,234.50 dollars.", "1234.5"),
        (" The answer is 8.00.", "8"),
        (" The answer is -3.", "-3"),
        (" So she has 23 - 15 = 8 dollars left.", "8"),  # no "The answer is": last number
        (" The answer is 6. The answer is 7.", "6"),  # several candidates: the first statement
        (" The answer is 10.\nQ: Another question? A: The answer is 99.", "10"),
        (" 4 + 4 = 8\n\nQ: made up. The answer is 5.", "8"),  # an invented next exemplar is ignored
        (" the answer is: $ 42", "42"),
        (" no numbers at all", None),
    ],
)
def test_extract_gsm8k(text: str, expected: str | None) -> None:
    assert extract_gsm8k(text) == expected


def test_normalize_number() -> None:
    assert normalize_number("$1,000") == "1000"
    assert normalize_number("0.50") == "0.5"
    assert normalize_number("abc") is None


def test_gsm8k_gold() -> None:
    assert gsm8k_gold("step\n#### 1,080") == "1080"


@pytest.mark.parametrize(
    "text, expected",
    [
        (" ... So the answer is (C).", "C"),
        (" So the answer is (e).", "E"),
        (" The answer is B.", "B"),
        (" Of the choices, (A) fits best.", "A"),
        (" So the answer is (B).\nQ: next? A: So the answer is (D).", "B"),
        (" I do not know.", None),
    ],
)
def test_extract_csqa(text: str, expected: str | None) -> None:
    assert extract_csqa(text) == expected


def test_gsm8k_prompt_is_8_shot_and_ends_open() -> None:
    prompt = GSM8K.build_prompt("How many?")
    assert prompt.count("Q: ") == 9 and prompt.count("The answer is") == 8
    assert prompt.endswith("Q: How many?\nA:")


def test_csqa_prompt_is_7_shot() -> None:
    prompt = CSQA.build_prompt("Where? Answer Choices: (A) here (B) there")
    assert prompt.count("Q: ") == 8 and prompt.count("So the answer is") == 7


def test_load_real_data_and_exemplar_detection() -> None:
    gsm = list(GSM8K.load(DATA / "gsm8k" / "train.jsonl"))
    assert len(gsm) == 7473 and gsm[0].gold == "72"
    assert len({e.id for e in gsm}) == len({e.question for e in gsm})
    csqa = list(CSQA.load(DATA / "csqa" / "train.jsonl"))
    assert len(csqa) == 9741 and csqa[0].gold == "A" and "Answer Choices: (A) ignore" in csqa[0].question
    assert CSQA.is_exemplar("Sammy wanted to go to where the people were. Where might he go? Answer Choices: (A) x")
    assert not GSM8K.is_exemplar(gsm[0].question)


@pytest.mark.parametrize(
    "text, gold, right",
    [
        (" 3 * $4 = $12. The answer is $12.00.", "12", True),
        (" The answer is 1,000,000.", "1000000", True),
        (" She pays 0.50 * 3 = 1.5 dollars. The answer is 1.50", "1.5", True),
        (" The answer is 18 dollars per hour, not 20.", "18", True),
        (" 60 / 4 = 15 minutes each, so 15 + 5 = 20", "20", True),        # no "The answer is": last number
        (" 60 / 4 = 15 minutes each, so 15 + 5 = 20 minutes in 2 days", "20", False),  # ... which can mislead
        (" The answer is 7.\n\nQ: Tom has 3. A: The answer is 3.", "3", False),  # the invented exemplar never counts
        (" The answer is -12.", "12", False),
    ],
)
def test_gsm8k_scoring_on_tricky_outputs(text: str, gold: str, right: bool) -> None:
    assert GSM8K.score(text, gold) is right


def test_stated_answer_needs_the_phrase() -> None:
    # Guidance "holds the answer" only when it states it; a number mid-computation is not the answer.
    assert GSM8K.stated_answer(" 48 / 2 = 24 clips in May. 48 + 24 = 72. The answer is 72") == "72"
    assert GSM8K.stated_answer(" 48 / 2 = 24 clips in May. 48 + 24 = 72") is None
    assert GSM8K.stated_answer(" The answer is $1,200.") == "1200"
    assert CSQA.stated_answer(" Only a blotter absorbs ink. So the answer is (e)") == "E"
    assert CSQA.stated_answer(" Of the above choices, (A) and (B) are places.") is None
    assert CSQA.stated_answer(" x.\nQ: y? A: So the answer is (B).") is None


def test_zero_shot_prompt_is_short_and_keeps_the_answer_format() -> None:
    question = "Tom has 3 apples and buys 4 more. How many apples does he have?"
    short, long = GSM8K.build_prompt(question, "zero_shot"), GSM8K.build_prompt(question)
    assert short.endswith(f"Q: {question}\nA:") and long.endswith(f"Q: {question}\nA:")
    assert '"The answer is N."' in short and "Q: There are 15 trees" not in short
    assert len(short) * 6 < len(long)  # the prefill saved is the exemplars
    assert GSM8K.extract(" 3 + 4 = 7. The answer is 7.\nQ: next") == "7"
    assert "(X)" in CSQA.build_prompt("Where? Answer Choices: (A) here (B) there", "zero_shot")
    with pytest.raises(ValueError, match="unknown prompt style"):
        GSM8K.build_prompt(question, "two_shot")  # type: ignore[arg-type]


def test_gsm8k_solution_in_the_exemplars_format() -> None:
    ex = next(GSM8K.load(DATA / "gsm8k" / "train.jsonl"))
    assert ex.solution == ("Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether in April "
                           "and May. The answer is 72.")
    assert GSM8K.extract(ex.solution) == ex.gold == "72"
    assert next(CSQA.load(DATA / "csqa" / "train.jsonl")).solution is None
