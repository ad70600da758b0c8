"""The distillation loss (gkt/distill/loss.py) and batching (data.py), in .venv-distill (torch)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gkt.distill.data import Sample, collate
from gkt.distill.loss import distill_loss


def _setup(seed: int = 0, v: int = 11, k: int = 3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 5, v, generator=g)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, -100, -100]])
    top_ids = torch.randint(0, v, (2, 5, k), generator=g)
    top_lp = torch.log_softmax(torch.randn(2, 5, k, generator=g), -1) - 0.3
    top_mask = torch.ones(2, 5, k, dtype=torch.bool)
    return logits, labels, top_ids, top_lp, top_mask


def test_alpha_one_is_plain_cross_entropy_on_answer_tokens() -> None:
    logits, labels, ids, lp, mask = _setup()
    parts = distill_loss(logits, labels, ids, lp, mask, alpha=1.0, temperature=2.0, n_tokens=5)
    expected = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)
    assert parts.tokens == parts.kl_tokens == 5
    assert parts.total.item() == pytest.approx(expected.item(), rel=1e-5)


def test_kl_is_zero_when_the_student_matches_the_teacher_on_the_top_k() -> None:
    v, t = 7, 2.0
    logits = torch.randn(1, 2, v)
    labels = torch.tensor([[-100, 3]])
    ids = torch.tensor([[[0, 1, 2], [0, 1, 2]]])
    # The teacher's log-probabilities are the student's own, scaled back from temperature 1: same top-k shape.
    lp = torch.log_softmax(logits, -1)[..., :3]
    mask = torch.ones(1, 2, 3, dtype=torch.bool)
    parts = distill_loss(logits, labels, ids, lp, mask, alpha=0.0, temperature=t, n_tokens=1)
    assert parts.kl == pytest.approx(0.0, abs=1e-6) and parts.total.item() == pytest.approx(0.0, abs=1e-6)


def test_kl_by_hand_with_temperature_and_renormalization() -> None:
    logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0]]])
    labels = torch.tensor([[1]])
    ids = torch.tensor([[[0, 2]]])
    lp = torch.tensor([[[-0.2, -2.0]]])
    mask = torch.ones(1, 1, 2, dtype=torch.bool)
    t, alpha = 2.0, 0.25
    p = torch.softmax(torch.tensor([-0.2, -2.0]) / t, 0)
    q_all = torch.log_softmax(logits[0, 0] / t, 0)[[0, 2]]
    q = torch.softmax(q_all, 0)
    kl = float((p * (p.log() - q.log())).sum())
    ce = float(F.cross_entropy(logits[0], labels[0]))
    parts = distill_loss(logits, labels, ids, lp, mask, alpha=alpha, temperature=t, n_tokens=1)
    assert parts.total.item() == pytest.approx(alpha * ce + (1 - alpha) * t * t * kl, rel=1e-5)


def test_positions_without_teacher_top_k_get_cross_entropy_alone() -> None:
    logits, labels, ids, lp, mask = _setup()
    mask[1] = False  # the second lesson has no top-k (another vocabulary)
    parts = distill_loss(logits, labels, ids, lp, mask, alpha=0.5, temperature=1.0, n_tokens=5)
    assert parts.kl_tokens == 3 and parts.tokens == 5
    ce_only = F.cross_entropy(logits[1], labels[1], ignore_index=-100, reduction="sum")
    with_top = distill_loss(logits[:1], labels[:1], ids[:1], lp[:1], mask[:1], alpha=0.5, temperature=1.0,
                            n_tokens=5)
    assert parts.total.item() == pytest.approx(with_top.total.item() + ce_only.item() / 5, rel=1e-5)


def test_accumulated_micro_batches_give_the_large_batch_gradient() -> None:
    logits, labels, ids, lp, mask = _setup()
    w = logits.clone().requires_grad_(True)
    distill_loss(w, labels, ids, lp, mask, alpha=0.5, temperature=2.0, n_tokens=5).total.backward()
    whole = w.grad.clone()
    w.grad = None
    for i in range(2):
        distill_loss(w[i : i + 1], labels[i : i + 1], ids[i : i + 1], lp[i : i + 1], mask[i : i + 1], alpha=0.5,
                     temperature=2.0, n_tokens=5).total.backward()
    assert torch.allclose(w.grad, whole, atol=1e-6)
    assert not torch.isnan(whole).any() and math.isfinite(float(whole.abs().sum()))


def test_collate_pads_masks_and_places_top_k() -> None:
    a = Sample([1, 2, 3], [-100, 7, 8], {1: [(7, -0.1), (9, -2.5)]})
    b = Sample([4, 5], [-100, 6])
    out = collate([a, b], pad=0, k=2)
    assert out["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert out["labels"].tolist() == [[-100, 7, 8], [-100, 6, -100]]
    assert out["top_ids"][0, 1].tolist() == [7, 9] and out["top_mask"][0, 1].all()
    assert not out["top_mask"][0, 2].any() and not out["top_mask"][1].any()
