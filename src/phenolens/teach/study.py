"""study.html: each real image beside its counterfactual, the way DIFFusion's user study taught (§4.3).

Per source -> target group, every pair gets three views of one change: a flicker pair (the two
alternating in place, `report/flicker.py`), a transition animation (a blend there and back,
`animation.py`) and the difference overlay of Fig. 4b (`overlay.py`). With a minimal-edit run each pair
also shows its T_skip, whether the judges flipped it, their probability of the target and the SSIM.
`render_pair` encodes; `study_page` draws what `pairs.read_study` read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from phenolens.data.display import composite
from phenolens.report.flicker import flicker_gif
from phenolens.report.html import esc, fmt, img
from phenolens.report.tiles import fit_tile, gif_uri, png_uri
from phenolens.teach.animation import Frame, gif_bytes, transition_frames
from phenolens.teach.overlay import difference_overlay, group_scale
from phenolens.teach.page import html_page, warnings_html
from phenolens.teach.pairs import Group, Pair, StudyData


@dataclass
class RenderedPair:
    """One pair's views: data URIs for the page, and the transition's frames and GIF for OUT/animations/."""

    flicker: str
    transition_gif: bytes
    frames: list[Frame]
    overlay: str


def render_pair(pair: Pair, scale: float, steps: int) -> RenderedPair:
    """Encode one pair's flicker GIF, transition animation and overlay (colour scale ±SCALE)."""
    before, after = fit_tile(composite(pair.original)), fit_tile(composite(pair.counterfactual))
    label = pair.target if pair.edit == pair.target else pair.edit
    flicker = flicker_gif([before, after], [f"original ({pair.source_condition})", f"-> {label}"])
    frames = transition_frames(before, after, label, steps=steps, before_label=f"original ({pair.source_condition})")
    overlay = difference_overlay(pair.original, pair.counterfactual, scale)
    return RenderedPair(gif_uri(flicker), gif_bytes(frames), frames, png_uri(overlay))


def scales_of(data: StudyData) -> dict[int, float]:
    """One overlay colour scale per group (by position), so the pairs of a group compare."""
    return {i: group_scale([p.counterfactual - p.original for p in g.pairs]) for i, g in enumerate(data.groups)}


def _how_chosen(g: Group) -> str:
    if g.flipped is None:
        return f"{len(g.pairs)} of {g.translations} translation(s) shown."
    if g.kept == "flipped":
        return (f"The judges flipped {g.flipped} of {g.translations} edit(s) to {g.target}; {len(g.pairs)} of the "
                "flipped ones are shown (--all shows every edit).")
    if g.kept == "none-flipped":
        return (f"The judges flipped none of the {g.translations} edit(s) to {g.target}: they may not show the "
                f"target; {len(g.pairs)} shown anyway.")
    return f"The judges flipped {g.flipped} of {g.translations} edit(s) to {g.target}; {len(g.pairs)} shown (--all)."


def _pair_info(p: Pair, minimal_edit: bool) -> str:
    lines = [f"<b>{esc(p.name)}</b>", f"{esc(p.source_condition)} &#8594; {esc(p.target)}"]
    if p.edit != p.target:
        lines.append(f"edit {esc(p.edit)}")
    if minimal_edit:
        flipped = str(p.row.get("flipped", "")).strip()
        lines += [f"T_skip {esc(fmt(p.row.get('t_skip')))}",
                  "flipped: " + ("<b>yes</b>" if flipped in ("1", "True", "true") else "no"),
                  f"p(target) {esc(fmt(p.row.get('flip_probability'), '.3f'))}",
                  f"SSIM {esc(fmt(p.row.get('ssim'), '.3f'))}"]
    lines.append(f"change MSE {esc(fmt(p.row.get('change_mse')))}")
    if p.normalised_by != "model":
        lines.append(f"<span class='note'>scaled by {esc(p.normalised_by)}</span>")
    return "<br>".join(lines)


def study_page(data: StudyData, rendered: Mapping[int, RenderedPair], files: Mapping[int, str],
               scales: Mapping[int, float]) -> str:
    """The page; RENDERED and FILES (the animation's path relative to OUT) are keyed by id(pair)."""
    run = data.run
    n_ch = next(p.original.shape[0] for g in data.groups for p in g.pairs)
    channels = " | ".join(f"ch{c}" for c in range(n_ch))
    intro = ["<section id='how'><p>Each row is one real image and its counterfactual: the same cells rendered "
             "under the target condition. Watch the <b>flicker</b> (the two alternating in place) and the "
             "<b>transition</b> (a blend there and back) to see <i>what</i> changes; the <b>difference overlay</b> "
             "shows <i>where</i>: counterfactual &#8722; original on the grey original, per channel "
             "(<span class='grad'></span> blue = less signal, red = more). Then test yourself with quiz.html "
             "on real images you have not seen.</p>"]
    if data.minimal_edit:
        intro.append("<p class='note'>This run kept each image's minimal edit "
                     "(<code>translate --minimal-edit</code>): the weakest edit, from the highest T_skip down, that "
                     "the judges (an oracle ensemble trained on real images) assign to the target. <i>flipped</i> "
                     "says they did; <i>p(target)</i> is their probability of the target, SSIM the structural "
                     "similarity to the original.</p>")
    intro.append("</section>")
    body = [warnings_html(run.warnings), *intro]
    nav = []
    for i, g in enumerate(data.groups):
        if not g.pairs:
            continue
        anchor = f"group-{i}"
        nav.append(f"<a href='#{anchor}'>{esc(g.source_condition)} &#8594; {esc(g.target)}</a>")
        body.append(f"<section id='{anchor}' class='group' data-source='{esc(g.source_condition)}' "
                    f"data-target='{esc(g.target)}'><h2>{esc(g.source_condition)} &#8594; {esc(g.target)}</h2>"
                    f"<p>{esc(_how_chosen(g))}</p><p class='note'>overlay colour scale &#177;{scales[i]:.3g} "
                    "(model units, [-1, 1])</p><table><thead><tr><th>image</th><th>flicker</th><th>transition</th>"
                    f"<th>difference overlay<br><small>{esc(channels)}</small></th></tr></thead><tbody>")
        for p in g.pairs:
            r = rendered[id(p)]
            flicker = img(r.flicker, f"flicker {p.name}: original / {p.edit}", cls="flicker")
            transition = img(gif_uri(r.transition_gif), f"transition {p.name}: original to {p.edit} and back",
                             cls="transition")
            overlay = img(r.overlay, f"difference overlay {p.name}: {p.edit} minus original", cls="overlay")
            body.append(f"<tr class='pair' data-source='{esc(p.key)}' data-edit='{esc(p.edit)}'>"
                        f"<th>{_pair_info(p, data.minimal_edit)}<br><small class='note'>{esc(files[id(p)])}</small>"
                        f"</th><td>{flicker}</td><td>{transition}</td><td>{overlay}</td></tr>")
        body.append("</tbody></table></section>")
    body.insert(0, f"<nav>{' '.join(nav)}</nav>")
    name = run.run_dir.resolve().name
    return html_page(f"phenolens teach: study {name}", str(run.run_dir.resolve()), "".join(body))
