"""The guidance boundary: never inside a word or a character, whitespace left to the student."""

from hypothesis import given
from hypothesis import strategies as st

from edge_agent.seam import GuidanceSeam, last_boundary


def feed_all(pieces: list[str], complete: bool = False) -> tuple[str, str]:
    seam = GuidanceSeam()
    shown = "".join(seam.feed(p) for p in pieces) + seam.finish(complete)
    return shown, seam.kept


def test_cut_before_partial_word() -> None:
    shown, kept = feed_all(["Nat", "alia", " sold", " 4", "8", " clips", " in", " Ap"])
    assert kept == shown == "Natalia sold 48 clips in"


def test_cut_before_partial_number() -> None:
    # "2" might be the start of "24": it is not released.
    _, kept = feed_all(["48", "/", "2", " =", " ", "2"])
    assert kept == "48/2 ="


def test_trailing_whitespace_left_to_student() -> None:
    _, kept = feed_all(["The", " answer", " is", " "])
    assert kept == "The answer is"
    _, kept = feed_all(["May", ".", "\n", "\n"])
    assert kept == "May."


def test_punctuation_kept_when_followed_by_space() -> None:
    _, kept = feed_all(["Hello", ",", " world", "!", " How"])
    assert kept == "Hello, world!"


def test_no_boundary_keeps_nothing() -> None:
    _, kept = feed_all(["Supercalifragilistic"])
    assert kept == ""


def test_complete_guidance_released_whole() -> None:
    shown, kept = feed_all(["The", " answer", " is", " 7", "."], complete=True)
    assert shown == kept == "The answer is 7."


def test_multibyte_characters_never_split() -> None:
    _, kept = feed_all(["Café", " crème", " brû", "lée"])
    assert kept == "Café crème"
    _, kept = feed_all(["😀", " ok", " 😀😀"])
    assert kept == "😀 ok"


def test_cjk_cut_between_characters() -> None:
    _, kept = feed_all(["我喜欢", "吃苹", "果"])
    assert kept == "我喜欢吃苹果"
    _, kept = feed_all(["日本語の", "テキスト。", "abc"])
    assert kept == "日本語のテキスト。"


def test_released_text_is_prefix_and_ends_at_boundary() -> None:
    seam = GuidanceSeam()
    for piece in ["a", "b ", "c", "d ", "ef"]:
        seam.feed(piece)
        assert seam.received.startswith(seam.kept)
    assert seam.kept == "ab cd"


@given(st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=20))
def test_any_split_gives_the_same_cut(pieces: list[str]) -> None:
    """Streaming in pieces must cut exactly where cutting the whole text would."""
    text = "".join(pieces)
    _, kept = feed_all(pieces)
    assert kept == text[: last_boundary(text)]
    assert not kept or not kept[-1].isspace()
