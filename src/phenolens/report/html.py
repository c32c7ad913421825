"""`phenolens report RUN_DIR`: one self-contained HTML page about a `phenolens translate` run.

The page is meant to be mailed or archived next to a paper, so it is one file: every image is a
base64 data URI, CSS and JavaScript are inline and nothing is fetched from the network. It shows
the run's settings, galleries (source | reconstruction | translation | signed difference), flicker
GIFs and a click-to-toggle view, a dose-series strip per image and, when `phenolens measure` has
been run, the feature box plots and tables from RUN/measure/. Every measure section is optional.

This module only draws: `report/run_data.py` reads the run into plain dataclasses (`ReportData`),
`report/tiles.py` encodes the image tiles, and `build_page` turns them into HTML, one `section_*`
function per section, in the order of `SECTIONS`.
A section for a future method (DiffEx directions, DIFFusion teaching pages) is a reader and a field
in run_data.py, a `section_*` function here drawing only that field, and one entry in `SECTIONS`
(its anchor and its name in the page's navigation).
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from phenolens import __version__
from phenolens.atomic import write_text_atomic
from phenolens.data.display import CHANNEL_COLOURS
from phenolens.errors import PhenolensError
from phenolens.report.plots import boxplot_png, feature_groups, to_float
from phenolens.report.run_data import DirectionsData, ImageSet, MeasureData, ReportData, RunInfo, read_report
from phenolens.report.tiles import Rendered, diff_scales, render_set

MAX_TABLE_ROWS = 30
GENERATOR = "phenolens report"  # in <meta name='generator'>: marks a page phenolens may overwrite
# the page's sections in order: (anchor, name in the navigation bar)
SECTIONS = [("settings", "run"), ("directions", "directions"), ("galleries", "galleries"), ("flicker", "flicker"),
            ("dose", "dose series"), ("measure", "measurements")]


def esc(value: Any) -> str:
    """Every piece of text in the page goes through here: names and CSV cells may hold < or &."""
    return html.escape(str(value), quote=True)


def fmt(value: Any, spec: str = ".4g") -> str:
    """A number or a CSV cell for a table: numbers with SPEC, text as it is, None as a dash."""
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v, spec) for v in value)
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, str):
        number = to_float(value)
        if math.isnan(number) and value.strip().lower() != "nan":
            return value
        value = number
    if isinstance(value, float):
        return format(value, spec) if math.isfinite(value) else str(value)
    return str(value)


def parse_bool(text: Any) -> bool | None:
    """direction_agrees as measure writes it (True/False, 1/0); None when it says neither."""
    t = str(text).strip().lower()
    return True if t in ("true", "1", "yes") else False if t in ("false", "0", "no") else None


def img(uri: str, alt: str, *, id_: str | None = None, cls: str | None = None, extra: str = "") -> str:
    """An <img> whose alt/title say what it shows (screen readers, hover); EXTRA is trusted HTML."""
    attrs = f' id="{esc(id_)}"' if id_ else ""
    attrs += f' class="{esc(cls)}"' if cls else ""
    return f'<img{attrs} src="{uri}" alt="{esc(alt)}" title="{esc(alt)}"{extra}>'


def table(header: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "") -> str:
    """HEADER is escaped here; ROWS are cells of HTML already escaped by the caller."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{esc(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def kv_table(items: Iterable[tuple[Any, Any]]) -> str:
    """Two-column settings table; values of any JSON type are formatted and escaped."""
    return table(["setting", "value"], ([esc(k), esc(fmt(v))] for k, v in items), "kv")


# --------------------------------------------------------------------------------- sections

def _mean(cells: Iterable[Any]) -> float | None:
    """Mean of the numeric cells; None (a dash) when a column is blank, e.g. an older index.csv."""
    v = [x for x in (to_float(c) for c in cells) if math.isfinite(x)]
    return float(np.mean(v)) if v else None


