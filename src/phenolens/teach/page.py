"""The shell both teaching pages share: one self-contained HTML file, marked as phenolens' own.

The generator tag says which program wrote the page (as `phenolens report`'s does); the text is
written ASCII-only (character references) so the file reads the same whatever the locale's encoding.
"""

from __future__ import annotations

import datetime
from typing import Sequence

from phenolens import __version__
from phenolens.report.html import esc

GENERATOR = "phenolens teach"

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 2em 2em;color:#222;background:#fafafa}
h1{margin-bottom:0}h2{border-bottom:2px solid #ccc;padding-top:.6em}.note{color:#666}
img{image-rendering:pixelated;display:block}figure{margin:0}
.warnings{background:#fff0f0;border:1px solid #e99;padding:0 1em}
table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ddd;padding:3px 6px;vertical-align:top;text-align:left}
thead th{background:#eee}td{background:#fff}
tr.pair th{font-weight:normal;background:#fff}
.grad{display:inline-block;width:6em;height:.8em;vertical-align:middle;
background:linear-gradient(90deg,#1a59ff,#bbb,#ff1a0d)}
.items{display:flex;flex-wrap:wrap;gap:14px}.item{background:#fff;border:1px solid #ddd;padding:8px}
.item.right{border:2px solid #1b7e3a}.item.wrong{border:2px solid #b3261e}
.choices label{margin-right:.8em;white-space:nowrap}
.verdict{display:block;min-height:1.3em;font-weight:bold}
.right .verdict{color:#1b7e3a}.wrong .verdict{color:#b3261e}
#score{font-size:1.3em;font-weight:bold;margin:0 1em}.controls{position:sticky;top:0;background:#fafafa;padding:.6em 0;
border-bottom:1px solid #ddd;z-index:1}
footer{margin-top:3em;color:#888;font-size:.9em}
"""

# counts the images the browser decoded, so a test (or a person with the console open) can see that all loaded
IMAGES_LOADED_JS = """
window.addEventListener('load',function(){var n=0,imgs=document.images;for(var i=0;i<imgs.length;i++){
if(imgs[i].complete&&imgs[i].naturalWidth>0)n++;}document.body.dataset.imagesLoaded=String(n);
document.body.dataset.imagesTotal=String(imgs.length);});
"""


def warnings_html(warnings: Sequence[str]) -> str:
    """Problems met while reading, shown first so none is missed."""
    if not warnings:
        return ""
    items = "".join(f"<li>{esc(w)}</li>" for w in dict.fromkeys(warnings))
    return f'<section id="warnings" class="warnings"><h2>Warnings</h2><ul>{items}</ul></section>'


def html_page(title: str, subtitle: str, body: str, script: str = "") -> str:
    """The whole page as ASCII text: head (generator tag, inline CSS), BODY (trusted HTML), SCRIPT."""
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    page = ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='generator' content='{GENERATOR} {esc(__version__)}'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{esc(title)}</title>"
            f"<style>{CSS}</style></head><body><header><h1>{esc(title)}</h1><p class='note'>{esc(subtitle)} &#183; "
            f"generated {esc(now)}</p></header>{body}<footer>phenolens {esc(__version__)}</footer>"
            f"<script>{IMAGES_LOADED_JS}{script}</script></body></html>\n")
    return page.encode("ascii", "xmlcharrefreplace").decode("ascii")

