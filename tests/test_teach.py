"""`phenolens teach`: DIFFusion's teaching pages (paper 004, §4.3) from a real translate run.

The run is made the way a user makes one: cells simulated, the shipped demo model, `translate
--minimal-edit` with quickly trained judges (about 15 s). The pages are then checked as files (what each
group keeps, the animations, the overlay's colours, the quiz's balance and key) and, when a Chromium can
be had, in a real headless browser: every image of the study page decodes, and a scripted person clicks
through the quiz, gets one item wrong on purpose, and the page scores and exports exactly that.
"""

from __future__ import annotations

import base64
import csv
import html
import importlib.machinery
import io
import json
import re
import subprocess
import sys
import types
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import fails_with, run_cli, snapshot, write_fake_run
from test_report import find_chromium
from phenolens.demo import DEMO_MODEL
from phenolens.errors import PhenolensError
from phenolens.teach import TeachSettings, write_teaching
from phenolens.teach.animation import blend_weights, transition_frames
from phenolens.teach.overlay import difference_overlay
from phenolens.teach.pairs import choose
from phenolens.teach.quiz import pick_items
from phenolens.data.records import ImageRecord

CONDITIONS = ["control", "low", "mid", "high"]  # the demo model's conditions; the judges need all of them
FRAMES = 5
QUIZ_ITEMS = 8