def section_settings(run: RunInfo, picked: Sequence[str]) -> str:
    parts = ['<section id="settings"><h2>Run</h2>']
    parts.append(kv_table(run.settings.items()) if run.settings else "<p class='note'>No run.json in this run.</p>")
    sources = list(dict.fromkeys(r["source_path"] for r in run.rows))
    translations = [r for r in run.rows if r.get("kind", "translation") != "reconstruction"
                    and r["target_condition"] != r["source_condition"]]
    parts.append(f"<p>{len(sources)} source image(s), {len(translations)} translation(s); "
                 f"{len(picked)} image(s) shown below.</p>")
    summary = []
    for t in run.order:
        rs = [r for r in translations if r["target_condition"] == t]
        if rs:
            summary.append([esc(t), str(len(rs)), esc(fmt(_mean(r.get("change_mse") for r in rs)))])
    per_source = []
    for c in run.order:
        rs = {r["source_path"]: r for r in run.rows if r["source_condition"] == c}
        if rs:
            per_source.append([esc(c), str(len(rs)), esc(fmt(_mean(r.get("recon_psnr") for r in rs.values()), ".2f"))])
    if per_source:
        parts.append("<h3>Reconstruction, per source condition</h3>"
                     + table(["source condition", "images", "mean reconstruction PSNR (dB)"], per_source))
    if summary:
        parts.append("<h3>Translation, per target</h3>"
                     + table(["target", "translations", "mean change MSE (model units)"], summary))
    parts.append("<h3>Model</h3>")
    if run.model:
        m = run.model
        parts.append(kv_table([("phenolens.json", run.model_path), ("conditions (in order)", m.get("conditions")),
                               ("channels", m.get("n_channels")), ("file channels used", m.get("channels") or "all"),
                               ("image size", m.get("image_size")), ("method", m.get("method")),
                               ("preset", m.get("preset")), ("prediction type", m.get("prediction_type")),
                               ("version", m.get("version"))]))
        if run.normalizer is not None:
            n = run.normalizer
            parts.append(f"<p>Images are shown in the model's scale: raw value at the {n.low_percentile:g}th "
                         f"percentile -> -1, at the {n.high_percentile:g}th -> +1, per channel.</p>")
    else:
        parts.append("<p class='note'>The model's phenolens.json was not found: each source image and its "
                     "outputs are scaled by the source's per-channel 0.1/99.9 percentiles.</p>")
    parts.append(f"<p>Condition order used: {esc(', '.join(run.order))}</p>")
    n_ch = int(run.model.get("n_channels", 0)) if run.model else 0
    n_ch = n_ch or (run.normalizer.n_channels if run.normalizer else 0)
    if n_ch:
        rgb = [",".join(str(int(v * 255)) for v in CHANNEL_COLOURS[c % len(CHANNEL_COLOURS)]) for c in range(n_ch)]
        given = run.measured.get("channel_names") or []  # names given to `phenolens measure`
        names = [str(g) for g in given] if len(given) == n_ch else [f"ch{c}" for c in range(n_ch)]
        swatches = "".join(f'<span class="swatch" style="background:rgb({rgb[c]})"></span>{esc(names[c])} '
                           for c in range(n_ch))
        parts.append(f"<p>Composite colours: {swatches}</p>")
    parts.append("</section>")
    return "".join(parts)


def section_directions(directions: DirectionsData | None) -> str:
    """A DiffEx explanation: the ranked directions (Algorithm 1) and the strip of each; empty otherwise."""
    if directions is None:
        return ""
    parts = ["<section id='directions'><h2>Directions (DiffEx)</h2>"]
    if not directions.ranking:
        parts.append("<p class='note'>No direction raised the classifier's probability of the target by more than "
                     "the threshold (`phenolens explain --threshold`).</p></section>")
        return "".join(parts)
    parts.append("<p class='note'>Each direction moves the images' semantic codes; kept when the mean rise of the "
                 "classifier's probability of the target passes the threshold. Each is a target below "
                 "(galleries, measurements), compared with the real images of the target class.</p>")
    parts.append("<table><tr><th>rank</th><th>edit</th><th>target</th><th>mean rise of p(target)</th>"
                 "<th>images explained</th></tr>")
    for r in directions.ranking:
        parts.append(f"<tr><td>{esc(r.get('rank'))}</td><td>{esc(r.get('edit'))}</td><td>{esc(r.get('target'))}</td>"
                     f"<td>{fmt(to_float(r.get('mean_change')), '+.3f')}</td><td>{esc(r.get('explained'))}</td></tr>")
    parts.append("</table>")
    for r in directions.ranking:
        png = directions.strips.get(str(r.get("rank")))
        if png:
            uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
            parts.append(f"<h3>{esc(r.get('rank'))}. {esc(r.get('edit'))}</h3>"
                         f"<img src='{uri}' alt='strip of {esc(r.get('edit'))}' style='max-width:100%'>")
    parts.append("</section>")
    return "".join(parts)


