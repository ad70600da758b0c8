"""Where the teacher's guidance ends and the student's answer begins.

The edge asks the cloud for whole words (``shared/words.py``): after k tokens the teacher goes on to the end
of the word it is in, so every character the cloud sends is final guidance. The seam therefore shows each
piece the moment it arrives, holding back only trailing whitespace: BPE tokenizers attach a leading space to
the next word (" clips"), so the student writes that whitespace itself rather than continuing text that
ends in a bare space. When the teacher finished on its own (end of answer or a stop sequence) the held
whitespace is released too: the student has nothing left to do.

Shown text is never taken back. If the guidance ends inside a word anyway (the cloud's word allowance ran
out in a very long number, or the stream broke midway), the student continues from inside that word.
"""

from __future__ import annotations


class GuidanceSeam:
    """Incremental release of streamed guidance: everything but trailing whitespace, at once."""

    def __init__(self) -> None:
        self._text = ""
        self._released = 0

    def feed(self, piece: str) -> str:
        """Add guidance text; return the newly releasable text to show and hand on."""
        self._text += piece
        cut = max(self._released, len(self._text.rstrip()))
        out = self._text[self._released : cut]
        self._released = cut
        return out

    def finish(self, complete: bool) -> str:
        """End of guidance. ``complete``: the teacher ended its answer, so held whitespace is released too."""
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
