"""Self-contained HTML reports drawn with small inline SVG: no script, no font, no stylesheet or
image from anywhere else, because the Kubeflow UI (which shows them as HTML artifacts) may have no
egress. `drift_html(report)` draws a drift report; `training_html(...)` a training run (learning
curve, confusion heatmap, per-class bars, gate decision, ONNX variants).
"""

from __future__ import annotations

from html import escape

REFERENCE, CURRENT = "#7f8c9a", "#d9822b"  # grey: the reference profile; orange: the data checked
PALETTE = ("#2b6cb0", "#d9822b", "#2f855a", "#9b2c2c", "#6b46c1", "#b7791f")
CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1a202c;max-width:1100px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #cbd5e0;padding:3px 8px;text-align:right}th{background:#edf2f7}td:first-child,th:first-child{text-align:left}
.bad{color:#9b2c2c;font-weight:bold}.ok{color:#2f855a;font-weight:bold}.charts{display:flex;flex-wrap:wrap;gap:16px}
svg text{font:11px system-ui,sans-serif}"""


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return escape(str(v))


def table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def bars(title: str, categories: list[str], series: list[tuple[str, list[float], str]], width: int = 420, height: int = 220,
         percent: bool = True) -> str:
    """Grouped vertical bars: one group per category, one bar per series (name, values, colour)."""
    left, bottom, top = 40, 46, 24
    plot_w, plot_h = width - left - 10, height - bottom - top
    peak = max([v for _, vals, _ in series for v in vals] + [1e-9])
    group = plot_w / max(len(categories), 1)
    bar = group * 0.8 / max(len(series), 1)
    parts = [f'<text x="{width / 2}" y="14" text-anchor="middle" font-weight="bold">{escape(title)}</text>',
             f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 10}" y2="{top + plot_h}" stroke="#4a5568"/>',
             f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{peak * 100:.0f}%</text>' if percent else
             f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{peak:.3g}</text>']
    for i, cat in enumerate(categories):
        x0 = left + i * group + group * 0.1
        for j, (name, vals, colour) in enumerate(series):
            h = plot_h * vals[i] / peak
            parts.append(f'<rect x="{x0 + j * bar:.1f}" y="{top + plot_h - h:.1f}" width="{bar * 0.95:.1f}" height="{h:.1f}" '
                         f'fill="{colour}"><title>{escape(name)} {escape(cat)}: {vals[i]:.4g}</title></rect>')
        label = cat if len(cat) <= 9 else cat[:8] + "…"
        parts.append(f'<text x="{x0 + group * 0.4:.1f}" y="{top + plot_h + 12}" text-anchor="end" '
                     f'transform="rotate(-35 {x0 + group * 0.4:.1f} {top + plot_h + 12})">{escape(label)}</text>')
    for j, (name, _, colour) in enumerate(series):
        parts.append(f'<rect x="{left + j * 110}" y="{height - 12}" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{left + j * 110 + 14}" y="{height - 3}">{escape(name)}</text>')
    return _svg(width, height, parts)


def lines(title: str, xs: list, series: list[tuple[str, list[float]]], width: int = 420, height: int = 220) -> str:
    """Line chart of several series over the same x values (e.g. metrics per epoch)."""
    left, bottom, top = 44, 40, 24
    plot_w, plot_h = width - left - 12, height - bottom - top
    values = [v for _, vals in series for v in vals if v is not None] or [0.0, 1.0]
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1.0
    step = plot_w / max(len(xs) - 1, 1)

    def point(i, v):
        return f"{left + i * step:.1f},{top + plot_h - plot_h * (v - lo) / (hi - lo):.1f}"

    parts = [f'<text x="{width / 2}" y="14" text-anchor="middle" font-weight="bold">{escape(title)}</text>',
             f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 12}" y2="{top + plot_h}" stroke="#4a5568"/>',
             f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{hi:.3g}</text>',
             f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end">{lo:.3g}</text>']
    for i, x in enumerate(xs):
        parts.append(f'<text x="{left + i * step:.1f}" y="{top + plot_h + 14}" text-anchor="middle">{escape(str(x))}</text>')
    for j, (name, vals) in enumerate(series):
        colour = PALETTE[j % len(PALETTE)]
        pts = " ".join(point(i, v) for i, v in enumerate(vals) if v is not None)
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts += [f'<circle cx="{p.split(",")[0]}" cy="{p.split(",")[1]}" r="3" fill="{colour}"/>' for p in pts.split()]
        parts.append(f'<rect x="{left + j * 120}" y="{height - 12}" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{left + j * 120 + 14}" y="{height - 3}">{escape(name)}</text>')
    return _svg(width, height, parts)


def heatmap(title: str, labels: list[str], matrix: list[list[int]], cell: int = 44) -> str:
    """Confusion matrix: rows gold, columns predicted; darker = more of the row's items."""
    n = len(labels)
    left, top = 90, 40
    width, height = left + n * cell + 10, top + n * cell + 40
    parts = [f'<text x="{width / 2}" y="14" text-anchor="middle" font-weight="bold">{escape(title)}</text>',
             f'<text x="{left + n * cell / 2}" y="30" text-anchor="middle">predicted</text>']
    for i, row in enumerate(matrix):
        total = sum(row) or 1
        parts.append(f'<text x="{left - 4}" y="{top + i * cell + cell / 2 + 4}" text-anchor="end">{escape(labels[i][:12])}</text>')
        for j, v in enumerate(row):
            share = v / total
            fill = f"rgb({int(255 - 212 * share)},{int(255 - 147 * share)},{int(255 - 79 * share)})"
            ink = "#fff" if share > 0.5 else "#1a202c"
            parts.append(f'<rect x="{left + j * cell}" y="{top + i * cell}" width="{cell}" height="{cell}" fill="{fill}" stroke="#fff">'
                         f'<title>gold {escape(labels[i])}, predicted {escape(labels[j])}: {v}</title></rect>'
                         f'<text x="{left + j * cell + cell / 2}" y="{top + i * cell + cell / 2 + 4}" text-anchor="middle" fill="{ink}">{v}</text>')
    for j, label in enumerate(labels):
        parts.append(f'<text x="{left + j * cell + cell / 2}" y="{top + n * cell + 14}" text-anchor="middle">{escape(label[:8])}</text>')
    return _svg(width, height, parts)


def _svg(width: int, height: int, parts: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'role="img">{"".join(parts)}</svg>')


def page(title: str, body: list[str]) -> str:
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<style>{CSS}</style></head><body><h1>{escape(title)}</h1>{"".join(body)}</body></html>\n')


def _shares(counts: list[float]) -> list[float]:
    total = sum(counts) or 1
    return [c / total for c in counts]


def drift_html(rep: dict) -> str:
    """The drift report as a page: verdict, one row per signal, reference-vs-current charts."""
    verdict = ('<p class="bad">DRIFTED: ' + escape(", ".join(rep["drifted_signals"])) + "</p>") if rep["drifted"] else \
        '<p class="ok">No drift: every signal is within its threshold.</p>'
    about = f"<p>{rep['rows']} rows checked against the reference profile of {escape(str(rep.get('model', 'the model')))} " \
            f"({rep['reference_rows']} reference rows).</p>"
    rows = []
    for s in rep["signals"]:
        value = s.get("js_distance", s.get("change", s.get("auc")))
        detail = (f"PSI {s['psi']:.3f}, p {s['p_value']:.2g}" if "psi" in s else
                  f"{s['reference']:.3f} → {s['current']:.3f}" if s["kind"] == "share" else s.get("skipped", "5-fold CV"))
        rows.append([s["name"], s["kind"], "—" if value is None else value, s["threshold"], detail, "yes" if s["drifted"] else "no"])
    charts = [bars(s["name"], s["bins"], [("reference", _shares(s["reference"]), REFERENCE), ("current", _shares(s["current"]), CURRENT)])
              for s in rep["signals"] if "bins" in s]
    shift = rep.get("predicted_label_shift") or {}
    shift_table = table(["predicted", "reference share", "current share", "change"],
                        [[k, v["reference"], v["current"], v["change"]] for k, v in shift.items()]) if shift else ""
    return page("Drift report", [verdict, about, "<h2>Signals</h2>",
                                 table(["signal", "kind", "distance / change / AUC", "threshold", "detail", "drifted"], rows),
                                 "<h2>Predicted-label shift</h2>", shift_table, "<h2>Reference vs current</h2>",
                                 f'<div class="charts">{"".join(charts)}</div>'])


def training_html(evaluation: dict, history: list[dict], variants: dict, headline: tuple[str, ...]) -> str:
    """A training run as a page: learning curve, confusion heatmap, per-class bars, gate, variants."""
    m, gate = evaluation["metrics"], evaluation["gate"]
    body = [f"<p>Model <b>{escape(evaluation['model_name'])}</b> ({escape(evaluation['task'])}), {evaluation['test_rows']} test rows.</p>",
            "<h2>Gate</h2>", f'<p class="{"ok" if gate["passed"] else "bad"}">{"PASSED" if gate["passed"] else "REJECTED"}: '
            f'{escape(gate["reason"])}</p>']
    charts = []
    if history:
        epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
        scores = [(k, [h.get(k) for h in history]) for k in (f"eval_{k}" for k in headline) if any(k in h for h in history)]
        charts.append(lines("learning curve: eval split per epoch", epochs, scores))
        if any("train_loss" in h for h in history):
            charts.append(lines("training loss per epoch", epochs, [("train_loss", [h.get("train_loss") for h in history])]))
    cm = m.get("confusion_matrix")
    if cm:
        charts.append(heatmap("confusion matrix (test)", cm["labels"], cm["matrix"]))
    per = m.get("per_class") or m.get("per_type") or {}
    if per:
        names = list(per)
        charts.append(bars("per class (test)", names, [(k, [per[n][k] for n in names], PALETTE[i]) for i, k in
                                                       enumerate(("precision", "recall", "f1"))], width=max(420, 80 * len(names)),
                           percent=False))
    body += ["<h2>Charts</h2>", f'<div class="charts">{"".join(charts)}</div>', "<h2>Test metrics</h2>",
             table(["metric", "value"], [[k, m[k]] for k in headline if k in m])]
    if variants:
        body += ["<h2>ONNX variants</h2>", table(["variant", "file", "agreement", "accuracy", "accuracy drop"],
                                                  [[k, v.get("file", ""), v.get("agreement", ""), v.get("accuracy", ""),
                                                    v.get("accuracy_drop", "")] for k, v in variants.items()])]
    return page(f"Training report: {evaluation['model_name']}", body)
