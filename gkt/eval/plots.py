"""Plots (PNG, Agg): accuracy, time and cost against k with teacher-only and student-only as horizontal lines;
and the frontier: accuracy against the teacher's share of the answer tokens, for fixed k and each policy."""

from __future__ import annotations

from pathlib import Path

from gkt.eval.stats import Row


def plot(rows: list[Row], title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in CI
    import matplotlib.pyplot as plt

    gkt = sorted((r for r in rows if r.mode == "gkt" and not r.policy), key=lambda r: r.k or 0)
    refs = [(r, colour) for r, colour in ((next((r for r in rows if r.mode == m), None), c)
                                          for m, c in (("teacher", "tab:red"), ("student", "tab:blue"))) if r]
    panels = [
        ("accuracy (95% CI)", lambda r: 100 * r.accuracy, "%"),
        ("mean wall time per question", lambda r: r.wall_mean_s, "s"),
        ("cost per 1,000 answers", lambda r: 1000 * r.cost_per_answer_usd, "USD"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), constrained_layout=True)
    for ax, (name, value, unit) in zip(axes, panels, strict=True):
        for ref, colour in refs:
            ax.axhline(value(ref), color=colour, linestyle="--", label=f"{ref.label} (n={ref.n})")
            if unit == "%":
                ax.axhspan(100 * ref.ci_low, 100 * ref.ci_high, color=colour, alpha=0.08)
        if gkt:
            xs = [r.k for r in gkt]
            ys = [value(r) for r in gkt]
            if unit == "%":
                # max(0, ...): at 0 % or 100 % rounding can leave a bound a hair on the wrong side.
                err = [[max(0.0, y - 100 * r.ci_low) for y, r in zip(ys, gkt, strict=True)],
                       [max(0.0, 100 * r.ci_high - y) for y, r in zip(ys, gkt, strict=True)]]
                ax.errorbar(xs, ys, yerr=err, marker="o", color="tab:green", capsize=3, label="gkt")
            else:
                ax.plot(xs, ys, marker="o", color="tab:green", label="gkt")
            for x, y, r in zip(xs, ys, gkt, strict=True):
                ax.annotate(f"n={r.n}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("guidance tokens k")
        ax.set_ylabel(unit)
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def frontier(rows: list[Row], title: str, path: Path) -> Path:
    """Accuracy (95 % CI) against the teacher's share of answer tokens: fixed k as a line, each policy as its
    own point, teacher-only and student-only at the ends, and the issue's target region shaded (at least 90 %
    of teacher-only accuracy with the teacher writing at most 50 % of the answer tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), constrained_layout=True)
    teacher = next((r for r in rows if r.mode == "teacher"), None)
    if teacher is not None:
        ax.axhspan(90 * teacher.accuracy, 100, xmin=0, xmax=0.5, color="tab:green", alpha=0.08,
                   label="target: >= 90% of teacher accuracy, teacher share <= 50%")

    def point(r: Row, style: dict) -> None:
        y = 100 * r.accuracy
        err = [[max(0.0, y - 100 * r.ci_low)], [max(0.0, 100 * r.ci_high - y)]]
        ax.errorbar([100 * r.teacher_token_share], [y], yerr=err, capsize=3, **style)
        ax.annotate(f"{r.label} (n={r.n})", (100 * r.teacher_token_share, y), textcoords="offset points",
                    xytext=(5, 4), fontsize=7)

    fixed = sorted((r for r in rows if r.mode == "gkt" and not r.policy), key=lambda r: r.teacher_token_share)
    if fixed:
        ax.plot([100 * r.teacher_token_share for r in fixed], [100 * r.accuracy for r in fixed], color="tab:green",
                alpha=0.5)
    for r in fixed:
        point(r, {"marker": "o", "color": "tab:green"})
    markers = iter(["s", "D", "^", "v", "P", "X", "*"] * 4)
    for r in rows:
        if r.mode == "gkt" and r.policy:
            point(r, {"marker": next(markers), "color": "tab:purple", "linestyle": "none"})
        elif r.mode in ("teacher", "student"):
            point(r, {"marker": "o", "color": "tab:red" if r.mode == "teacher" else "tab:blue"})
    ax.set_xlim(-3, 103)
    ax.set_xlabel("teacher share of answer tokens (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