def section_warnings(warnings: Sequence[str]) -> str:
    """Problems met while building (missing sources, unreadable files), shown first so none is missed."""
    if not warnings:
        return ""
    items = "".join(f"<li>{esc(w)}</li>" for w in dict.fromkeys(warnings))
    return f'<section id="warnings" class="warnings"><h2>Warnings</h2><ul>{items}</ul></section>'


def _pairs(sets: Sequence[ImageSet], target: str) -> list[ImageSet]:
    """The shown image sets translated to TARGET (a source's own condition is its reconstruction)."""
    return [s for s in sets if target in s.outputs and target != s.condition]


def section_galleries(sets: Sequence[ImageSet], rendered: Mapping[str, Rendered], targets: Sequence[str],
                      scales: Mapping[str, float]) -> str:
    parts = ['<section id="galleries"><h2>Galleries</h2>'
             '<p>Each row: the source, its reconstruction (inverted and regenerated under its own condition), '
             'the translation, and the signed difference translation − source per channel '
             '(<span class="grad"></span> blue = less signal, red = more).</p>']
    for j, t in enumerate(targets):
        pairs = _pairs(sets, t)
        if not pairs:
            continue
        n_ch = next((x.shape[0] for s in pairs for x in (s.source, s.outputs[t]) if x is not None), 0)
        channels = " | ".join(f"ch{c}" for c in range(n_ch))
        parts.append(f'<h3 id="gallery-{j}">→ {esc(t)}</h3><p class="note">difference colour scale ±'
                     f'{scales.get(t, 1.0):.3g} (model units, [-1, 1])</p><table class="gallery"><thead><tr>'
                     f'<th>image</th><th>source</th><th>reconstruction</th><th>translation → {esc(t)}</th>'
                     f'<th>signed difference (translation − source)<br><small>{esc(channels)}</small></th>'
                     '</tr></thead><tbody>')
        for s in pairs:
            i, r = sets.index(s), rendered[s.key]
            row = s.rows[t]
            info = (f"{esc(s.name)}<br><small>{esc(s.condition)} → {esc(t)}</small><br><small>recon PSNR "
                    f"{esc(fmt(row.get('recon_psnr'), '.1f'))} dB<br>change MSE {esc(fmt(row.get('change_mse')))}"
                    "</small>")
            if s.normalised_by != "model":
                info += f"<br><small class='note'>scaled by {esc(s.normalised_by)}</small>"
            parts.append(
                f'<tr class="gallery-row" data-source="{esc(s.key)}" data-target="{esc(t)}"><th>{info}</th>'
                f'<td>{img(r.source, f"source {s.key}", id_=f"g{j}-{i}-src")}</td>'
                f'<td>{img(r.reconstruction, f"reconstruction of {s.name}", id_=f"g{j}-{i}-rec")}</td>'
                f'<td>{img(r.outputs[t], f"{s.name} translated to {t}", id_=f"g{j}-{i}-tr")}</td>'
                f'<td>{img(r.diffs[t], f"translation to {t} minus source, {s.name}")}</td></tr>')
        parts.append("</tbody></table>")
    if len(parts) == 1:
        parts.append("<p class='note'>This run has no translations to another condition (only reconstructions).</p>")
    parts.append("</section>")
    return "".join(parts)


def section_flicker(sets: Sequence[ImageSet], rendered: Mapping[str, Rendered], targets: Sequence[str]) -> str:
    parts = ['<section id="flicker"><h2>Flicker</h2><p>Left: the source and its translation alternating. '
             'Right: click the image or the button to switch between them.</p>']
    for j, t in enumerate(targets):
        pairs = _pairs(sets, t)
        if not pairs:
            continue
        parts.append(f'<h3>→ {esc(t)}</h3><div class="cards">')
        for s in pairs:
            i, r = sets.index(s), rendered[s.key]
            before = "rec" if r.source_missing else "src"
            first = r.reconstruction if r.source_missing else r.source
            label_a = "reconstruction" if r.source_missing else "source"
            tid = f"t{j}-{i}"
            parts.append(
                '<figure class="flick"><div class="pair">'
                + img(r.gifs[t], f"flicker {s.name}: {label_a} / {t}", cls="flicker-gif")
                + img(first, f"{s.name}: click to switch {label_a} / {t}", id_=tid, cls="toggle",
                      extra=f' data-a="g{j}-{i}-{before}" data-b="g{j}-{i}-tr" data-state="a"'
                            f' data-label-a="{esc(label_a)}" data-label-b="{esc("→ " + t)}"')
                + f'</div><figcaption>{esc(s.name)} <button type="button" data-toggle="{tid}">showing {esc(label_a)}'
                  f"</button></figcaption></figure>")
        parts.append("</div>")
    parts.append("</section>")
    return "".join(parts)


