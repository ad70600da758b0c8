"""The distillation loss: ``alpha * CE + (1 - alpha) * T^2 * KL`` on answer tokens only.

CE is the usual next-token cross-entropy against the lesson's text (the teacher's answer, or the gold solution).
KL compares the student with the teacher's stored top-k at each answer token where the transfer set has it
(teacher and student share a tokenizer). Only the top-k survive the wire, so both distributions are restricted
to the teacher's k tokens and renormalized there: the teacher's as ``softmax(logprob_k / T)`` over its k, the
student's as its tempered log-softmax over the whole vocabulary, gathered at those k ids and renormalized
(``log q_k - logsumexp(log q_k)``). Then ``KL(p || q) = sum_k p_k (log p_k - log q_k)``; the T^2 factor keeps
its gradient on the scale of CE's (Hinton et al.). The mass outside the top-k is left out on both sides rather
than lumped into an "other" bucket, whose tempered size the teacher never reported. A token without teacher
top-k (another vocabulary, or a gold lesson) gets CE alone. The mean is over the answer tokens of the whole
optimizer step (``n_tokens``), so gradient accumulation gives the gradient of one large batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossParts:
    """Sums over a micro-batch (divide by the step's answer tokens): total, CE and KL, and the counts behind them."""

    total: torch.Tensor
    ce: float
    kl: float
    tokens: int
    kl_tokens: int


def distill_loss(logits: torch.Tensor, labels: torch.Tensor, top_ids: torch.Tensor, top_lp: torch.Tensor,
                 top_mask: torch.Tensor, *, alpha: float, temperature: float, n_tokens: int) -> LossParts:
    """``logits`` [B, L, V] predict ``labels`` [B, L] (-100 outside the answer); ``top_ids``/``top_lp`` [B, L, K]
    are the teacher's top-k for the same positions, ``top_mask`` [B, L, K] marks real entries (a position
    without any has CE only)."""
    at = labels != -100
    logits = logits[at].float()  # [N, V]: answer positions only (the full-vocabulary work is the big part)
    target = labels[at]
    ce = F.cross_entropy(logits, target, reduction="none")
    ids, lp, mask = top_ids[at], top_lp[at], top_mask[at]  # [N, K]
    has_top = mask.any(-1)
    per_token = ce
    kl_sum = 0.0
    if bool(has_top.any()):
        t = temperature
        neg = torch.finfo(torch.float32).min
        teacher = torch.log_softmax(torch.where(mask, lp / t, neg), dim=-1)
        student_all = torch.log_softmax(logits / t, dim=-1)
        student = torch.gather(student_all, 1, ids)
        student = torch.log_softmax(torch.where(mask, student, neg), dim=-1)  # renormalized over the top-k
        kl = (teacher.exp() * (teacher - student)).masked_fill(~mask, 0.0).sum(-1)
        per_token = torch.where(has_top, alpha * ce + (1.0 - alpha) * t * t * kl, ce)
        kl_sum = float(kl[has_top].detach().sum())
    return LossParts(total=per_token.sum() / max(1, n_tokens), ce=float(ce.detach().sum()), kl=kl_sum,
                     tokens=int(at.sum()), kl_tokens=int(has_top.sum()))
