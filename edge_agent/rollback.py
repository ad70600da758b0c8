"""The student's side of a re-guidance seam: its text is released only where it could hand over.

Under the ``reguide`` policy the student may be stopped mid-answer so the teacher can write the next
tokens. The teacher then continues the answer *as text*, so the answer must end at a safe boundary (the
same rule as ``edge_agent/seam.py``: never inside a word or number, no trailing whitespace), and whatever
the student wrote of the span it was unsure about is taken back. Text is therefore released to the user
only up to the last safe boundary before any still-unsure span; released text is final, so what the user
saw is always a prefix of the answer, and every seam is continuous.
"""

from __future__ import annotations

from shared.generation import Piece, TokenChoice
from shared.words import last_boundary


def cut_before(text: str, limit: int, start: int) -> int:
    """The largest safe boundary in ``text`` at or before ``limit`` and after ``start`` (``start`` if none).

    Unlike ``last_boundary(text[:limit])`` it sees the character at ``limit``: a boundary lies there when
    whitespace follows (the whitespace is the next word's, so it goes with the text taken back)."""
    if start < limit < len(text) and text[limit].isspace() and not text[limit - 1].isspace():
        return limit
    return last_boundary(text[:limit], start)


class StudentRound:
    """The student's text between two guidance calls, released at safe boundaries, taken back on demand."""

    def __init__(self) -> None:
        self.text = ""
        self.released = 0
        self._starts: list[int] = []  # character offset of each piece
        self._tokens: list[int] = []  # tokens of each piece
        self._choices: list[list[TokenChoice] | None] = []  # each piece's tokens (log-probabilities asked for)
        self._given = 0  # pieces whose tokens went out with released text

    def add(self, piece: Piece, hold_from: int | None) -> str:
        """Add the next piece; return the text now safe to release. ``hold_from``: index of the first piece
        of a still-unsure span (nothing from there on is released yet), or None. When the round ends with a
        hand-over to the teacher, the last ``add`` names the first piece taken back as ``hold_from``: the text
        up to the last safe boundary before it is released and the rest is dropped."""
        self._starts.append(len(self.text))
        self._tokens.append(piece.tokens)
        self._choices.append(piece.choices)
        self.text += piece.text
        limit = len(self.text) if hold_from is None else self._starts[hold_from]
        return self._release(cut_before(self.text, limit, self.released))

    def finish(self) -> str:
        """The student ended this round on its own: everything it wrote stands."""
        return self._release(len(self.text))

    @property
    def pending(self) -> str:
        """Text written but not released yet."""
        return self.text[self.released :]

    @property
    def kept_tokens(self) -> int:
        """Tokens of the pieces that (at least partly) made it into the released text."""
        return sum(t for s, t in zip(self._starts, self._tokens, strict=True) if s < self.released)

    def released_choices(self) -> list[TokenChoice] | None:
        """The tokens behind the text released since the last call (as ``kept_tokens`` counts: a piece the cut
        goes through is listed whole); None without log-probabilities."""
        n = sum(1 for s in self._starts if s < self.released)
        out, self._given = self._choices[self._given : n], max(self._given, n)
        if any(c is None for c in out):
            return None
        return [c for cs in out for c in cs or []]

    def _release(self, cut: int) -> str:
        out = self.text[self.released : cut]
        self.released = max(self.released, cut)
        return out