def section_dose(sets: Sequence[ImageSet], rendered: Mapping[str, Rendered], order: Sequence[str]) -> str:
    columns = [c for c in order if any(c in s.outputs for s in sets)]
    parts = ['<section id="dose"><h2>Dose series</h2><p>Each image, then its translation to every condition '
             f'in order ({esc(", ".join(columns))}); under its own condition it is the reconstruction.</p>'
             '<table class="dose"><thead><tr><th>image</th><th>source</th>'
             + "".join(f"<th>{esc(c)}</th>" for c in columns) + "</tr></thead><tbody>"]
    for s in sets:
        r = rendered[s.key]
        cells = [f"<th>{esc(s.name)}<br><small>{esc(s.condition)}</small></th>",
                 f"<td>{img(r.source, f'source {s.key}')}</td>"]
        for c in columns:
            if c in r.outputs:
                what = "reconstruction" if c == s.condition else f"→ {c}"
                cells.append(f"<td>{img(r.outputs[c], f'{s.name} {what}')}<br><small>{esc(what)}</small></td>")
            else:
                cells.append('<td class="note">not translated</td>')
        parts.append(f'<tr class="dose-row">{"".join(cells)}</tr>')
    parts.append("</tbody></table></section>")
    return "".join(parts)


# ----------------------------------------------------------------------------------- measure

def _hint(run_dir: Path, what: str) -> str:
    """The placeholder of a missing measure output: says which command adds it."""
    return (f"<p class='note missing'>Run <code>phenolens measure {esc(run_dir)}</code> to add {esc(what)}.</p>")


def _by_order(items: Iterable[str], order: Sequence[str]) -> list[str]:
    """Conditions in condition order, unknown ones last in the order met."""
    items = list(dict.fromkeys(items))
    return sorted(items, key=lambda c: (order.index(c) if c in order else len(order), items.index(c)))


def _rank(row: Mapping[str, str]) -> float:
    """Sort key of a ranked.csv row; a row without a rank goes last."""
    r = to_float(row.get("rank"))
    return r if math.isfinite(r) else math.inf


