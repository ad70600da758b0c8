"""Where the teacher's guidance ends and the student's answer begins.

The teacher stops after k tokens, usually in the middle of a word or number ("... = 2" of "24"). The seam
releases guidance text only up to the last safe boundary, so the user never sees a fragment that the
student would then rewrite, and the student receives text that ends where a word ends:

* a boundary lies just before a run of whitespace: the whitespace itself is held back, because BPE
  tokenizers attach a leading space to the next word (" clips"), so a prompt ending in a bare space is
  text the student never saw in training; the student writes that whitespace itself;
* a boundary lies after a CJK character or full-width punctuation, which need no spaces between words;
* text from the cloud is whole characters (the teacher decodes UTF-8 incrementally), so a boundary is never
  inside a character.

When the teacher finished on its own (end of answer or a stop sequence) everything is released: there is
no fragment, and the student has nothing left to do.
"""

from __future__ import annotations

import unicodedata


def _is_cjk(ch: str) -> bool:
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


def last_boundary(text: str, start: int = 0) -> int:
    """The largest safe cut position in ``text`` at or after ``start`` (``start`` when there is none)."""
    for i in range(len(text), start, -1):
        prev = text[i - 1]
        if prev.isspace():
            continue
        if i < len(text) and text[i].isspace():
            return i
        if _is_cjk(prev) and unicodedata.category(prev)[0] in "LP":
            return i
    return start


class GuidanceSeam:
    """Incremental cut of streamed guidance at safe boundaries."""

    def __init__(self) -> None:
        self._text = ""
        self._released = 0

    def feed(self, piece: str) -> str:
        """Add guidance text; return the newly safe text to show and hand on."""
        self._text += piece
        cut = last_boundary(self._text, self._released)
        out = self._text[self._released : cut]
        self._released = cut
        return out

    def finish(self, complete: bool) -> str:
        """End of guidance. ``complete``: the teacher ended its answer, so the rest is released too."""
        if not complete:
            return ""
        out = self._text[self._released :]
        self._released = len(self._text)
        return out

    @property
    def kept(self) -> str:
        """The guidance released so far: what the user saw and what the student continues."""
        return self._text[: self._released]

    @property
    def received(self) -> str:
        return self._text
