"""Guidance policies decide on scripted signals: teacher text for the first guidance, the student's token
log-probabilities for re-guidance, and the student's text taken back at a safe boundary (pure, no models)."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from edge_agent.draft_length import DraftLength, best_length, kept_per_round, round_s
from edge_agent.policies import (
    AdaptivePolicy,
    FixedPolicy,
    GuidancePolicy,
    ReguidePolicy,
    Reguider,
    VerifyPolicy,
    decision_point,
    first_stop,
    kept_tokens,
    policy_from,
)
from edge_agent.protocol import CompletionRequest
from edge_agent.rollback import StudentRound, cut_before
from shared.generation import Piece

SURE, UNSURE = -0.05, -3.0


def drive(reguider: Reguider, pieces: list[tuple[str, float]]) -> list[tuple[int, str]]:
    """Feed pieces as the pipeline does; return (piece index, reason) of every trigger (a round per trigger)."""
    out, answer = [], ""
    reguider.new_round()
    i = 0
    for text, lp in pieces:
        trig = reguider.observe(answer, text, [lp])
        answer += text
        if trig is not None:
            out.append((i, trig.reason, trig.drop_from))
            reguider.guided(4, 0.1, reguide=True)
            reguider.new_round()
            i = 0
            continue
        i += 1
    return out


# --- request field ---------------------------------------------------------------------------------------


def test_policy_field_takes_a_name_or_an_object_with_documented_defaults() -> None:
    assert CompletionRequest(prompt="x").guidance_policy is None
    assert isinstance(CompletionRequest(prompt="x", guidance_policy="fixed").guidance_policy, FixedPolicy)
    p = CompletionRequest(prompt="x", guidance_policy="reguide").guidance_policy
    assert p == ReguidePolicy() and (p.tokens, p.span, p.max_calls, p.max_teacher_tokens) == (16, 2, 4, 160)
    a = CompletionRequest(prompt="x", guidance_policy={"name": "adaptive", "min_tokens": 8}).guidance_policy
    assert isinstance(a, AdaptivePolicy) and (a.min_tokens, a.max_tokens) == (8, 80)


@pytest.mark.parametrize("bad", ["bogus", {"name": "reguide", "tokens": 0}, {"name": "reguide", "threshold": 1},
                                 {"name": "adaptive", "min_tokens": 50, "max_tokens": 10},
                                 {"name": "fixed", "k": 3}])
def test_policy_field_rejects_unknown_names_parameters_and_ranges_V5(bad: object) -> None:
    with pytest.raises(ValidationError):
        CompletionRequest(prompt="x", guidance_policy=bad)


# --- adaptive first guidance -----------------------------------------------------------------------------


def test_fixed_and_reguide_take_their_k_adaptive_asks_for_its_maximum() -> None:
    assert first_stop(FixedPolicy()) is None and first_stop(ReguidePolicy()) is None
    stop = first_stop(AdaptivePolicy(min_tokens=5, max_tokens=30))
    assert stop is not None and stop.request_tokens() == 30


def test_adaptive_stops_at_the_first_step_boundary_after_min_tokens() -> None:
    stop = first_stop(AdaptivePolicy(min_tokens=4, max_tokens=80))
    assert stop is not None
    frames = [" She", " sold", " 48", ".", " In", " May", " she", " sold", " 48", " /", " 2", " =", " 24", ".",
              " So"]
    text, at_min, ended = "", None, None
    for n, piece in enumerate(frames, 1):
        text += piece
        if at_min is None and n >= 4:
            at_min = len(text)
        if stop.enough(text, n, at_min):
            ended = n
            break
    # " She sold 48." reached min_tokens (4) exactly at its full stop: the next token's space confirms the
    # boundary, so the plan "She sold 48." is out and the stream ends there.
    assert ended == 5
    # Before min_tokens no boundary counts; a decimal point is not a step end.
    assert not stop.enough(" It is 3.5 kg", 6, None)
    assert not stop.enough(" It costs 3.5", 6, len(" It"))
    assert stop.enough(" Total:\n", 3, len(" Total"))


# --- re-guidance decisions -------------------------------------------------------------------------------


def test_decision_points_are_numbers_operators_and_the_answer_line() -> None:
    assert decision_point("So she sold", " 48")
    assert decision_point("48", " =") and decision_point("48 ", "*")
    assert decision_point("So the answer is", " (")
    assert decision_point("So the answer is (", "C")  # the choice letter itself (CommonsenseQA)
    assert decision_point("The answer is $", "1") and decision_point("The Answer: (", "B")
    assert not decision_point("So the answer is (C)", ".")
    assert not decision_point("So she", " sold")
    assert not decision_point("", " ")


def test_a_span_of_unsure_tokens_calls_the_teacher_and_takes_back_the_whole_span() -> None:
    r = Reguider(ReguidePolicy(span=3, min_gap=0, decision_threshold=-5.0), first_tokens=10)
    script = [(" a", SURE), (" b", UNSURE), (" c", UNSURE), (" d", SURE),  # a run of 2 < span: nothing
              (" e", UNSURE), (" f", UNSURE), (" g", UNSURE)]  # 3 in a row: call, taking back from " e"
    assert drive(r, script) == [(6, "low_confidence", 4)]
    assert r.calls == 1 and r.teacher_tokens == 14


def test_one_unsure_token_at_a_decision_point_calls_the_teacher_elsewhere_it_does_not() -> None:
    r = Reguider(ReguidePolicy(span=3, min_gap=0, decision_threshold=-0.5), first_tokens=0)
    script = [(" She", -0.9), (" sold", SURE), (" 4", -0.9)]
    assert drive(r, script) == [(2, "decision_point", 2)]


def test_min_gap_lets_the_student_write_after_any_guidance_before_the_next_call() -> None:
    r = Reguider(ReguidePolicy(span=1, min_gap=3), first_tokens=0)
    triggers = drive(r, [(" a", UNSURE)] * 8)
    # After the first guidance (and after each re-guidance) the first 3 tokens never call and are never
    # taken back: the unsure run starts after the gap.
    assert triggers == [(3, "low_confidence", 3), (3, "low_confidence", 3)]


def test_budget_bounds_calls_and_teacher_tokens() -> None:
    r = Reguider(ReguidePolicy(span=1, min_gap=0, max_calls=2), first_tokens=0)
    assert len(drive(r, [(" a", UNSURE)] * 10)) == 2 and not r.budget_left()
    r = Reguider(ReguidePolicy(span=1, min_gap=0, tokens=16, max_teacher_tokens=40), first_tokens=30)
    assert r.next_tokens(room=100) == 10  # what the teacher budget leaves
    assert r.next_tokens(room=3) == 3  # what the answer's max_tokens leaves
    r.guided(10, 0.1, reguide=True)
    assert not r.budget_left() and drive(r, [(" a", UNSURE)] * 5) == []


def test_a_slow_round_trip_ends_reguidance_N1() -> None:
    r = Reguider(ReguidePolicy(span=1, min_gap=0, max_wait_s=2.0), first_tokens=0)
    r.guided(0, 2.5, reguide=False)  # the first guidance took 2.5 s to its first token
    assert not r.budget_left() and drive(r, [(" a", UNSURE)] * 5) == []


def test_a_confident_student_is_never_interrupted() -> None:
    r = Reguider(ReguidePolicy(min_gap=0), first_tokens=40)
    assert drive(r, [(" 4", SURE), ("8", SURE), (" =", -0.3), (" The", -1.0), (" answer", SURE)]) == []


# --- taking back at a safe boundary ----------------------------------------------------------------------


@pytest.mark.parametrize("text,limit,cut", [
    ("so 48 / 2 = 2", 13, 11),  # take back " 2" (part of a number): the cut is before its space
    ("so 48 / 2 =", 11, 9),  # the limit is the end of the text: "=" may still grow, keep it back
    ("so 48 / 2 = 24", 11, 11),  # whitespace follows the limit: a boundary exactly there
    ("so 48", 5, 2),
    ("48", 1, 0),  # no boundary after the start: nothing is released
])
def test_cut_before_finds_the_last_safe_boundary(text: str, limit: int, cut: int) -> None:
    assert cut_before(text, limit, 0) == cut


def test_student_text_is_released_at_boundaries_held_while_unsure_and_dropped_on_handover() -> None:
    rnd = StudentRound()
    assert rnd.add(Piece(" So", 1), None) == ""  # a word may still grow
    assert rnd.add(Piece(" she", 1), None) == " So"
    assert rnd.add(Piece(" sold", 1), None) == " she"
    assert rnd.add(Piece(" 4", 1), 3) == " sold"  # unsure from piece 3 on: held back
    assert rnd.add(Piece("8", 1), 3) == ""
    # Hand over before piece 3: " sold" is already out, " 48" is taken back.
    assert rnd.add(Piece(" *", 1), 3) == ""
    assert rnd.text[: rnd.released] == " So she sold" and rnd.pending == " 48 *"
    assert rnd.kept_tokens == 3


def test_a_round_the_student_ends_itself_releases_everything() -> None:
    rnd = StudentRound()
    assert rnd.add(Piece(" The", 1), None) == ""
    assert rnd.add(Piece(" answer", 1), 1) == " The"  # unsure from piece 1 on
    assert rnd.finish() == " answer" and rnd.kept_tokens == 2


# --- verify --------------------------------------------------------------------------------------------


def test_verify_defaults_and_bounds() -> None:
    p = TypeAdapter(GuidancePolicy).validate_python(policy_from("verify"))
    assert isinstance(p, VerifyPolicy) and (p.draft_tokens, p.tokens, p.max_calls) == (8, 1, 256)
    assert (p.max_draft_tokens, p.ahead_min) == (32, 0.5)
    assert TypeAdapter(GuidancePolicy).validate_python({"name": "verify", "draft_tokens": 6}).draft_tokens == 6
    for bad in ({"draft_tokens": 0}, {"draft_tokens": 257}, {"draft_tokens": "long"}, {"max_draft_tokens": 0},
                {"ahead_min": 1.5}, {"tokens": 0}, {"max_wait_s": 0}, {"k": 3}):
        with pytest.raises(ValidationError):
            TypeAdapter(GuidancePolicy).validate_python({"name": "verify", **bad})


def test_kept_tokens_counts_the_pieces_a_kept_prefix_uses() -> None:
    pieces = [(" The", 1), (" answer", 1), (" é", 2), (" is", 1)]
    assert kept_tokens(pieces, 0) == 0
    assert kept_tokens(pieces, 4) == 1  # " The"
    assert kept_tokens(pieces, 5) == 2  # the cut goes through " answer": its start is in the answer
    assert kept_tokens(pieces, 13) == 4  # " é" is one character from two tokens
    assert kept_tokens(pieces, 100) == 5


def test_a_draft_written_ahead_is_used_only_where_the_teacher_s_token_opens_it() -> None:
    from edge_agent.runners.verify import Draft

    ahead = Draft([(" 12", 2), (",", 1), (" 13", 2)], generated=5, stopped=True)
    rest = ahead.after(" 12")
    assert rest is not None and rest.text == ", 13" and rest.generated == 3 and rest.stopped
    assert ahead.after("") is not None and ahead.after("").text == ahead.text  # type: ignore[union-attr]
    assert ahead.after(" 1") is None  # the teacher's token ends inside a piece: the draft is dropped
    assert ahead.after(" 14") is None and ahead.after(" 12, 13, 14") is None
    assert ahead.after(" 12, 13").text == ""  # type: ignore[union-attr]


# --- verify's draft lengths (edge_agent/draft_length.py) ------------------------------------------------


def test_expected_tokens_per_check_follow_the_geometric_sum() -> None:
    assert kept_per_round(0.0, 8) == 1.0  # nothing kept: only the teacher's token
    assert kept_per_round(1.0, 8) == 9.0  # all kept, and the teacher's token
    assert kept_per_round(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


def test_round_time_counts_only_the_drafting_a_check_does_not_hide() -> None:
    # Drafting ahead: a draft kept whole (a = 1) had its successor written during the check.
    assert round_s(1.0, 4, 1.0, 0.0, 0.1) == pytest.approx(1.0)  # 0.4 s of drafting inside a 1 s check
    assert round_s(1.0, 20, 1.0, 0.0, 0.1) == pytest.approx(2.0)  # 2 s of drafting: 1 s outlasts the check
    assert round_s(0.0, 4, 1.0, 0.0, 0.1) == pytest.approx(1.4)  # always cut: the next draft starts after
    assert round_s(1.0, 4, 1.0, 0.0, 0.1, ahead=False) == pytest.approx(1.4)
    assert round_s(0.0, 4, 1.0, 0.05, 0.1) == pytest.approx(1.6)  # the teacher's pass grows with the draft


def test_the_best_length_grows_with_acceptance_and_with_the_round_trip() -> None:
    by_a = [best_length(a, 0.5, 0.01, 0.04, 32) for a in (0.6, 0.8, 0.9, 0.97)]
    assert by_a == sorted(by_a) and by_a[0] < by_a[-1]
    by_rtt = [best_length(0.9, c, 0.01, 0.04, 32) for c in (0.05, 0.3, 1.0, 3.0)]
    assert by_rtt == sorted(by_rtt) and by_rtt[0] < by_rtt[-1]
    assert best_length(0.999, 10.0, 0.0, 0.01, 12) == 12  # bounded by the most
    assert best_length(0.0, 1.0, 0.0, 0.01, 12) == 1  # a student never kept: the shortest


def test_draft_length_starts_from_first_then_follows_the_answer_s_own_checks() -> None:
    d = DraftLength(first=8, most=32, ahead_min=0.5)
    assert d.next() == 8 and d.acceptance == pytest.approx(0.9)
    d.observe_draft(8, 0.32)  # 40 ms per student token
    assert d.next() == 8  # no check timed yet
    for _ in range(6):  # a student the teacher keeps whole, on a slow link: longer drafts
        d.observe_check(8, 8, True, 1.0)
    assert d.acceptance > 0.95 and d.next() > 8
    bad = DraftLength(first=8, most=32)
    bad.observe_draft(8, 0.32)
    for _ in range(6):  # cut after one token every time: short drafts
        bad.observe_check(8, 1, False, 0.3)
    assert bad.acceptance < 0.7 and bad.next() < 8
    assert not bad.draft_ahead(8) and d.draft_ahead(1)  # writing ahead only where it is likely to be used


def test_check_cost_is_fitted_per_token_once_draft_lengths_differ() -> None:
    d = DraftLength()
    assert d.check_cost() is None
    d.observe_check(8, 8, True, 5.0)  # the first check also read the question: not fitted once others exist
    assert d.check_cost() == (5.0, 0.0)
    d.observe_check(8, 8, True, 0.5)
    assert d.check_cost() == (0.5, 0.0)  # one length: all of it per check
    for g in (4, 12, 16):
        d.observe_check(g, g, True, 0.3 + 0.025 * g)
    base, per_token = d.check_cost()  # type: ignore[misc]
    assert base == pytest.approx(0.3) and per_token == pytest.approx(0.025)
