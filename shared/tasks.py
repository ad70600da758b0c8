"""Few-shot tasks from the GKT paper: GSM8K (8-shot chain of thought) and CommonsenseQA (7-shot).

A task turns a question into a raw prompt (plain completion scored better than wrapping the same prompt in a
chat template on the small models here), names its stop sequences, and extracts and scores the final answer.
Two prompt styles: ``few_shot`` (the exemplars, then the question: ~750 tokens on GSM8K) and ``zero_shot`` (one
instruction line that names the answer format, then the question: ~40 tokens plus the question), the format a
distilled student is trained on and answers in, so neither side pays for the exemplars' prefill. The exemplars
are the chain-of-thought ones of Wei et al. (2022); the CommonsenseQA fox exemplar's label is corrected to (C).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

_GSM8K_SHOTS = [
    (
        "There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are "
        "done, there will be 21 trees. How many trees did the grove workers plant today?",
        "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must "
        "have been 21 - 15 = 6. The answer is 6.",
    ),
    (
        "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
        "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5.",
    ),
    (
        "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in "
        "total?",
        "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After "
        "eating 35, they had 74 - 35 = 39. The answer is 39.",
    ),
    (
        "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops "
        "did Jason give to Denny?",
        "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny "
        "20 - 12 = 8. The answer is 8.",
    ),
    (
        "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he "
        "have now?",
        "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. "
        "5 + 4 = 9. The answer is 9.",
    ),
    (
        "There were nine computers in the server room. Five more computers were installed each day, from "
        "monday to thursday. How many computers are now in the server room?",
        "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 "
        "computers were added. 9 + 20 is 29. The answer is 29.",
    ),
    (
        "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many "
        "golf balls did he have at the end of wednesday?",
        "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 "
        "more, he had 35 - 2 = 33 golf balls. The answer is 33.",
    ),
    (
        "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
        "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 "
        "dollars left. 23 - 15 is 8. The answer is 8.",
    ),
]

_CSQA_SHOTS = [
    (
        "What do people use to absorb extra ink from a fountain pen?",
        ["shirt pocket", "calligrapher's hand", "inkwell", "desk drawer", "blotter"],
        "The answer must be an item that can absorb ink. Of the above choices, only blotters are used to "
        "absorb ink. So the answer is (E).",
    ),
    (
        "What home entertainment equipment requires cable?",
        ["radio shack", "substation", "television", "cabinet"],
        "The answer must require cable. Of the above choices, only television requires cable. So the answer "
        "is (C).",
    ),
    (
        "The fox walked from the city into the forest, what was it looking for?",
        ["pretty flowers", "hen house", "natural habitat", "storybook"],
        "The answer must be something in the forest. Of the above choices, only natural habitat is in the "
        "forest. So the answer is (C).",
    ),
    (
        "Sammy wanted to go to where the people were. Where might he go?",
        ["populated areas", "race track", "desert", "apartment", "roadblock"],
        "The answer must be a place with a lot of people. Of the above choices, only populated areas have a "
        "lot of people. So the answer is (A).",
    ),
    (
        "Where do you put your grapes just before checking out?",
        ["mouth", "grocery cart", "super market", "fruit basket", "fruit market"],
        "The answer should be the place where grocery items are placed before checking out. Of the above "
        "choices, grocery cart makes the most sense for holding grocery items. So the answer is (B).",
    ),
    (
        "Google Maps and other highway and street GPS services have replaced what?",
        ["united states", "mexico", "countryside", "atlas"],
        "The answer must be something that used to do what Google Maps and GPS services do, which is to give "
        "directions. Of the above choices, only atlases are used to give directions. So the answer is (D).",
    ),
    (
        "Before getting a divorce, what did the wife feel who was doing all the work?",
        ["harder", "anguish", "bitterness", "tears", "sadness"],
        "The answer should be the feeling of someone getting divorced who was doing all the work. Of the "
        "above choices, the closest feeling is bitterness. So the answer is (C).",
    ),
]

_LABELS = "ABCDEFGH"


@dataclass(frozen=True)
class Example:
    """One dataset item: the question as the model sees it, the gold answer and, where the dataset has one, the
    gold solution written in the task's answer format (the lesson of plain fine-tuning)."""

    id: str
    question: str
    gold: str
    solution: str | None = None


PromptStyle = Literal["few_shot", "zero_shot"]
PROMPT_STYLES: tuple[PromptStyle, ...] = ("few_shot", "zero_shot")


def _few_shot(shots: list[tuple[str, str]], question: str) -> str:
    head = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in shots)
    return f"{head}Q: {question.strip()}\nA:"


def _zero_shot(instruction: str, question: str) -> str:
    # The same "Q: ...\nA:" frame as the exemplars, so the stop sequences and extraction are the same.
    return f"{instruction}\n\nQ: {question.strip()}\nA:"


def _cut_at_next_question(text: str) -> str:
    # A model that was not stopped may go on to invent the next exemplar; only the first answer counts.
    return re.split(r"\n\s*Q:", text, maxsplit=1)[0]


# --- GSM8K ---------------------------------------------------------------------------------------------

_NUMBER = r"-?\$?\s?\d[\d,]*(?:\.\d+)?"
_ANSWER_IS = re.compile(r"the answer is[:\s]*(?:\$\s?)?(" + _NUMBER + ")", re.IGNORECASE)
_ANY_NUMBER = re.compile(_NUMBER)


def normalize_number(raw: str) -> str | None:
    """'$1,234.50' -> '1234.5'; '8.00' -> '8'; '-3' -> '-3'. None when there is no number."""
    s = raw.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        value = float(s)
    except ValueError:
        return None
    if value == int(value):
        return str(int(value))
    return f"{value:.6f}".rstrip("0").rstrip(".")