def section_measure(run: RunInfo, measure: MeasureData, top_features: int, progress: bool) -> str:
    """Box plots and tables from RUN/measure/; each part says how to add it when its file is missing."""
    parts = ['<section id="measure"><h2>Measurements</h2>']
    if not measure.present:
        parts.append(_hint(run.run_dir, "feature box plots, the ranked-feature table, the dose correlation "
                                        "and the metric tables"))
        return "".join(parts) + "</section>"
    features, stats, ranked, dose = measure.features, measure.stats, measure.ranked, measure.dose
    stat_of = {(r.get("feature"), r.get("target_condition")): r for r in stats or []}

    # box plots: the top features for the strongest target (the last in condition order)
    parts.append("<h3>Features the translation changes most</h3>")
    if ranked is None:
        parts.append(_hint(run.run_dir, "box plots of the top-ranked features (measure/ranked.csv)"))
    elif features is None:
        parts.append(_hint(run.run_dir, "box plots of the top-ranked features (measure/features.csv)"))
    elif top_features > 0 and ranked:
        target = _by_order([r.get("target_condition", "") for r in ranked], run.order)[-1]
        top = sorted((r for r in ranked if r.get("target_condition") == target), key=_rank)[:top_features]
        common = Counter(r.get("condition") for r in features if r.get("role") == "source").most_common(1)
        parts.append(f'<p>Target {esc(target)}: real source images, real {esc(target)} images and the sources '
                     f'translated to {esc(target)}. d = Cohen\'s d vs the source, q = Benjamini–Hochberg '
                     'adjusted p.</p><div class="plots">')
        for r in tqdm(top, desc="report: plots", unit="plot", disable=None if progress else True):
            feat = r.get("feature", "")
            if features and feat not in features[0]:
                run.warnings.append(f"{measure.dir / 'features.csv'}: no column {feat!r} (named in ranked.csv)")
                continue
            st = stat_of.get((feat, target), {})
            src_cond = st.get("source_condition") or (common[0][0] if common else None)
            groups = feature_groups(features, feat, src_cond, target)
            lines = [f"real: d={fmt(st.get('real_d', r.get('real_d')), '.2f')} p={fmt(st.get('real_p_welch'), '.2g')}"
                     f" q={fmt(st.get('real_q', r.get('real_q')), '.2g')}",
                     f"translated: d={fmt(st.get('trans_d', r.get('trans_d')), '.2f')} "
                     f"p={fmt(st.get('trans_p_welch'), '.2g')} q={fmt(st.get('trans_q', r.get('trans_q')), '.2g')}"]
            uri = "data:image/png;base64," + base64.b64encode(boxplot_png(feat, groups, lines)).decode("ascii")
            parts.append(img(uri, f"box plot of {feat}", cls="boxplot"))
        parts.append("</div>")
    else:
        parts.append("<p class='note'>No ranked features to plot.</p>")

    parts.append("<h3>Ranked features</h3>")
    if ranked is None:
        parts.append(_hint(run.run_dir, "the ranked-feature table (measure/ranked.csv)"))
    else:
        rows_html = []
        for t in _by_order([r.get("target_condition", "") for r in ranked], run.order):
            rs = sorted((r for r in ranked if r.get("target_condition") == t), key=_rank)[:MAX_TABLE_ROWS]
            for r in rs:
                agree = parse_bool(r.get("direction_agrees"))
                mark = "✓ same" if agree else "✗ opposite" if agree is False else "—"
                rows_html.append([esc(fmt(r.get("rank"))), esc(r.get("feature", "")), esc(t),
                                  esc(fmt(r.get("real_d"), ".2f")), esc(fmt(r.get("trans_d"), ".2f")),
                                  esc(fmt(r.get("real_q"), ".2g")), esc(fmt(r.get("trans_q"), ".2g")),
                                  f'<span class="{"agree" if agree else "disagree"}">{esc(mark)}</span>'])
        parts.append(table(["rank", "feature", "target", "real d", "translated d", "real q", "translated q",
                            "direction"], rows_html, "ranked"))
        parts.append(f"<p class='note'>At most {MAX_TABLE_ROWS} rows per target; all in measure/ranked.csv.</p>")

    if stats:
        parts.append("<h3>Agreement with the real treatment, per target</h3>")
        rows_html = []
        for t in _by_order([r.get("target_condition", "") for r in stats], run.order):
            rs = [r for r in stats if r.get("target_condition") == t]
            rq = np.array([to_float(r.get("real_q")) for r in rs])
            tq = np.array([to_float(r.get("trans_q")) for r in rs])
            agree = np.array([parse_bool(r.get("direction_agrees")) is True for r in rs])
            rd = np.array([to_float(r.get("real_d")) for r in rs])
            td = np.array([to_float(r.get("trans_d")) for r in rs])
            ok = np.isfinite(rd) & np.isfinite(td)
            corr = (float(np.corrcoef(rd[ok], td[ok])[0, 1])
                    if ok.sum() >= 3 and rd[ok].std() > 0 and td[ok].std() > 0 else None)
            rows_html.append([esc(t), str(len(rs)), str(int((rq < 0.05).sum())), str(int((tq < 0.05).sum())),
                              str(int(((rq < 0.05) & (tq < 0.05) & agree).sum())), esc(fmt(corr, ".2f"))])
        parts.append(table(["target", "features", "real q<0.05", "translated q<0.05",
                            "both, same direction", "r(real d, translated d)"], rows_html, "agreement"))

    parts.append("<h3>Dose correlation</h3>")
    if dose is None:
        parts.append(_hint(run.run_dir, "the dose correlation table (measure/dose_correlation.csv)"))
    else:
        ds = sorted(dose, key=lambda r: -abs(np.nan_to_num(to_float(r.get("pearson_r")))))
        parts.append(table(["feature", "Pearson r", "p", "conditions"],
                           ([esc(r.get("feature", "")), esc(fmt(r.get("pearson_r"), ".3f")),
                             esc(fmt(r.get("p_value"), ".2g")), esc(fmt(r.get("n_conditions")))]
                            for r in ds[:MAX_TABLE_ROWS]), "dose-corr"))
        if len(ds) > MAX_TABLE_ROWS:
            parts.append(f"<p class='note'>Strongest {MAX_TABLE_ROWS} of {len(ds)} features by |r|.</p>")

    parts.append("<h3>Metrics</h3>")
    if measure.metrics_state == "missing":
        parts.append(_hint(run.run_dir, "the metric tables (measure/metrics.json)"))
    elif measure.metrics_state == "unreadable":
        parts.append("<p class='note'>metrics.json could not be read.</p>")
    else:
        parts.append(metric_tables(measure.metrics, level=4))
    parts.append("</section>")
    return "".join(parts)


