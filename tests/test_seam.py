"""The guidance boundary: the cloud ends guidance at a word's end, the edge shows it at once (shared/words.py)."""

from hypothesis import given
from hypothesis import strategies as st

from edge_agent.seam import GuidanceSeam
from shared.protocol import GuidanceRequest
from shared.words import WORD_ALLOWANCE, WordEnd, boundary_between


def feed_all(pieces: list[str], complete: bool = False) -> tuple[list[str], str]:
    seam = GuidanceSeam()
    shown = [seam.feed(p) for p in pieces]
    shown.append(seam.finish(complete))
    return shown, seam.kept


def cut(tokens: list[str], k: int) -> list[str]:
    """What a cloud sends of ``tokens`` with whole words after k (no allowance cap)."""
    end = WordEnd(k)
    sent = []
    for t in tokens:
        if end.stop_before(t):
            break
        sent.append(t)
    return sent


def test_each_piece_is_shown_when_it_arrives() -> None:
    # No waiting for the next token: the cloud sends only final guidance (time to first token, #7).
    shown, kept = feed_all(["Nat", "alia", " sold", " 4", "8"])
    assert shown == ["Nat", "alia", " sold", " 4", "8", ""]
    assert kept == "Natalia sold 48"


def test_trailing_whitespace_left_to_student() -> None:
    shown, kept = feed_all(["The", " answer", " is", " "])
    assert kept == "The answer is" and shown[-2:] == ["", ""]
    _, kept = feed_all(["May", ".", "\n", "\n"])
    assert kept == "May."
    # Held whitespace is released once more text follows it.
    shown, kept = feed_all(["a", "\n", "b"])
    assert shown == ["a", "", "\nb", ""] and kept == "a\nb"


def test_complete_guidance_released_whole() -> None:
    shown, kept = feed_all(["The", " answer", " is", " 7", ".", "\n"], complete=True)
    assert "".join(shown) == kept == "The answer is 7.\n"


@given(st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=20), st.booleans())
def test_any_split_releases_the_same_text(pieces: list[str], complete: bool) -> None:
    text = "".join(pieces)
    shown, kept = feed_all(pieces, complete)
    assert "".join(shown) == kept
    assert kept == (text if complete else text.rstrip())


def test_boundaries() -> None:
    assert boundary_between("48", " clips")
    assert boundary_between("eggs.", "\n")
    assert boundary_between("is\n", "She")  # before the held whitespace
    assert not boundary_between("2", "4")
    assert not boundary_between("Nat", "alia")
    assert not boundary_between("72", ".")
    assert boundary_between("苹", "果")  # CJK needs no spaces
    assert boundary_between("。", "a")


def test_word_end_finishes_the_word_after_k() -> None:
    tokens = ["Nat", "alia", " sold", " 4", "8", " clips", " in", " April"]
    assert cut(tokens, 1) == ["Nat", "alia"]
    assert cut(tokens, 4) == ["Nat", "alia", " sold", " 4", "8"]
    assert cut(tokens, 5) == ["Nat", "alia", " sold", " 4", "8"]
    assert cut(tokens, 6) == ["Nat", "alia", " sold", " 4", "8", " clips"]


def test_word_end_counts_tokens_without_text() -> None:
    # An incomplete UTF-8 character decodes to "" for a token: it counts toward k, it is no boundary.
    assert cut(["a", "", "b", " c"], 2) == ["a", "", "b"]


@given(st.lists(st.sampled_from(["ab", " c", "1", "2", " ", "\n", "。", "x."]), min_size=1, max_size=30),
       st.integers(1, 30))
def test_word_end_stops_at_the_first_boundary_after_k(tokens: list[str], k: int) -> None:
    sent = cut(tokens, k)
    assert sent == tokens[: len(sent)]
    if len(sent) < len(tokens):  # stopped: at least k sent, and a boundary right after them
        assert len(sent) >= k
        assert boundary_between("".join(sent), tokens[len(sent)])
        for i in range(k, len(sent)):  # and no earlier boundary after k
            assert not boundary_between("".join(sent[:i]), tokens[i])


def test_guidance_budget() -> None:
    plain = GuidanceRequest(prompt="x", max_tokens=20)
    assert plain.budget() == (20, None)
    whole = GuidanceRequest(prompt="x", max_tokens=20, whole_words=True)
    assert whole.budget() == (20 + WORD_ALLOWANCE, 20)
    assert whole.budget(room=25) == (25, 20)  # the allowance shrinks to the context left
    assert whole.budget(room=20) == (20, 20)
