"""How long ``verify``'s next draft is: the length that keeps the most answer per second, per answer.

A longer draft needs fewer checks (round trips, teacher passes) when the student is right and throws more
away when it is not. With a per-token acceptance rate ``a`` (the chance the teacher keeps the next student
token, given it kept the ones before), a draft of ``g`` tokens adds ``1 + a + ... + a^g`` tokens to the answer
on average (its kept prefix, then the teacher's own token): Leviathan et al., *Fast Inference from Transformers
via Speculative Decoding* (ICML 2023), whose choice of ``g`` from ``a`` and the two models' cost ratio this
makes online. As in SpecDec++ (Huang et al., 2024) and DISCO (Mamou et al., 2024) the length
changes during one answer; they predict acceptance per token with a trained head or classifier, this uses the
answer's own running rate (a Beta prior updated after every check), which needs no training and no change to
the student.

The time a round takes comes from the answer's own measurements: a check's wall time (round trip, queue and
the teacher's pass over the draft, linear in the draft's length: ``check_s + check_s_per_token * g``) and the
student's seconds per token. The runner drafts the next draft while the teacher checks this one, so after a
draft kept whole the next one costs only what outlasts the check; after a cut one it is written from scratch.
Drafting ahead is work thrown away whenever the current draft is cut, so it is done only when the draft is
more likely than ``ahead_min`` to be kept whole (``a^g``).

Pure: numbers in, a length out (``tests/test_policies.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

EWMA = 0.3  # weight of the newest measurement in the running time estimates


def kept_per_round(a: float, g: int) -> float:
    """Expected tokens one check adds to the answer: the draft's kept prefix and the teacher's token."""
    if a >= 1.0:
        return g + 1.0
    return (1.0 - a ** (g + 1)) / (1.0 - a)


def round_s(a: float, g: int, check_s: float, check_s_per_token: float, token_s: float, ahead: bool = True) -> float:
    """Expected seconds per round: the check, plus the drafting that did not overlap the check before it
    (``ahead``: the next draft is written during the check; it is used only when this one is kept whole)."""
    check = check_s + check_s_per_token * g
    draft = g * token_s
    if not ahead:
        return check + draft
    whole = a ** g
    return check + (1.0 - whole) * draft + whole * max(0.0, draft - check)


def best_length(a: float, check_s: float, check_s_per_token: float, token_s: float, most: int, least: int = 1,
                ahead_min: float = 0.0) -> int:
    """The draft length in ``[least, most]`` with the most answer tokens per second (the shorter on ties),
    drafting ahead only at lengths kept whole with a chance of at least ``ahead_min``."""
    best, best_rate = least, -1.0
    for g in range(least, most + 1):
        t = round_s(a, g, check_s, check_s_per_token, token_s, ahead=a ** g >= ahead_min)
        rate = kept_per_round(a, g) / max(t, 1e-9)
        if rate > best_rate * (1 + 1e-9):
            best, best_rate = g, rate
    return best


@dataclass
class DraftLength:
    """One answer's draft lengths under ``verify``: ``first`` until a check has been timed, then the best."""

    first: int = 8
    most: int = 32
    ahead_min: float = 0.5
    prior_a: float = 0.9  # per-token acceptance before any check (the default pair kept ~0.92 on GSM8K)
    prior_tokens: float = 8.0  # the prior weighs as much as this many observed tokens
    kept: float = 0.0  # student tokens the teacher kept, all checks of this answer
    cuts: int = 0  # drafts the teacher cut short
    token_s: float | None = None  # running student seconds per token
    checks: list[tuple[int, float]] = field(default_factory=list)  # (draft tokens, check wall seconds)

    @property
    def acceptance(self) -> float:
        """The running per-token acceptance: kept tokens over kept tokens plus cuts, with the prior."""
        return (self.kept + self.prior_a * self.prior_tokens) / (self.kept + self.cuts + self.prior_tokens)

    def observe_draft(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            self._ewma_token(seconds / tokens)

    def observe_check(self, drafted: int, kept: int, whole: bool, seconds: float | None) -> None:
        """A check's outcome: ``kept`` of ``drafted`` student tokens stood (``whole``: all of them)."""
        self.kept += kept
        self.cuts += 0 if whole else 1
        if seconds is not None and seconds > 0:
            self.checks.append((drafted, seconds))

    def _ewma_token(self, s: float) -> None:
        self.token_s = s if self.token_s is None else (1 - EWMA) * self.token_s + EWMA * s

    def check_cost(self) -> tuple[float, float] | None:
        """(seconds per check, seconds per draft token of a check), fitted on this answer's last 8 checks (the
        machine's and the link's speed drift): least squares once their lengths differ, else all of it per check.
        On a CPU teacher a check's pass costs about a decode step per draft token, so the slope is real and keeps
        drafts short there; on a GPU it is near zero."""
        if not self.checks:
            return None
        # The answer's first check also read the prompt's own new tokens (the question after a shared prefix):
        # it times more than a check, so it counts only until there is another.
        recent = (self.checks[1:] or self.checks)[-8:]
        n = len(recent)
        mg = sum(g for g, _ in recent) / n
        ms = sum(s for _, s in recent) / n
        var = sum((g - mg) ** 2 for g, _ in recent)
        if var <= 0:
            return ms, 0.0
        slope = sum((g - mg) * (s - ms) for g, s in recent) / var
        slope = min(max(slope, 0.0), ms / max(mg, 1.0))  # not negative, not more than the whole check per token
        return ms - slope * mg, slope

    def next(self) -> int:
        cost = self.check_cost()
        if cost is None or self.token_s is None:
            return min(self.first, self.most)
        return best_length(self.acceptance, cost[0], cost[1], self.token_s, self.most, ahead_min=self.ahead_min)

    def draft_ahead(self, g: int) -> bool:
        """Whether to write the next draft while this one (``g`` tokens) is checked: only when it is likely
        to be kept whole, else the next draft is mostly thrown away."""
        return self.acceptance ** g >= self.ahead_min