def _is_scalar(v: Any) -> bool:
    """Values shown in one table cell: numbers, text, and flat lists of them."""
    return not isinstance(v, (dict, list)) or (isinstance(v, list) and not any(isinstance(x, (dict, list)) for x in v))


def metric_tables(data: Any, level: int = 4) -> str:
    """Any nested dict of numbers and text as tables: scalars as key/value, dict-of-dicts as a matrix."""
    if not isinstance(data, dict):
        if isinstance(data, list) and data and all(isinstance(x, dict) for x in data):
            cols = list(dict.fromkeys(k for x in data for k in x))
            return table(cols, ([esc(fmt(x.get(c))) for c in cols] for x in data), "metrics")
        return f"<p>{esc(fmt(data))}</p>"
    parts = []
    scalars = [(k, v) for k, v in data.items() if _is_scalar(v)]
    if scalars:
        parts.append(table(["metric", "value"], ([esc(k), esc(fmt(v))] for k, v in scalars), "metrics"))
    h = f"h{min(level, 6)}"
    for k, v in data.items():
        if _is_scalar(v):
            continue
        parts.append(f"<{h}>{esc(k)}</{h}>")
        if isinstance(v, dict) and v and all(isinstance(x, dict) and all(_is_scalar(y) for y in x.values())
                                             for x in v.values()):
            cols = list(dict.fromkeys(c for x in v.values() for c in x))
            parts.append(table(["", *cols], ([f"<b>{esc(name)}</b>", *[esc(fmt(x.get(c))) for c in cols]]
                                              for name, x in v.items()), "metrics"))
        else:
            parts.append(metric_tables(v, level + 1))
    return "".join(parts)


