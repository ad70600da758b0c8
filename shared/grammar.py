"""A llama.cpp grammar at some point of a document, over one model's vocabulary.

The split answer is one document written by two models: the teacher writes the start under the grammar, and
the student continues from where that start left the grammar. Both sides hold a ``GrammarState`` over their
own vocabulary: the teacher's advances token by token as it samples; the student's is first *advanced over
the guidance text* (``advance``), then constrains the student's sampling from that point on.

llama.cpp's grammar sampler (``llama_sampler_init_grammar``) does the parsing. Its ``accept`` aborts the
process when a token is not allowed (a C++ exception through the C API), so every token is checked first by
applying the grammar to a one-candidate array, and text is advanced over one character at a time: a
character the grammar refuses ends the valid prefix without touching the state.

Sampling under a grammar follows llama.cpp's own sampler: sample as usual, and only when the grammar refuses
that token, mask the whole vocabulary and sample again. For a draw from the masked distribution this is
exact (a refused first draw leaves the renormalised rest), and the common case costs one check per token
instead of a pass over the vocabulary (152k entries for Qwen).

Thread safety: one state belongs to one sequence and is used by one thread at a time.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

Scores = Any  # numpy float32 array of one row of logits (the vocabulary in token-id order)


class GrammarError(ValueError):
    """A token or text that the grammar does not allow at this point (the state is unchanged)."""


@dataclass(frozen=True)
class GrammarStart:
    """A grammar and the text already written under it: what the student's worker thread turns into a
    ``GrammarState`` over the model it is about to decode with (a model swapped in for a new adapter frees the
    old one, so a state is never built ahead, on another thread)."""

    grammar: str
    written: str = ""

    def state(self, llm: Any) -> GrammarState:
        """The state after ``written``; ``GrammarError`` when ``written`` is not the start of a document."""
        state = GrammarState(llm, self.grammar)
        if (n := state.advance(self.written)) < len(self.written):
            state.close()
            raise GrammarError(f"the answer so far stops being a document of the response_format at character {n}")
        return state


class GrammarState:
    """A grammar compiled for ``llm``'s vocabulary (``llama_cpp.Llama``), at the start of a document."""

    def __init__(self, llm: Any, grammar: str, *, _sampler: Any = None) -> None:
        import llama_cpp

        self._lc = llama_cpp
        self._llm = llm
        self.grammar = grammar
        self._vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._eog = self._first_eog()
        self._smpl = _sampler or llama_cpp.llama_sampler_init_grammar(self._vocab, grammar.encode("utf-8"), b"root")
        if not self._smpl:
            raise GrammarError("llama.cpp refused the grammar")
        self._one = (llama_cpp.llama_token_data * 1)()
        self._one_arr = llama_cpp.llama_token_data_array(data=self._one, size=1, selected=-1, sorted=False)
        self._buf: np.recarray | None = None  # candidates for a mask or a redraw, allocated when first needed
        self.text = ""  # what the state has been advanced over, as far as it is whole characters

    def _first_eog(self) -> int:
        lc = self._lc
        for tok in (lc.llama_vocab_eos(self._vocab), lc.llama_vocab_eot(self._vocab)):
            if tok >= 0 and lc.llama_vocab_is_eog(self._vocab, tok):
                return int(tok)
        return -1

    # --- checking ---------------------------------------------------------------------------------------

    def allows(self, token: int) -> bool:
        """Whether ``token`` may come next (an end-of-generation token: whether the document is complete)."""
        self._one[0].id, self._one[0].logit, self._one[0].p = token, 0.0, 0.0
        self._one_arr.size, self._one_arr.selected, self._one_arr.sorted = 1, -1, False
        self._lc.llama_sampler_apply(self._smpl, ctypes.byref(self._one_arr))
        return bool(np.isfinite(self._one[0].logit))

    @property
    def complete(self) -> bool:
        """The text so far is a whole document: the model may end here."""
        return self._eog >= 0 and self.allows(self._eog)

    def valid_prefix(self, text: str) -> int:
        """How many leading characters of ``text`` the grammar allows from here (the state is unchanged)."""
        probe = self.clone()
        try:
            return probe.advance(text)
        finally:
            probe.close()

    # --- advancing --------------------------------------------------------------------------------------

    def accept(self, token: int) -> None:
        """Advance over one sampled token; ``GrammarError`` (state unchanged) when it is not allowed."""
        if not self.allows(token):
            raise GrammarError(f"token {token} is not allowed here")
        if self._lc.llama_vocab_is_eog(self._vocab, token):
            return  # the end: nothing to advance over
        self._lc.llama_sampler_accept(self._smpl, token)

    def advance(self, text: str) -> int:
        """Advance over as much of ``text`` as the grammar allows; returns the characters accepted.

        One character at a time, each as the tokens the model's tokenizer gives it alone, so the state moves
        only over whole allowed characters. A prefix the caller keeps is exactly ``text[:returned]``."""
        for i, ch in enumerate(text):
            tokens = self._llm.tokenize(ch.encode("utf-8"), add_bos=False, special=False)
            if b"".join(self._llm.detokenize([t]) for t in tokens) != ch.encode("utf-8"):
                return i  # the tokenizer does not spell this character alone (e.g. a prefix space)
            probe = self.clone()
            try:
                for tok in tokens:
                    probe.accept(tok)
            except GrammarError:
                return i
            finally:
                probe.close()
            for tok in tokens:
                self._lc.llama_sampler_accept(self._smpl, tok)
            self.text += ch
        return len(text)

    # --- sampling ---------------------------------------------------------------------------------------

    def mask(self, scores: Scores) -> Scores:
        """``scores`` (one row of logits) with every token the grammar refuses at -inf, in place. A pass over
        the vocabulary: about 30-70 ms for Qwen's 152k tokens here, so sampling avoids it when it can."""
        scores[: self._n_vocab] = self._apply(np.arange(self._n_vocab, dtype=np.intc), scores[: self._n_vocab])[0].logit
        return scores

    def processor(self, *, temperature: float, top_p: float = 1.0, seed: int | None = None
                  ) -> Callable[[Any, Scores], Scores]:
        """A llama-cpp-python logits processor (``Llama.generate(logits_processor=[...])``) for sampling under
        the grammar. It does not advance the state: the caller ``accept``s each token it receives.

        Greedy: the best token when allowed (no mask), else the best of the masked row. Sampling: the processor
        draws the token itself (temperature, then nucleus, with its own generator seeded by ``seed``), keeps it
        when the grammar allows it and otherwise draws again from the masked row, as llama.cpp's own sampler
        does; the row it returns holds that one token, so the engine's sampler can only take it."""
        rng = np.random.default_rng(seed)

        def process(_input_ids: Any, scores: Scores) -> Scores:
            if temperature == 0:
                return scores if self.allows(int(np.argmax(scores))) else self.mask(scores)
            tok = _draw(scores, temperature, top_p, rng)
            if not self.allows(tok):
                tok = _draw(self.mask(scores), temperature, top_p, rng)
            scores[:] = -np.inf
            scores[tok] = 0.0
            return scores

        return process

    def sample(self, chain: Any, ctx: Any, row: int) -> int:
        """Sample row ``row`` of ``ctx``'s logits with the sampler ``chain`` under the grammar, and accept it."""
        lc = self._lc
        tok = int(lc.llama_sampler_sample(chain, ctx, row))
        if not self.allows(tok):
            logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, row), shape=(self._n_vocab,))
            cand, arr = self._apply(np.arange(self._n_vocab, dtype=np.intc), logits)
            lc.llama_sampler_apply(chain, ctypes.byref(arr))  # the sequence's own temperature, top_p, seed
            tok = int(cand.id[arr.selected])
        self.accept(tok)
        return tok

    def _apply(self, ids: Any, logits: Any) -> tuple[np.recarray, Any]:
        """The grammar over candidates ``ids`` with ``logits`` (refused ones go to -inf): the candidates and
        the llama.cpp array over them, ready for a sampler chain."""
        n = len(ids)
        if self._buf is None or len(self._buf) < n:
            self._buf = np.recarray((max(n, 1),), dtype=np.dtype(
                [("id", np.intc), ("logit", np.single), ("p", np.single)], align=True))
        cand = self._buf[:n]
        cand.id[:] = ids
        cand.logit[:] = logits
        cand.p[:] = 0.0
        arr = self._lc.llama_token_data_array(data=cand.ctypes.data_as(self._lc.llama_token_data_p), size=n,
                                              selected=-1, sorted=False)
        self._lc.llama_sampler_apply(self._smpl, ctypes.byref(arr))
        return cand, arr

    # --- lifetime ---------------------------------------------------------------------------------------

    def clone(self) -> GrammarState:
        """An independent copy at the same point (checking a continuation without committing to it)."""
        copy = GrammarState(self._llm, self.grammar, _sampler=self._lc.llama_sampler_clone(self._smpl))
        copy.text = self.text
        return copy

    def close(self) -> None:
        if getattr(self, "_smpl", None):  # also after a failed __init__ (from __del__)
            self._lc.llama_sampler_free(self._smpl)
            self._smpl = None

    def __enter__(self) -> GrammarState:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def _draw(scores: Scores, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """One token from ``scores`` at ``temperature`` within the ``top_p`` nucleus (OpenAI's order)."""
    z = (scores - scores.max()) / temperature
    p = np.exp(z, dtype=np.float64)
    p /= p.sum()
    ids = np.arange(len(p))
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        keep = int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1
        ids = order[:keep]
        p = p[ids] / p[ids].sum()
    return int(rng.choice(ids, p=p))
