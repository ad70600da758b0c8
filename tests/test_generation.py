"""Stop sequences in streamed text hold back only what could still become a stop."""

from shared.generation import StopMatcher


def run(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    m = StopMatcher(stops)
    out = []
    for p in pieces:
        text, hit = m.feed(p)
        out.append(text)
        if hit:
            return "".join(out), True
    return "".join(out) + m.flush(), False


def test_stop_split_across_pieces() -> None:
    assert run(["\nQ:"], ["The answer is 5.", "\n", "Q", ":", " next"]) == ("The answer is 5.", True)


def test_partial_match_released_when_it_fails() -> None:
    assert run(["\nQ:"], ["a", "\n", "b"]) == ("a\nb", False)


def test_earliest_of_several_stops() -> None:
    assert run(["END", "x"], ["abxEND"]) == ("ab", True)


def test_no_stops_passes_through() -> None:
    assert run([], ["a", "b"]) == ("ab", False)


def test_held_text_flushed_at_end() -> None:
    assert run(["\nQ:"], ["done", "\n"]) == ("done\n", False)