# ------------------------------------------------------------------------------------- page

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 2em 2em;color:#222;background:#fafafa}
h1{margin-bottom:0}h2{border-bottom:2px solid #ccc;padding-top:.6em}nav a{margin-right:1em}
table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ddd;padding:3px 6px;vertical-align:top;text-align:left}
thead th{background:#eee}table.gallery td,table.dose td{background:#fff;text-align:center}
img{image-rendering:pixelated;display:block}.note{color:#666}.missing{background:#fff8e0;padding:.4em}
.warnings{background:#fff0f0;border:1px solid #e99;padding:0 1em}.cards{display:flex;flex-wrap:wrap;gap:12px}
figure.flick{background:#fff;border:1px solid #ddd;padding:6px;margin:0}.pair{display:flex;gap:6px;align-items:flex-end}
figure.flick figcaption{margin-top:4px}img.toggle{cursor:pointer}.plots{display:flex;flex-wrap:wrap;gap:8px}
img.boxplot{image-rendering:auto}.swatch{display:inline-block;width:1em;height:1em;vertical-align:middle;margin:0 2px}
.grad{display:inline-block;width:6em;height:.8em;background:linear-gradient(90deg,#00f,#fff,#f00);vertical-align:middle}
.agree{color:#1b7e3a}.disagree{color:#b3261e}footer{margin-top:3em;color:#888;font-size:.9em}
"""

JS = """
function phlToggle(id){var im=document.getElementById(id);if(!im)return;var b=im.dataset.state!=='b';
var ref=document.getElementById(b?im.dataset.b:im.dataset.a);if(ref)im.src=ref.src;im.dataset.state=b?'b':'a';
var btn=document.querySelector('button[data-toggle="'+id+'"]');
if(btn)btn.textContent='showing '+(b?im.dataset.labelB:im.dataset.labelA);}
document.querySelectorAll('img.toggle').forEach(function(im){
im.addEventListener('click',function(){phlToggle(im.id);});});
document.querySelectorAll('button[data-toggle]').forEach(function(bt){
bt.addEventListener('click',function(){phlToggle(bt.dataset.toggle);});});
window.addEventListener('load',function(){var n=0,imgs=document.images;for(var i=0;i<imgs.length;i++){
if(imgs[i].complete&&imgs[i].naturalWidth>0)n++;}document.body.dataset.imagesLoaded=String(n);
document.body.dataset.imagesTotal=String(imgs.length);});
"""


def build_page(run_dir: str | Path, *, max_images: int = 12, top_features: int = 6,
               order: Sequence[str] | None = None, progress: bool = True) -> str:
    """The report as one HTML string (write_report writes it)."""
    if max_images < 1:
        raise PhenolensError(f"--max-images must be at least 1, got {max_images}")
    if top_features < 0:
        raise PhenolensError(f"--top-features must be 0 or more, got {top_features}")
    data = read_report(run_dir, max_images=max_images, order=order, progress=progress)
    return draw_page(data, top_features=top_features, progress=progress)


def draw_page(data: ReportData, *, top_features: int = 6, progress: bool = True) -> str:
    """The page of what `read_report` read: warnings first, then every section of SECTIONS in order."""
    run, sets = data.run, data.sets
    targets = [t for t in run.order if any(t in s.outputs and t != s.condition for s in sets)]
    scales = diff_scales(sets, targets)
    rendered = {s.key: render_set(s, scales)
                for s in tqdm(sets, desc="report: render", unit="img", disable=None if progress else True)}
    sections = {
        "settings": section_settings(run, data.picked),
        "directions": section_directions(data.directions),
        "galleries": section_galleries(sets, rendered, targets, scales),
        "flicker": section_flicker(sets, rendered, targets),
        "dose": section_dose(sets, rendered, run.order),
        "measure": section_measure(run, data.measure, top_features, progress),
    }
    warnings = section_warnings(run.warnings)  # after the sections: drawing may add some
    name = run.run_dir.resolve().name
    nav = "".join(f'<a href="#{a}">{esc(b)}</a>' for a, b in SECTIONS if sections[a])
    body = [
        f"<header><h1>phenolens report: {esc(name)}</h1><p class='note'>{esc(run.run_dir.resolve())} · "
        f"generated {esc(datetime.datetime.now().strftime('%Y-%m-%d %H:%M'))}</p><nav>{nav}</nav></header>",
        warnings,
        *(sections[anchor] for anchor, _ in SECTIONS),
        f"<footer>phenolens {esc(__version__)}</footer>",
    ]
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='generator' content='{GENERATOR} {esc(__version__)}'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>phenolens report: "
            f"{esc(name)}</title><style>{CSS}</style></head><body>{''.join(body)}<script>{JS}</script></body></html>\n")


def write_report(run_dir: str | Path, out: str | Path | None = None, *, max_images: int = 12, top_features: int = 6,
                 order: Sequence[str] | None = None, progress: bool = True) -> Path:
    """Write the report of RUN_DIR (default RUN_DIR/report.html) atomically; returns its path."""
    path = Path(out) if out is not None else Path(run_dir) / "report.html"
    check_report_target(path)  # before the slow part
    page = build_page(run_dir, max_images=max_images, top_features=top_features, order=order, progress=progress)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # entities for non-ASCII (arrows, ticks) so the file reads the same whatever the locale's encoding
        write_text_atomic(path, page.encode("ascii", "xmlcharrefreplace").decode("ascii"))
    except OSError as err:
        raise PhenolensError(f"--out {path}: cannot write there ({err.strerror or err})") from None
    return path


def is_phenolens_report(path: Path) -> bool:
    """Whether PATH is a page `phenolens report` wrote: its generator tag, or the title of the
    reports written before the tag existed."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096).decode("ascii", "replace")
    except OSError:
        return False
    return f"<meta name='generator' content='{GENERATOR} " in head or (
        head.startswith("<!DOCTYPE html>") and "<title>phenolens report: " in head)


def check_report_target(path: Path) -> None:
    """Never replace a file phenolens did not write: the page goes to a new file or over an old report."""
    if path.is_dir():
        raise PhenolensError(f"--out {path}: is a folder; give a file name such as {path / 'report.html'}")
    if (path.exists() or path.is_symlink()) and not is_phenolens_report(path):
        raise PhenolensError(f"--out {path}: exists and is not a phenolens report; phenolens does not overwrite "
                             "it: choose another file name")