def extract_gsm8k(text: str) -> str | None:
    """The number after the first 'The answer is'; without that phrase, the last number in the answer."""
    text = _cut_at_next_question(text)
    m = _ANSWER_IS.search(text)
    if m:
        return normalize_number(m.group(1))
    numbers = _ANY_NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


_CALCULATOR = re.compile(r"<<[^<>]*>>")


def gsm8k_solution(answer: str, gold: str) -> str:
    """A GSM8K solution in the exemplars' format: calculator annotations dropped, lines joined, and the
    '#### N' line replaced by 'The answer is N.'"""
    body = _CALCULATOR.sub("", answer.rsplit("####", 1)[0]).strip()
    steps = " ".join(line.strip() for line in body.splitlines() if line.strip())
    return f"{steps} The answer is {gold}." if steps else f"The answer is {gold}."


def gsm8k_gold(answer: str) -> str:
    """The gold number after '####' in a GSM8K solution."""
    gold = normalize_number(answer.rsplit("####", 1)[-1].strip())
    if gold is None:
        raise ValueError(f"no gold number in GSM8K answer: {answer[-40:]!r}")
    return gold


# --- CommonsenseQA -------------------------------------------------------------------------------------


def format_csqa_question(stem: str, choices: list[str]) -> str:
    """'stem Answer Choices: (A) x (B) y ...' as in the exemplars."""
    opts = " ".join(f"({_LABELS[i]}) {c}" for i, c in enumerate(choices))
    return f"{stem.strip()} Answer Choices: {opts}"


_CSQA_ANSWER_IS = re.compile(r"answer is[:\s]*\(?([A-Ha-h])\)?(?![A-Za-z])")
_CSQA_LABEL = re.compile(r"\(([A-Ha-h])\)")


def extract_csqa(text: str) -> str | None:
    """The letter after 'answer is'; without that phrase, the last '(X)' label in the answer."""
    text = _cut_at_next_question(text)
    m = _CSQA_ANSWER_IS.search(text)
    if m:
        return m.group(1).upper()
    labels = _CSQA_LABEL.findall(text)
    return labels[-1].upper() if labels else None


# --- the registry ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """A few-shot task: prompt builder, stop sequences, answer extraction and a dataset loader."""

    name: str
    stop: tuple[str, ...]
    shots: tuple[tuple[str, str], ...]
    extract: Callable[[str], str | None]
    parse_line: Callable[[dict], Example]
    answer_is: re.Pattern[str]
    normalize: Callable[[str], str | None]
    instruction: str  # the zero-shot prompt's one line: what to do and the answer line's format
    answer_line: Callable[[str], str]  # gold -> the answer line ("The answer is 8.")

    def build_prompt(self, question: str, style: PromptStyle = "few_shot") -> str:
        if style == "zero_shot":
            return _zero_shot(self.instruction, question)
        if style != "few_shot":
            raise ValueError(f"unknown prompt style {style!r}; expected one of {', '.join(PROMPT_STYLES)}")
        return _few_shot(list(self.shots), question)

    def is_exemplar(self, question: str) -> bool:
        """True for the questions used as exemplars (an evaluation must skip them)."""
        q = question.strip().split(" Answer Choices:")[0].strip().lower()
        return any(s[0].split(" Answer Choices:")[0].strip().lower() == q for s in self.shots)

    def stated_answer(self, text: str) -> str | None:
        """The answer only when the text states it ("The answer is ..."), never the fallback guess.

        An evaluation uses it to tell whether the teacher's guidance already held the final answer.
        """
        m = self.answer_is.search(_cut_at_next_question(text))
        return self.normalize(m.group(1)) if m else None

    def score(self, text: str, gold: str) -> bool:
        return self.extract(text) == gold

    def load(self, path: str | Path) -> Iterator[Example]:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield self.parse_line(json.loads(line))


def _gsm8k_line(obj: dict) -> Example:
    question = obj["question"]
    # GSM8K lines carry no id: a content hash is stable across runs (resumable evaluations rely on it).
    qid = str(obj.get("id") or hashlib.sha1(question.encode("utf-8")).hexdigest()[:16])
    gold = gsm8k_gold(obj["answer"])
    return Example(id=qid, question=question, gold=gold, solution=gsm8k_solution(obj["answer"], gold))


def _csqa_line(obj: dict) -> Example:
    q = obj["question"]
    choices = sorted(q["choices"], key=lambda c: c["label"])
    return Example(id=str(obj["id"]), question=format_csqa_question(q["stem"], [c["text"] for c in choices]),
                   gold=obj["answerKey"].upper())


GSM8K = Task(
    name="gsm8k",
    stop=("\nQ:", "\n\n\n"),
    shots=tuple(_GSM8K_SHOTS),
    extract=extract_gsm8k,
    parse_line=_gsm8k_line,
    answer_is=_ANSWER_IS,
    normalize=normalize_number,
    instruction='Answer the math question. Reason step by step, then end with "The answer is N." where N is '
    "the final number.",
    answer_line=lambda gold: f"The answer is {gold}.",
)

CSQA = Task(
    name="csqa",
    stop=("\nQ:", "\n\n\n"),
    shots=tuple((format_csqa_question(q, c), a) for q, c, a in _CSQA_SHOTS),
    extract=extract_csqa,
    parse_line=_csqa_line,
    answer_is=_CSQA_ANSWER_IS,
    normalize=str.upper,
    instruction='Answer the multiple-choice question. Reason in a sentence or two, then end with "So the answer '
    'is (X)." where X is the letter of the best choice.',
    answer_line=lambda gold: f"So the answer is ({gold}).",
)

TASKS: dict[str, Task] = {t.name: t for t in (GSM8K, CSQA)}
