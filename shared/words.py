"""Where a word ends: the one definition the cloud (ending guidance) and the edge (showing it) share.

Guidance is cut after k teacher tokens, which usually falls inside a word or a number ("... = 2" of "24").
A student continuing "= 2" might write "= 2" + "5"; a user shown "= 2" would see a fragment rewritten. So the
cloud, asked for ``whole_words``, goes on after k tokens until the next word boundary and stops there; the
token that opens the next word is generated but not sent. Every character it sends is then final guidance,
and the edge can show each token the moment it arrives.

A boundary lies

* just before whitespace: BPE tokenizers attach a leading space to the next word (" clips"), so guidance
  ends before that space and the student writes it (a prompt ending in a bare space is text the student
  never saw in training);
* after a CJK character or full-width punctuation, which need no spaces between words.

Text is whole characters (engines decode UTF-8 incrementally), so a boundary is never inside a character.
"""

from __future__ import annotations

import unicodedata

# Tokens a cloud may add after k to reach the end of a word; past it the guidance ends mid-word (a 40-digit
# number), which the student then continues.
WORD_ALLOWANCE = 16


def is_cjk(ch: str) -> bool:
    o = ord(ch)
    return (
        0x3040 <= o <= 0x30FF  # kana
        or 0x3400 <= o <= 0x4DBF
        or 0x4E00 <= o <= 0x9FFF  # CJK unified ideographs
        or 0xAC00 <= o <= 0xD7AF  # hangul syllables
        or 0xF900 <= o <= 0xFAFF
        or 0xFF00 <= o <= 0xFF65  # full-width forms
        or 0x3000 <= o <= 0x303F  # CJK punctuation
        or 0x20000 <= o <= 0x2FA1F
    )


def _ends_word(ch: str) -> bool:
    return is_cjk(ch) and unicodedata.category(ch)[0] in "LP"


def boundary_between(before: str, after: str) -> bool:
    """Whether text ``before`` followed by ``after`` may be cut between them (both non-empty)."""
    return after[0].isspace() or before[-1].isspace() or _ends_word(before[-1])


def last_boundary(text: str, start: int = 0) -> int:
    """The largest safe cut position in ``text`` at or after ``start`` (``start`` when there is none)."""
    for i in range(len(text), start, -1):
        prev = text[i - 1]
        if prev.isspace():
            continue
        if i < len(text) and text[i].isspace():
            return i
        if _ends_word(prev):
            return i
    return start


class WordEnd:
    """Stops a generation at the first word boundary after ``after`` tokens.

    The engine asks before emitting each token's text: ``stop_before(text)`` is true when the tokens so far
    are at least ``after`` and ``text`` starts a new word, so that token is not sent.
    """

    def __init__(self, after: int) -> None:
        self.after = after
        self._tokens = 0
        self._last = ""  # the last character sent

    def stop_before(self, text: str) -> bool:
        """Call once per token with its text (may be empty while a character is incomplete)."""
        stop = bool(text) and bool(self._last) and self._tokens >= self.after and boundary_between(self._last, text)
        if not stop:
            self._tokens += 1
            if text:
                self._last = text[-1]
        return stop
