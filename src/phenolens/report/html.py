"""`phenolens report RUN_DIR`: one self-contained HTML page about a `phenolens translate` run.

The page is meant to be mailed or archived next to a paper, so it is one file: every image is a
base64 data URI, CSS and JavaScript are inline and nothing is fetched from the network. It shows
the run's settings, galleries (source | reconstruction | translation | signed difference), flicker
GIFs and a click-to-toggle view, a dose-series strip per image and, when `phenolens measure` has
been run, the feature box plots and tables from RUN/measure/. Every measure section is optional.
"""

from __future__ import annotations

import base64
import csv
import datetime
import html
import io
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from phenolens import __version__
from phenolens.atomic import write_text_atomic
from phenolens.data.io import read_image
from phenolens.data.normalize import Normalizer
from phenolens.errors import PhenolensError
from phenolens.report.flicker import flicker_gif
from phenolens.run.index import open_run, read_json_object, resolve_source
from phenolens.report.grids import CHANNEL_COLOURS, composite, signed_difference, upscale
from phenolens.report.plots import boxplot_png, feature_groups, to_float

MIN_TILE = 128  # small crops are upscaled (nearest neighbour) to at least this many pixels a side
MAX_TILE = 384  # large images are shrunk to this, to keep the page a few MB
FEATURE_META = {"image", "condition", "kind", "role", "source_image", "target_condition"}
MAX_TABLE_ROWS = 30
GENERATOR = "phenolens report"  # in <meta name='generator'>: marks a page phenolens may overwrite


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


# ------------------------------------------------------------------------------------ images

def png_uri(rgb: np.ndarray) -> str:
    """HW3 uint8 -> PNG data URI: lossless, so tiles show exactly what the model produced."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def gif_uri(data: bytes) -> str:
    """GIF bytes -> data URI, so the page needs no side files."""
    return "data:image/gif;base64," + base64.b64encode(data).decode("ascii")


def fit_tile(rgb: np.ndarray) -> np.ndarray:
    """Upscale small crops (nearest neighbour, so pixels stay pixels) and shrink big images."""
    h, w = rgb.shape[:2]
    side = max(h, w)
    if side < MIN_TILE:
        return upscale(rgb, math.ceil(MIN_TILE / side))
    if side > MAX_TILE:
        s = MAX_TILE / side
        return np.asarray(Image.fromarray(rgb).resize((max(1, round(w * s)), max(1, round(h * s))), Image.BOX))
    return rgb


def placeholder(shape: tuple[int, int], text: str) -> np.ndarray:
    """A grey tile saying what is missing, the size the real tile would have had."""
    h, w = fit_tile(np.zeros((*shape, 3), np.uint8)).shape[:2]
    im = Image.new("RGB", (w, h), (70, 70, 70))
    draw = ImageDraw.Draw(im)
    for i, line in enumerate(text.split("\n")):
        draw.text((4, 4 + 12 * i), line[: max(4, w // 6)], fill=(230, 230, 230))
    return np.asarray(im)


def diff_tile(diff: np.ndarray, scale: float) -> np.ndarray:
    """CHW difference -> the per-channel signed-difference maps side by side, 3 px apart."""
    tiles = [fit_tile(signed_difference(d, scale)) for d in diff]
    gap = np.full((tiles[0].shape[0], 3, 3), 255, np.uint8)
    parts: list[np.ndarray] = []
    for t in tiles:
        parts += [t, gap]
    return np.concatenate(parts[:-1], axis=1)


# -------------------------------------------------------------------------------- run loading

@dataclass
class RunInfo:
    """What the page needs to know about a run besides its images."""

    run_dir: Path
    rows: list[dict]
    settings: dict | None
    model: dict | None
    model_path: Path | None
    normalizer: Normalizer | None
    order: list[str]
    warnings: list[str] = field(default_factory=list)
    measured: dict = field(default_factory=dict)  # RUN/measure/measure.json: dose order, channel names


@dataclass(eq=False)  # compared by identity: fields hold arrays
class ImageSet:
    """One source image with its reconstruction and translations, in model space [-1, 1]."""

    key: str
    name: str
    condition: str
    source: np.ndarray | None
    reconstruction: np.ndarray | None
    outputs: dict[str, np.ndarray | None]
    rows: dict[str, dict]
    normalised_by: str = "model"


def condition_order(rows: Sequence[dict], model_conditions: Sequence[str] | None,
                    order: Sequence[str] | None) -> list[str]:
    """--order, else the measured dose order or the model's, then any condition of the run not yet named."""
    present = list(dict.fromkeys([r["source_condition"] for r in rows] + [r["target_condition"] for r in rows]))
    if order:
        known = set(present) | set(model_conditions or [])
        unknown = [c for c in order if c not in known]
        if unknown:
            raise PhenolensError(f"--order: {', '.join(unknown)} is not a condition of this run; "
                                 f"it has: {', '.join(present)}")
        base = list(dict.fromkeys(order))
    else:
        base = list(model_conditions or [])
    return base + [c for c in present if c not in base]


