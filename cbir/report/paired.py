"""The Markdown of `cbir compare`: for each evaluation two runs share, each measure of A and B and A − B with its
paired 95 % interval and what it shows (`cbir.evaluation.paired`)."""

from __future__ import annotations

from typing import Any

from cbir.evaluation.paired import MEASURES

#: How a verdict reads in the table.
SHOWN = {"better": "**A better**", "worse": "**A worse**", "level": "level (inside the noise)", "n/a": "n/a"}


def _signed(value: float) -> str:
    return f"{value:+.3f}"


def render_comparison(result: dict[str, Any], name_a: str, name_b: str, command: str | None = None) -> str:
    """`cbir.app.compare.compare_runs`'s result as Markdown: one row per evaluation and measure."""
    lines = [f"### {name_a} against {name_b}: paired by query", ""]
    if command:
        lines += ["```bash", command, "```", ""]
    lines += [f"A: {name_a} (`{result['a']}`); B: {name_b} (`{result['b']}`). Both answered the same queries; "
              "each interval is the 95 % patient bootstrap of A − B, drawing the patients once for both, so the "
              "spread that both share cancels. A is better or worse only where that interval excludes 0. Balanced "
              "accuracies: the model's at its operating point, the plain kNN majority and the calibrated vote "
              "(docs/metrics.md); where every query has one class (a specificity set) they are that class's "
              "recall.", "",
              "| evaluation | queries (patients) | measure | A | B | A − B | paired 95 % interval | verdict |",
              "|---|---:|---|---:|---:|---:|---|---|"]
    for name, body in result["evaluations"].items():
        for key, m in body["measures"].items():
            interval = (f"[{_signed(m['interval'][0])}, {_signed(m['interval'][1])}]" if m["interval"] else "n/a")
            lines.append(f"| {name} | {body['n_queries']} ({body['n_patients']}) | {MEASURES[key]} | {m['a']:.3f} | "
                         f"{m['b']:.3f} | {_signed(m['difference'])} | {interval} | {SHOWN[m['verdict']]} |")
    for side, label in (("only_a", name_a), ("only_b", name_b)):
        if result.get(side):
            lines += ["", f"Only in {label} (not compared): {', '.join(result[side])}."]
    return "\n".join(lines) + "\n"
