"""Accuracy, time and cost against k, with teacher-only and student-only as horizontal lines (PNG, Agg)."""

from __future__ import annotations

from pathlib import Path

from gkt.eval.stats import Row


def plot(rows: list[Row], title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in CI
    import matplotlib.pyplot as plt

    gkt = sorted((r for r in rows if r.mode == "gkt"), key=lambda r: r.k or 0)
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