def load_run(run_dir: str | Path, order: Sequence[str] | None = None) -> RunInfo:
    run_dir = Path(run_dir)
    rows, settings, model, model_path, warnings = open_run(run_dir)
    normalizer = None
    if model is not None and "normalization" in model:
        try:
            normalizer = Normalizer.from_dict(model["normalization"])
        except PhenolensError as err:
            warnings.append(f"{model_path}: {err}; images are scaled per image set")
    conditions = model.get("conditions") if model else None
    measured_path = run_dir / "measure" / "measure.json"
    measured = (read_json_object(measured_path, warnings) if measured_path.is_file() else None) or {}
    # `phenolens measure` ordered the dose series by the reference manifest
    conditions = measured.get("conditions") or conditions
    return RunInfo(run_dir, rows, settings, model, model_path, normalizer,
                   condition_order(rows, conditions if isinstance(conditions, list) else None, order), warnings,
                   measured)


def pick_sources(rows: Sequence[dict], max_images: int, order: Sequence[str]) -> list[str]:
    """Up to MAX_IMAGES sources, taken in turn from each source condition so all are seen."""
    by_condition: dict[str, dict[str, None]] = {}
    for r in rows:
        by_condition.setdefault(r["source_condition"], {})[r["source_path"]] = None
    queues = [list(by_condition[c]) for c in sorted(by_condition, key=lambda c: order.index(c) if c in order else 0)]
    picked: list[str] = []
    while len(picked) < max_images and any(queues):
        for q in queues:
            if q and len(picked) < max_images:
                picked.append(q.pop(0))
    return picked


def _read(path: Path, channels: Sequence[int] | None, warnings: list[str]) -> np.ndarray | None:
    """An unreadable file becomes a warning and a placeholder tile, never a failed report."""
    try:
        return read_image(path, channels=channels)[0]
    except PhenolensError as err:
        warnings.append(str(err))
        return None


def load_set(run: RunInfo, key: str, rows: Sequence[dict]) -> ImageSet:
    """Read a source and its outputs; scale them all the same way so intensities compare."""
    first = rows[0]
    channels = run.model.get("channels") if run.model else None
    src_path = resolve_source(key, run.run_dir)
    if src_path is None:
        run.warnings.append(f"source image {key}: not found (as given, under {run.run_dir} or beside it); "
                            "shown as a placeholder")
        source = None
    else:
        source = _read(src_path, channels if isinstance(channels, list) else None, run.warnings)
    recon = _read(run.run_dir / first["reconstruction_path"], None, run.warnings)
    outputs: dict[str, np.ndarray | None] = {}
    by_target: dict[str, dict] = {}
    for r in rows:
        by_target[r["target_condition"]] = r
        same = r["output_path"] == first["reconstruction_path"]
        outputs[r["target_condition"]] = recon if same else _read(run.run_dir / r["output_path"], None, run.warnings)
    raw = [source, recon, *outputs.values()]
    ref = next((x for x in raw if x is not None), None)
    norm, how = run.normalizer, "model"
    if ref is not None and (norm is None or norm.n_channels != ref.shape[0]):
        if norm is not None:
            run.warnings.append(f"{key}: {ref.shape[0]} channel(s), the model's normalisation has "
                                f"{norm.n_channels}; scaled by the image's own percentiles")
        norm = Normalizer.fit([ref])
        how = "source percentiles" if ref is source else "percentiles of its first readable output"

    def to_model(x: np.ndarray | None, what: str) -> np.ndarray | None:
        if x is None or norm is None:
            return None
        if x.shape[0] != norm.n_channels:
            run.warnings.append(f"{key}: {what} has {x.shape[0]} channel(s), expected {norm.n_channels}")
            return None
        return norm.to_model(x)

    return ImageSet(key=key, name=Path(key).name, condition=first["source_condition"],
                    source=to_model(source, "source"), reconstruction=to_model(recon, "reconstruction"),
                    outputs={t: to_model(x, f"output for {t}") for t, x in outputs.items()},
                    rows=by_target, normalised_by=how)


# ----------------------------------------------------------------------------------- rendering

@dataclass
class Rendered:
    """Data URIs of one image set's tiles, keyed by what they show."""

    source: str
    reconstruction: str
    outputs: dict[str, str]
    diffs: dict[str, str]
    gifs: dict[str, str]
    source_missing: bool


