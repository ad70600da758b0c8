"""Response priming (arXiv 2412.17846): how the teacher is asked to write a lesson.

The student is always trained on the *unprimed* prompt (``student_prompt``); only the teacher sees the
priming, so the lesson carries what the priming drew out of the teacher (a simpler explanation, a check, the
reasoning towards a known answer) without the student needing the hint at inference.

* ``base``: the student's own prompt (distillation without priming);
* ``teacher``: asked to explain simply, as a teacher to a student who has not seen the problem;
* ``ground_truth``: given the gold solution (or the gold answer where the dataset has none) and asked to write
  its own step-by-step answer that ends in the task's answer line;
* ``confidence``: asked to double-check the result before the answer line.
"""

from __future__ import annotations

from typing import Literal

from shared.tasks import Example, PromptStyle, Task

Strategy = Literal["base", "teacher", "ground_truth", "confidence"]
STRATEGIES: tuple[Strategy, ...] = ("base", "teacher", "ground_truth", "confidence")

_TEACHER = ("You are a patient teacher. Explain the solution simply and clearly, step by step, for a student who "
            "has never seen this kind of problem.")
_CONFIDENCE = "Before the final line, briefly double-check the calculation or the choice."


def answer_template(task: Task) -> str:
    """The answer line as the ``ground_truth`` priming spells it, with a placeholder ("The answer is N.")."""
    return task.answer_line("N" if task.name == "gsm8k" else "X")


def stop_sequences(task: Task, strategy: Strategy) -> list[str]:
    """The task's stops, and under ``ground_truth`` the priming's own answer template: after its answer line
    the 1.5B teacher was seen repeating the template ("The answer is 20. The answer is N. The answer is N. ...")
    to the token budget, which the lesson drops anyway (it ends at the first answer line)."""
    return [*task.stop, answer_template(task)] if strategy == "ground_truth" else list(task.stop)


def student_prompt(task: Task, example: Example, style: PromptStyle = "zero_shot") -> str:
    """What the student sees, in training and at inference."""
    return task.build_prompt(example.question, style)


def teacher_prompt(task: Task, example: Example, strategy: Strategy, style: PromptStyle = "zero_shot") -> str:
    """What the teacher sees under ``strategy``: the student's prompt with the priming around it."""
    if strategy == "base":
        return task.build_prompt(example.question, style)
    if strategy == "teacher":
        return f"{_TEACHER}\n\n{task.build_prompt(example.question, style)}"
    if strategy == "confidence":
        return f"{_CONFIDENCE}\n\n{task.build_prompt(example.question, style)}"
    if strategy == "ground_truth":
        reference = example.solution or task.answer_line(example.gold)
        # The hint sits with the question (the exemplars, if any, stay unprimed), and the teacher is told to
        # write its own answer: a copied reference would teach the dataset's terse style, not the teacher's.
        question = (f"{example.question.strip()}\n(A correct reference solution, for you only: {reference} "
                    f"Write your own clear step-by-step answer that reaches the same result and ends with "
                    f'"{answer_template(task)}")')
        return task.build_prompt(question, style)
    raise ValueError(f"unknown priming strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