def rows_of(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    from phenolens.data.simulate import simulate

    return simulate(tmp_path_factory.mktemp("teach") / "sim", conditions=CONDITIONS, per_condition=5, size=48,
                    seed=5, progress=False)


@pytest.fixture(scope="module")
def heldout(sim) -> Path:
    """Real images the run never saw, one folder per condition: the quiz's material."""
    from phenolens.data.simulate import simulate

    return simulate(sim.parent / "heldout", conditions=CONDITIONS, per_condition=3, size=48, seed=11, progress=False)


@pytest.fixture(scope="module")
def run(sim) -> Path:
    """A real minimal-edit run: control -> high and mid, 3 T_skip values, judges of 20 steps."""
    out = sim.parent / "run"
    code, _, err = run_cli("translate", DEMO_MODEL, sim / "control", out, "--from", "control", "--to", "high", "mid",
                           "--steps", "6", "--inversion", "ef-ddpm", "--minimal-edit", "--strengths", "3",
                           "--judge-steps", "20", "--judge-data", sim)
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def pages(run, heldout, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pages") / "teach"
    code, stdout, err = run_cli("teach", run, out, "--quiz-data", heldout, "--quiz-items", QUIZ_ITEMS,
                                "--frames", FRAMES, "--seed", 3)
    assert code == 0, err
    assert str(out / "study.html") in stdout and str(out / "quiz.html") in stdout
    return out


def data_uris(page: str, mime: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(rf'src="data:image/{mime};base64,([A-Za-z0-9+/=]+)"', page)]


def frames_of(gif: bytes) -> list[np.ndarray]:
    im = Image.open(io.BytesIO(gif))
    out = []
    for k in range(im.n_frames):
        im.seek(k)
        out.append(np.asarray(im.convert("RGB")).astype(int))
    return out


# ------------------------------------------------------------------------------------- study page

def test_study_page_keeps_flipped_edits_per_group_with_their_numbers(run, pages):
    page = (pages / "study.html").read_text()
    rows = [r for r in rows_of(run / "index.csv") if r["kind"] == "translation"]
    shown_total = 0
    for target in ("high", "mid"):
        mine = [r for r in rows if r["target_condition"] == target]
        flipped = [r for r in mine if r["flipped"] == "1"]
        expect = flipped or mine  # only flipped edits when the judges flipped any, else all (and it says so)
        section = re.search(rf"<section id='group-\d+' class='group' data-source='control' data-target='{target}'>"
                            r"(.*?)</section>", page, re.S)
        assert section, target
        shown = re.findall(r"<tr class='pair' data-source='([^']+)'", section.group(1))
        assert sorted(html.unescape(s) for s in shown) == sorted(r["source_path"] for r in expect)
        if not flipped:
            assert "flipped none of the" in section.group(1)
        for r in expect:  # each pair shows its minimal edit's numbers
            assert f"T_skip {r['t_skip']}" in section.group(1)
            assert f"p(target) {float(r['flip_probability']):.3f}" in section.group(1)
            assert f"SSIM {float(r['ssim']):.3f}" in section.group(1)
        shown_total += len(expect)
    # three views per pair, all embedded: flicker (2 frames) and transition GIFs, one overlay PNG
    gifs = data_uris(page, "gif")
    assert len(gifs) == 2 * shown_total and len(data_uris(page, "png")) == shown_total
    assert page.count("class=\"flicker\"") == page.count("class=\"transition\"") == page.count("class=\"overlay\"") \
        == shown_total
    assert "http://" not in page and "https://" not in page
    assert all(s.startswith("data:image/") for s in re.findall(r'src="([^"]*)"', page))
    assert "<meta name='generator' content='phenolens teach " in page

    # the transition GIFs are also files in OUT/animations/, byte for byte, for slides
    files = sorted((pages / "animations").glob("*.gif"))
    assert len(files) == shown_total
    transitions = [g for g in gifs if Image.open(io.BytesIO(g)).n_frames > 2]
    assert sorted(f.read_bytes() for f in files) == sorted(transitions)
    marker = json.loads((pages / ".phenolens.json").read_text())
    assert marker["kind"] == "teach"
    assert {f"animations/{f.name}" for f in files} | {"study.html", "quiz.html", "quiz_key.csv"} <= set(marker["files"])


def test_transition_gif_blends_original_into_counterfactual_and_back(pages):
    gifs = [p.read_bytes() for p in sorted((pages / "animations").glob("*.gif"))]
    for gif in gifs:
        im = Image.open(io.BytesIO(gif))
        assert im.info.get("loop") == 0 and im.n_frames == 2 * FRAMES - 2
    # the pair that changes most (a minimal edit may change very little)
    frames = max(([f[14:] for f in frames_of(g)] for g in gifs),  # below the label bar
                 key=lambda fs: np.abs(fs[0] - fs[FRAMES - 1]).mean())
    first, last = frames[0], frames[FRAMES - 1]
    assert np.abs(first - last).mean() > 0.5  # the counterfactual differs from the original
    # a middle frame lies between the two ends, and the way back mirrors the way there
    mid = frames[(FRAMES - 1) // 2]
    assert np.abs(mid - first).mean() < np.abs(last - first).mean()
    assert np.abs(mid - last).mean() < np.abs(last - first).mean()
    assert np.abs(frames[FRAMES] - frames[FRAMES - 2]).max() <= 8  # quantisation only


def test_blend_and_overlay_colours():
    assert blend_weights(3) == [0, 0.5, 1, 0.5]
    a, b = np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 200, np.uint8)
    frames = transition_frames(a, b, "high", steps=3)
    assert [f.duration_ms for f in frames][0] > frames[1].duration_ms
    assert np.asarray(frames[1].image)[20:, :].mean() == pytest.approx(100, abs=1)

    # Fig. 4b: more signal in the counterfactual = red, less = blue, unchanged = the grey original
    original = np.zeros((2, 16, 16), np.float32)
    cf = original.copy()
    cf[0, :4, :4] += 0.5  # channel 0 brighter top-left
    cf[1, -4:, -4:] -= 0.5  # channel 1 dimmer bottom-right
    tile = difference_overlay(original, cf, scale=0.5).astype(int)
    side = tile.shape[0]  # panels are upscaled squares, 3 px apart
    ch0, ch1 = tile[:, :side], tile[:, side + 3:]
    red, blue = ch0[2, 2], ch1[-3, -3]
    assert red[0] > 200 and red[2] < 100 and blue[2] > 200 and blue[0] < 100
    grey = ch0[-3, -3]
    assert grey[0] == grey[1] == grey[2] == 128  # model value 0 -> mid grey, untinted
    assert (tile[:, side:side + 3] == 255).all()


def test_choose_keeps_flipped_unless_all_or_none():
    rows = [dict(flipped="1"), dict(flipped="0"), dict(flipped="1")]
    assert choose(rows, True, False) == ([rows[0], rows[2]], 2, "flipped")
    assert choose(rows, True, True) == (rows, 2, "all")
    none = [dict(flipped="0")] * 2
    assert choose(none, True, False) == (none, 0, "none-flipped")
    assert choose(rows, False, False) == (rows, None, "all")


def test_all_shows_every_edit_and_plain_runs_show_every_translation(run, tmp_path, sim):
    code, _, err = run_cli("teach", run, tmp_path / "all", "--all", "--max-pairs", 2)
    assert code == 0, err
    page = (tmp_path / "all" / "study.html").read_text()
    assert page.count("<tr class='pair'") == 2 * 2  # --max-pairs per group, every edit eligible
    assert not (tmp_path / "all" / "quiz.html").exists()  # no --quiz-data, no quiz

    fake = write_fake_run(sim, tmp_path / "fake", tmp_path / "model", CONDITIONS, 3, targets=("high", "mid"))
    result = write_teaching(fake, tmp_path / "plain", progress=False)
    page = result.study.read_text()
    assert result.pairs == 6 and page.count("<tr class='pair'") == 6
    assert "T_skip" not in page and "judges" not in page  # not a minimal-edit run


def test_mp4_beside_the_gif_only_when_imageio_ffmpeg_imports(run, tmp_path, monkeypatch):
    """The MP4 is optional: made through imageio_ffmpeg when it imports (a stand-in here records the frames),
    skipped with a note when it fails, and the GIFs are written either way."""
    calls = []

    def write_frames(path, size, fps, macro_block_size):
        frames = []
        calls.append((path, size, frames))
        yield
        while True:
            data = yield
            frames.append(data)
            Path(path).write_bytes(b"mp4:%d" % len(frames))

    fake = types.ModuleType("imageio_ffmpeg")
    fake.__spec__ = importlib.machinery.ModuleSpec("imageio_ffmpeg", None)
    fake.write_frames = write_frames
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", fake)
    result = write_teaching(run, tmp_path / "mp4", TeachSettings(max_pairs=1, frames=4), progress=False)
    mp4s = sorted((tmp_path / "mp4" / "animations").glob("*.mp4"))
    assert len(mp4s) == len(calls) == 2 and len(sorted((tmp_path / "mp4" / "animations").glob("*.gif"))) == 2
    for path, (w, h), frames in calls:
        assert w % 16 == 0 and h % 16 == 0 and frames and all(len(f) == w * h * 3 for f in frames)
        assert Path(path).name.startswith(".")  # written to a temporary name, then renamed
    assert not [n for n in result.notes if "MP4" in n]
    assert not list((tmp_path / "mp4" / "animations").glob(".*"))

    def broken(*args, **kwargs):
        raise RuntimeError("no encoder")

    fake.write_frames = broken
    result = write_teaching(run, tmp_path / "nomp4", TeachSettings(max_pairs=1, frames=4), progress=False)
    assert any("no encoder" in n for n in result.notes)
    assert len(list((tmp_path / "nomp4" / "animations").glob("*.gif"))) == 2
    assert not list((tmp_path / "nomp4" / "animations").glob("*.mp4"))


# ------------------------------------------------------------------------------------- quiz

def test_quiz_is_balanced_keyed_and_holds_no_label_in_sight(pages, heldout):
    key = rows_of(pages / "quiz_key.csv")
    assert [int(r["item"]) for r in key] == list(range(1, QUIZ_ITEMS + 1))
    assert sorted(r["truth"] for r in key) == sorted(CONDITIONS * (QUIZ_ITEMS // len(CONDITIONS)))
    for r in key:
        assert Path(r["path"]).is_file() and Path(r["path"]).parent.name == r["truth"]
        assert Path(heldout, r["image"]).resolve() == Path(r["path"]).resolve()
    page = (pages / "quiz.html").read_text()
    assert page.count("<figure class='item'") == QUIZ_ITEMS and len(data_uris(page, "png")) == QUIZ_ITEMS
    for c in CONDITIONS:  # every class offered for every item
        assert page.count(f"type='radio' name='q1' value='{c}'") == 1
    visible = re.sub(r"<script.*?</script>", "", page, flags=re.S)
    assert not any(r["image"] in visible for r in key)  # file names (holding the condition) stay out of sight
    assert "http://" not in page and "https://" not in page


def test_pick_items_even_across_conditions_and_seeded():
    records = [ImageRecord(Path(f"{c}/{i}.tif"), c) for c in ("a", "b", "c") for i in range(5 if c != "c" else 2)]
    picked = pick_items(records, ["a", "b", "c"], 9, seed=1)
    counts = {c: sum(r.condition == c for r in picked) for c in "abc"}
    assert counts == {"a": 4, "b": 3, "c": 2}  # c has only 2: the others fill up, in turn
    assert pick_items(records, ["a", "b", "c"], 9, seed=1) == picked
    assert pick_items(records, ["a", "b", "c"], 9, seed=2) != picked
    assert len(pick_items(records, ["a", "b", "c"], 50, seed=0)) == len(records)


def test_quiz_leaves_out_the_images_the_study_page_shows(run, sim, tmp_path):
    result = write_teaching(run, tmp_path / "q", TeachSettings(quiz_data=sim, quiz_items=100), progress=False)
    key = rows_of(result.key)
    sources = {str(Path(r["source_path"]).resolve()) for r in rows_of(run / "index.csv")}
    assert len(key) == 3 * 5 and not sources & {r["path"] for r in key}
    assert any("left out of the quiz" in n for n in result.notes)


# ------------------------------------------------------------------------------------- browser

def _chromium_dom(exe: str, page: Path, tmp_path: Path) -> tuple[str, str]:
    result = subprocess.run([exe, "--headless", "--disable-gpu", "--no-sandbox", "--virtual-time-budget=5000",
                             f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
                            capture_output=True, text=True, timeout=120)
    return result.stdout, result.stderr


CLICKER = """<script>window.addEventListener('load',function(){
var answers=%s;
Object.keys(answers).forEach(function(item){
  document.querySelector('input[name="q'+item+'"][value="'+answers[item]+'"]').click();});
document.getElementById('score-button').click();
var link=document.getElementById('download-csv');
link.addEventListener('click',function(e){e.preventDefault();});  /* keep the href, skip the download */
link.click();
document.body.dataset.href=link.getAttribute('href');
document.body.dataset.csv=window.quizCsv();});</script></body>"""


def test_quiz_scored_by_clicks_in_chromium(pages, tmp_path):
    exe = find_chromium()
    if exe is None:
        pytest.skip("no chromium/chromium-browser/google-chrome on PATH and it could not be installed with apt-get")
    key = rows_of(pages / "quiz_key.csv")
    n, wrong = len(key), 3
    answers = {r["item"]: r["truth"] for r in key}
    answers[str(wrong)] = next(c for c in CONDITIONS if c != answers[str(wrong)])
    probe = tmp_path / "quiz_probe.html"  # a copy of the page plus a script that clicks like a person
    probe.write_text((pages / "quiz.html").read_text().replace("</body>", CLICKER % json.dumps(answers), 1))
    dom, err = _chromium_dom(exe, probe, tmp_path)
    score = re.search(r'<span id="score"[^>]*>([^<]*)</span>', dom)
    assert score, f"chromium did not run the page's script: {err[-2000:]}"
    assert score.group(1) == f"{n - 1} / {n} correct"

    exported = html.unescape(re.search(r'data-csv="([^"]*)"', dom).group(1))
    shown = html.unescape(re.search(r'<pre id="quiz-csv"[^>]*>(.*?)</pre>', dom, re.S).group(1))
    href = html.unescape(re.search(r'data-href="([^"]*)"', dom).group(1))
    assert href.startswith("data:text/csv")
    downloaded = urllib.parse.unquote(href.split(",", 1)[1])
    assert exported == shown == downloaded
    rows = list(csv.DictReader(io.StringIO(exported)))
    assert list(rows[0]) == ["item", "image", "answer", "truth", "correct"] and len(rows) == n
    assert [r["item"] for r in rows if r["correct"] == "0"] == [str(wrong)]
    for r, k in zip(rows, key):
        assert (r["item"], r["image"], r["truth"]) == (k["item"], k["image"], k["truth"])
        assert r["answer"] == answers[r["item"]]
    # the wrong item is marked, the others right, only after scoring
    assert len(re.findall(r'class="item wrong"', dom)) == 1 and len(re.findall(r'class="item right"', dom)) == n - 1
    assert f'id="item-{wrong}"' in re.search(r'<figure class="item wrong"[^>]*>', dom).group(0)


def test_study_page_images_and_animations_load_in_chromium(pages, tmp_path):
    exe = find_chromium()
    if exe is None:
        pytest.skip("no chromium/chromium-browser/google-chrome on PATH and it could not be installed with apt-get")
    page = (pages / "study.html").read_text()
    dom, err = _chromium_dom(exe, pages / "study.html", tmp_path)
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    total = re.search(r'data-images-total="(\d+)"', dom)
    assert loaded and total, f"chromium did not run the page's script: {err[-2000:]}"
    n_img = page.count("<img ")
    assert n_img > 0 and int(total.group(1)) == n_img and int(loaded.group(1)) == n_img


# ------------------------------------------------------------------------------------- bad input

def test_bad_input_is_one_line_and_touches_nothing(run, sim, heldout, tmp_path):
    fails_with(run_cli("teach", sim, tmp_path / "a"), str(sim), "index.csv")
    fails_with(run_cli("teach", tmp_path / "nowhere", tmp_path / "a"), "no such folder")
    one = tmp_path / "one"
    (one / "high").mkdir(parents=True)
    (one / "high" / "x.tif").write_bytes((heldout / "high" / "high_00000.tif").read_bytes())
    fails_with(run_cli("teach", run, tmp_path / "a", "--quiz-data", one), "--quiz-data", str(one), "2 conditions")
    fails_with(run_cli("teach", run, tmp_path / "a", "--quiz-data", tmp_path / "missing"), "--quiz-data", "missing")
    fails_with(run_cli("teach", run, tmp_path / "a", "--quiz-items", 0), "--quiz-items")
    fails_with(run_cli("teach", run, tmp_path / "a", "--frames", 1), "--frames")
    assert not (tmp_path / "a").exists()  # refused before anything was written

    # a run of reconstructions only has nothing to teach
    recon = tmp_path / "recon"
    recon.mkdir()
    rows = [r for r in rows_of(run / "index.csv")][:1]
    rows[0].update(target_condition="control", kind="reconstruction", output_path=rows[0]["reconstruction_path"])
    with (recon / "index.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    fails_with(run_cli("teach", recon, tmp_path / "a"), "no translation")
    with pytest.raises(PhenolensError, match="no translation"):
        write_teaching(recon, tmp_path / "a", progress=False)

    # OUT: a user's folder is never written into; the run itself is not an output folder
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    before = snapshot(mine)
    fails_with(run_cli("teach", run, mine, "--overwrite"), str(mine), "not written by phenolens")
    assert snapshot(mine) == before
    fails_with(run_cli("teach", run, run), "OUT", str(run))
    fails_with(run_cli("teach", run, heldout / "teach", "--quiz-data", heldout), "OUT", "inside")
    fails_with(run_cli("teach", run, sim / "control" / "teach"), "OUT", "inside")  # the run's own input
    assert not (heldout / "teach").exists() and not (sim / "control" / "teach").exists()


def test_rerun_needs_overwrite_which_removes_only_what_teach_wrote(run, tmp_path):
    out = tmp_path / "t"
    assert run_cli("teach", run, out, "--max-pairs", 1)[0] == 0
    (out / "animations" / "my_slide.gif").write_bytes(b"GIF89a mine")
    (out / "README.txt").write_text("mine")
    fails_with(run_cli("teach", run, out), "--overwrite")
    old = sorted(p.name for p in (out / "animations").glob("*.gif"))
    code, _, err = run_cli("teach", run, out, "--overwrite", "--max-pairs", 2)
    assert code == 0, err
    assert (out / "animations" / "my_slide.gif").read_bytes() == b"GIF89a mine"
    assert (out / "README.txt").read_text() == "mine"
    new = sorted(p.name for p in (out / "animations").glob("*.gif"))
    assert len(new) == 2 * 2 + 1 and set(old) < set(new)