def render_set(s: ImageSet, scales: Mapping[str, float]) -> Rendered:
    """Encode every tile of one image set once; galleries, flicker cards and strips share the URIs."""
    shape = next((x.shape[1:] for x in [s.source, s.reconstruction, *s.outputs.values()] if x is not None), (24, 24))
    src_rgb = fit_tile(composite(s.source)) if s.source is not None else placeholder(shape, "source\nnot found")
    rec_rgb = (fit_tile(composite(s.reconstruction)) if s.reconstruction is not None
               else placeholder(shape, "reconstruction\nunreadable"))
    rec_uri = png_uri(rec_rgb)
    outputs, diffs, gifs = {}, {}, {}
    for t, x in s.outputs.items():
        if t == s.condition:  # the reconstruction: its tile is shared
            outputs[t] = rec_uri
            continue
        out_rgb = fit_tile(composite(x)) if x is not None else placeholder(shape, "translation\nunreadable")
        outputs[t] = png_uri(out_rgb)
        if x is not None and s.source is not None and x.shape == s.source.shape:
            diffs[t] = png_uri(diff_tile(x - s.source, scales.get(t, 1.0)))
        else:
            diffs[t] = png_uri(placeholder(shape, "no difference\n(source missing)"))
        before, label = (src_rgb, "source") if s.source is not None else (rec_rgb, "reconstruction")
        gifs[t] = gif_uri(flicker_gif([before, out_rgb], [f"{label} ({s.condition})", f"-> {t}"]))
    return Rendered(source=png_uri(src_rgb), reconstruction=rec_uri, outputs=outputs, diffs=diffs, gifs=gifs,
                    source_missing=s.source is None)


def diff_scales(sets: Sequence[ImageSet], targets: Sequence[str]) -> dict[str, float]:
    """One colour scale per target (99.5th percentile of |difference|), so rows of a gallery compare."""
    scales = {}
    for t in targets:
        d = [np.abs(s.outputs[t] - s.source).ravel() for s in sets
             if s.source is not None and s.outputs.get(t) is not None and s.outputs[t].shape == s.source.shape]
        scales[t] = float(np.percentile(np.concatenate(d), 99.5)) if d else 1.0
        scales[t] = scales[t] if scales[t] > 0 else 1.0
    return scales


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

def read_csv(path: Path, warnings: list[str]) -> list[dict] | None:
    """A measure table, or None when absent: every measure section is optional."""
    if not path.is_file():
        return None
    try:
        with path.open(newline="") as fh:
            return list(csv.DictReader(fh))
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        warnings.append(f"{path}: cannot read ({err})")
        return None


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


def section_measure(run: RunInfo, top_features: int, progress: bool) -> str:
    """Box plots and tables from RUN/measure/; each part says how to add it when its file is missing."""
    mdir = run.run_dir / "measure"
    parts = ['<section id="measure"><h2>Measurements</h2>']
    if not mdir.is_dir():
        parts.append(_hint(run.run_dir, "feature box plots, the ranked-feature table, the dose correlation "
                                        "and the metric tables"))
        return "".join(parts) + "</section>"
    features = read_csv(mdir / "features.csv", run.warnings)
    stats = read_csv(mdir / "stats.csv", run.warnings)
    ranked = read_csv(mdir / "ranked.csv", run.warnings)
    dose = read_csv(mdir / "dose_correlation.csv", run.warnings)
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
                run.warnings.append(f"{mdir / 'features.csv'}: no column {feat!r} (named in ranked.csv)")
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
    metrics_path = mdir / "metrics.json"
    if not metrics_path.is_file():
        parts.append(_hint(run.run_dir, "the metric tables (measure/metrics.json)"))
    else:
        try:
            parts.append(metric_tables(json.loads(metrics_path.read_text()), level=4))
        except (OSError, json.JSONDecodeError) as err:
            run.warnings.append(f"{metrics_path}: cannot read ({err})")
            parts.append("<p class='note'>metrics.json could not be read.</p>")
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
    run = load_run(run_dir, order)
    picked = pick_sources(run.rows, max_images, run.order)
    rows_of: dict[str, list[dict]] = {}
    for r in run.rows:
        rows_of.setdefault(r["source_path"], []).append(r)
    sets = [load_set(run, key, rows_of[key])
            for key in tqdm(picked, desc="report: read", unit="img", disable=None if progress else True)]
    targets = [t for t in run.order if any(t in s.outputs and t != s.condition for s in sets)]
    scales = diff_scales(sets, targets)
    rendered = {s.key: render_set(s, scales)
                for s in tqdm(sets, desc="report: render", unit="img", disable=None if progress else True)}
    measure = section_measure(run, top_features, progress)
    name = run.run_dir.resolve().name
    nav = "".join(f'<a href="#{a}">{esc(b)}</a>' for a, b in
                  [("settings", "run"), ("galleries", "galleries"), ("flicker", "flicker"), ("dose", "dose series"),
                   ("measure", "measurements")])
    body = [
        f"<header><h1>phenolens report: {esc(name)}</h1><p class='note'>{esc(run.run_dir.resolve())} · "
        f"generated {esc(datetime.datetime.now().strftime('%Y-%m-%d %H:%M'))}</p><nav>{nav}</nav></header>",
        section_warnings(run.warnings),
        section_settings(run, picked),
        section_galleries(sets, rendered, targets, scales),
        section_flicker(sets, rendered, targets),
        section_dose(sets, rendered, run.order),
        measure,
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
