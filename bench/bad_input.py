"""The bad-input suite of issue 9: the real `phenolens` CLI against hostile and awkward inputs.

Every case runs `python -m phenolens ...` as a subprocess (so a traceback shows as the user would
see it) in its own folder of a temporary workspace, on images from `phenolens simulate --size 32
--per-condition 6` and a tiny model trained for 2 steps. Before the command, every file under the
case's folder is hashed; afterwards each must still be there byte for byte, except the files the
case means phenolens to replace (outputs phenolens itself wrote in an earlier step).

Verdicts:
  ok-error        refused with exit 2 and one `error:` line (naming what the case says it must)
  ok-run          exit 0 where success is right (or exit 0 with the warning the case requires)
  traceback       a Python traceback, or a hang (timeout)
  data-loss       a file that existed before is gone or changed
  silently-wrong  exit 0 where an error or a warning was required, or a result the case checks is wrong
  refused         exit 2 where the command should have worked
  unclear         an error that is not one line, or does not name what it must
  setup-failed    the case's own preparation failed (the suite's fault, or a broken earlier stage)

    python bench/bad_input.py            # every case; exit 1 if any data loss / traceback / silently wrong
    python bench/bad_input.py --list
    python bench/bad_input.py --only config,device --keep
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import tifffile

FAST = ["--steps", "2", "--inversion-iters", "1"]
# a constant schedule: item 8 extends these runs by resuming with more --steps (a cosine one is refused)
TRAIN = ["--steps", "2", "--size", "32", "--batch-size", "4", "--checkpoint-every", "1", "--lr-schedule", "constant"]
CONDITIONS = ["control", "low", "mid", "high"]
BIG_FILE = 256 << 20
BAD = ("data-loss", "traceback", "silently-wrong")
OTHER_BAD = ("refused", "unclear", "setup-failed")


# ------------------------------------------------------------------------------ running phenolens
@dataclass
class Result:
    argv: list[str]
    code: int | None  # None: killed after the timeout
    stdout: str
    stderr: str
    seconds: float

    @property
    def timed_out(self) -> bool:
        return self.code is None


# `python -m phenolens` with a umask of 022 and optional resource limits, set inside the child (a
# preexec_fn is unsafe with --jobs threads). A write past RLIMIT_FSIZE fails with EFBIG, "File too
# large" (Python ignores SIGXFSZ): a full disk without mounting one.
BOOT = ("import os, resource, runpy, sys; os.umask(0o022); f, m = int(sys.argv.pop(1)), int(sys.argv.pop(1)); "
        "f > 0 and resource.setrlimit(resource.RLIMIT_FSIZE, (f, f)); "
        "m > 0 and resource.setrlimit(resource.RLIMIT_AS, (m, m)); "
        "sys.argv[0] = 'phenolens'; runpy.run_module('phenolens', run_name='__main__', alter_sys=True)")


def phenolens(argv: list, cwd: Path, timeout: float = 300, fsize: int | None = None,
              memory: int | None = None) -> Result:
    """Run `python -m phenolens ARGV` in CWD; never raises for the command's own failure."""
    argv = [str(a) for a in argv]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1",
               TQDM_DISABLE="1")
    env.pop("PHENOLENS_DEBUG", None)
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", BOOT, str(fsize or 0), str(memory or 0), *argv], cwd=cwd,
                            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        code = None
    return Result(argv, code, out, err, time.monotonic() - start)


class SetupError(Exception):
    """A case's preparation failed; not a verdict on the command under test."""


# ------------------------------------------------------------------------------ shared fixtures
class Workspace:
    """The temporary workspace: shared read-only fixtures, built once and only when a case needs them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.shared = root / "_shared"
        self.shared.mkdir(parents=True, exist_ok=True)
        self._built: dict[str, Path] = {}
        self._hashes: dict[str, dict[str, str]] = {}
        self._lock = threading.RLock()  # cases may run in parallel (--jobs): build each fixture once

    def _fixture(self, name: str, build: Callable[[Path], None]) -> Path:
        with self._lock:
            return self._fixture_locked(name, build)

    def _fixture_locked(self, name: str, build: Callable[[Path], None]) -> Path:
        if name not in self._built:
            path = self.shared / name
            if not path.exists():
                build(path)
            self._built[name] = path
            self._hashes[name] = snapshot(path)
        return self._built[name]

    def sim(self) -> Path:
        return self._fixture("sim", lambda p: step(["simulate", p, "--size", "32", "--per-condition", "6"],
                                                   self.shared))

    def model(self) -> Path:
        sim = self.sim()
        return self._fixture("model", lambda p: step(["train", sim, p, *TRAIN], self.shared))

    def odd_model(self) -> Path:
        """A model whose condition names collide once made file names: 'dose 1' / 'dose_1' / 'reconstruction'."""
        def build(p: Path) -> None:
            data = self.shared / "odd_data"
            make_dataset(data, self.sim(), {"control": "control", "dose 1": "low", "dose_1": "mid",
                                            "reconstruction": "high"})
            step(["train", data, p, *TRAIN], self.shared)
        return self._fixture("odd_model", build)

    def shared_losses(self) -> list[str]:
        """Files of the shared fixtures that some case changed (no case may write there)."""
        return [f"{name}/{rel}" for name, before in self._hashes.items()
                for rel in lost_files(before, snapshot(self._built[name]), ())]


def step(argv: list, cwd: Path, timeout: float = 300, **kw) -> Result:
    """A preparation step that must succeed."""
    res = phenolens(argv, cwd, timeout=timeout, **kw)
    if res.code != 0:
        tail = (res.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise SetupError(f"`phenolens {' '.join(map(str, argv[:1]))}` failed ({res.code}): {tail[:160]}")
    return res


def make_dataset(root: Path, sim: Path, mapping: dict[str, str], per_condition: int | None = None) -> Path:
    """ROOT/<new condition>/ with copies of the simulated images of another condition."""
    for new, old in mapping.items():
        (root / new).mkdir(parents=True, exist_ok=True)
        for src in sorted((sim / old).glob("*.tif"))[:per_condition]:
            shutil.copy2(src, root / new / src.name)
    return root


# ------------------------------------------------------------------------------ files
def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ROOT (symlinks are not followed)."""
    out = {}
    if not root.exists():
        return out
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            if p.is_symlink() or not p.is_file():
                continue
            rel = p.relative_to(root).as_posix()
            st = p.stat()
            if st.st_size > BIG_FILE:  # e.g. the sparse 30000² TIFF: size and mtime stand for its bytes
                out[rel] = f"size={st.st_size} mtime={st.st_mtime_ns}"
                continue
            h = hashlib.sha256()
            with p.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            out[rel] = h.hexdigest()
    return out


def lost_files(before: dict[str, str], after: dict[str, str], replaceable: tuple[str, ...]) -> list[str]:
    """Files of BEFORE that are gone or changed in AFTER, other than those matching REPLACEABLE globs."""
    lost = []
    for rel, digest in before.items():
        if any(fnmatch.fnmatch(rel, pat) for pat in replaceable):
            continue
        if after.get(rel) != digest:
            lost.append(rel + (" (changed)" if rel in after else " (gone)"))
    return lost


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def write_tif(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, data, photometric="minisblack")
    return path


def sim_image(sim: Path, condition: str = "control", i: int = 0) -> np.ndarray:
    return tifffile.imread(sorted((sim / condition).glob("*.tif"))[i])


# ------------------------------------------------------------------------------ cases
@dataclass
class Ctx:
    """What a case's setup and check see: its folder and the shared fixtures (copied in on demand)."""

    ws: Workspace
    dir: Path
    before: dict[str, str] = field(default_factory=dict)
    notes: dict = field(default_factory=dict)

    def sim(self, name: str = "sim") -> Path:
        dest = self.dir / name
        if not dest.exists():
            shutil.copytree(self.ws.sim(), dest)
        return dest

    def model(self, name: str = "model") -> Path:
        dest = self.dir / name
        if not dest.exists():
            shutil.copytree(self.ws.model(), dest)
        return dest

    def step(self, *argv, **kw) -> Result:
        return step(list(argv), self.dir, **kw)

    def file(self, rel: str, text: str = "precious user data\n") -> Path:
        p = self.dir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        return p

    def translate_run(self, name: str = "run", *extra) -> Path:
        """A finished translate run of the control images to high, in the case folder."""
        model, sim = self.model(), self.sim()
        self.step("translate", model, sim / "control", self.dir / name, *FAST, "--to", "high", *extra)
        return self.dir / name

    def index(self, run: str = "out") -> list[dict]:
        return read_csv(self.dir / run / "index.csv")


@dataclass
class Case:
    name: str
    item: str                       # the issue item it covers: "1".."11" or "also-..."
    expect: str                     # error | warn (warn or refuse) | ok | ok-or-error
    setup: Callable[[Ctx], list]    # prepares the case folder, returns the phenolens argv
    needle: str | None = None       # text the error / warning line must contain
    check: Callable[[Ctx, Result], str | None] | None = None  # a problem, or None
    replaceable: tuple[str, ...] = ()
    timeout: float = 240
    fsize: int | None = None
    memory: int | None = None
    skip: Callable[[], str | None] | None = None


CASES: list[Case] = []


def case(name: str, item: str, expect: str, needle: str | None = None, **kw):
    def register(setup: Callable[[Ctx], list]):
        CASES.append(Case(name, item, expect, setup, needle, **kw))
        return setup
    return register


# ---- checks
def nothing_written(*rels: str) -> Callable[[Ctx, Result], str | None]:
    def check(ctx: Ctx, res: Result) -> str | None:
        for rel in rels:  # an empty folder, or one holding only the phenolens marker, is harmless
            p = ctx.dir / rel
            if p.is_file() or (p.is_dir() and any(f.is_file() and f.name != ".phenolens.json" for f in p.rglob("*"))):
                return f"{rel} was written although the command was refused"
        return None
    return check


def unique_outputs(run: str = "out") -> Callable[[Ctx, Result], str | None]:
    """Every (source, target) row has its own output and every source its own reconstruction."""
    def check(ctx: Ctx, res: Result) -> str | None:
        rows = ctx.index(run)
        if not rows:
            return "index.csv has no rows"
        pairs = [(r["source_path"], r.get("source_condition"), r["target_condition"]) for r in rows]
        if len(set(pairs)) != len(pairs):
            return "duplicate (source, target) rows in index.csv"
        outputs = [r["output_path"] for r in rows]
        if len(set(outputs)) != len(outputs):
            return "two rows share one output file"
        recon: dict[str, set] = {}
        for r in rows:
            recon.setdefault(r["reconstruction_path"], set()).add((r["source_path"], r.get("source_condition")))
        if any(len(v) > 1 for v in recon.values()):
            return "two sources share one reconstruction file"
        for r in rows:
            for col in ("output_path", "reconstruction_path"):
                if not (ctx.dir / run / r[col]).is_file():
                    return f"{col} {r[col]} does not exist"
        return None
    return check


def no_duplicate_rows(run: str = "out") -> Callable[[Ctx, Result], str | None]:
    def check(ctx: Ctx, res: Result) -> str | None:
        if res.code != 0:
            return None
        return unique_outputs(run)(ctx, res)
    return check


def find_key(data, key: str):
    if isinstance(data, dict):
        if key in data:
            return data[key]
        for v in data.values():
            found = find_key(v, key)
            if found is not None:
                return found
    return None


def changed_outputs(run: str, only: str | None = None) -> Callable[[Ctx, Result], str | None]:
    """A re-run after its model or a source changed: the affected outputs must be new (or the run refused)."""
    def check(ctx: Ctx, res: Result) -> str | None:
        if res.code != 0:
            return None
        old = {k: v for k, v in ctx.before.items() if k.startswith(f"{run}/") and k.endswith(".tif")
               and (only is None or only in k)}
        if not old:
            return "the first run wrote no outputs to compare"
        now = snapshot(ctx.dir)
        stale = [k for k, v in old.items() if now.get(k) == v]
        if len(stale) == len(old):
            return f"all {len(old)} outputs kept as they were (stale results reported as done)"
        return None
    return check


# ---- item 1: --overwrite never destroys the user's files; OUT apart from inputs and models
@case("overwrite-out-is-the-input-folder", "1", "error", "control")
def _(c: Ctx):
    return ["translate", c.model(), c.sim() / "control", c.sim() / "control", *FAST, "--to", "high", "--overwrite"]


@case("overwrite-out-is-the-inputs-parent", "1", "error", "sim")
def _(c: Ctx):
    return ["translate", c.model(), c.sim() / "control", c.sim(), *FAST, "--to", "high", "--overwrite"]


@case("overwrite-out-is-the-model-folder", "1", "error", "model")
def _(c: Ctx):
    return ["translate", c.model(), c.sim() / "control", c.model(), *FAST, "--to", "high", "--overwrite"]


@case("overwrite-out-inside-the-model-folder", "1", "error", "model")
def _(c: Ctx):
    return ["translate", c.model(), c.sim() / "control", c.model() / "run", *FAST, "--to", "high", "--overwrite"]


@case("overwrite-out-contains-the-manifest", "1", "error", check=nothing_written("here/index.csv"))
def _(c: Ctx):
    sim = c.sim("here/sim")
    return ["translate", c.model(), sim / "manifest.csv", c.dir / "here", *FAST, "--to", "high", "--overwrite"]


@case("overwrite-user-folder-translate", "1", "error", "mine")
def _(c: Ctx):
    c.file("mine/thesis.docx")
    return ["translate", c.model(), c.sim() / "control", c.dir / "mine", *FAST, "--to", "high", "--overwrite"]


@case("overwrite-earlier-run-keeps-user-file", "1", "ok", replaceable=("out/*",),
      check=lambda c, r: None if (c.dir / "out/my_notes.txt").is_file() else "out/my_notes.txt was deleted")
def _(c: Ctx):
    c.translate_run("out")
    c.file("out/my_notes.txt")
    return ["translate", c.model(), c.sim() / "control", c.dir / "out", *FAST, "--to", "low", "--overwrite"]


@case("overwrite-train-into-the-data-folder", "1", "error", "sim")
def _(c: Ctx):
    return ["train", c.sim(), c.sim(), *TRAIN, "--overwrite"]


@case("overwrite-train-into-a-user-folder", "1", "error", "mine")
def _(c: Ctx):
    c.file("mine/results.xlsx")
    return ["train", c.sim(), c.dir / "mine", *TRAIN, "--overwrite"]


@case("overwrite-train-model-keeps-user-file", "1", "ok",
      replaceable=("model/unet/*", "model/scheduler/*", "model/checkpoints/*", "model/*.json", "model/*.csv",
                   "model/samples/*", "model/.phenolens.json"))
def _(c: Ctx):
    c.model()
    c.file("model/README_lab.txt")
    return ["train", c.sim(), c.model(), *TRAIN, "--overwrite"]


@case("overwrite-simulate-into-a-user-folder", "1", "error", "mine")
def _(c: Ctx):
    c.file("mine/plate1/a.tif", "not really a tif, but mine")
    return ["simulate", c.dir / "mine", "--size", "32", "--per-condition", "1", "--overwrite"]


@case("overwrite-simulate-keeps-user-file", "1", "ok",
      replaceable=("sim/control/*", "sim/low/*", "sim/mid/*", "sim/high/*", "sim/_groundtruth/*",
                   "sim/manifest.csv", "sim/.phenolens.json"))
def _(c: Ctx):
    c.sim()
    c.file("sim/lab_notebook.txt")
    return ["simulate", c.dir / "sim", "--size", "32", "--per-condition", "2", "--overwrite"]


@case("overwrite-demo-into-the-data-folder", "1", "error", "sim", timeout=90)
def _(c: Ctx):
    return ["demo", c.sim(), "--steps", "2", "--n-images", "1", "--overwrite"]


@case("measure-on-a-data-folder", "1", "error", "index.csv", check=nothing_written("sim/measure"))
def _(c: Ctx):
    return ["measure", c.sim(), "--no-judges"]


@case("finetune-into-the-data-folder", "1", "error")
def _(c: Ctx):
    return ["finetune", c.sim(), c.sim() / "ft", "--base", c.dir / "no_base", "--steps", "1"]


# ---- item 2: output names never collide
@case("collide-same-stem-in-two-plates", "2", "ok", check=unique_outputs())
def _(c: Ctx):
    sim = c.sim()
    rows = []
    for i, (plate, name) in enumerate([("plate1", "a.tif"), ("plate2", "a.tif"), ("plate3", "a_2.tif")]):
        dest = c.dir / "plates" / plate / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(sorted((sim / "control").glob("*.tif"))[i], dest)
        rows.append({"path": f"{plate}/{name}", "condition": "control"})
    with (c.dir / "plates" / "manifest.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, ["path", "condition"])
        w.writeheader()
        w.writerows(rows)
    return ["translate", c.model(), c.dir / "plates" / "manifest.csv", c.dir / "out", *FAST, "--to", "high"]


@case("collide-conditions-dose-1-and-dose_1", "2", "ok", check=unique_outputs())
def _(c: Ctx):
    model = c.ws.odd_model()
    return ["translate", model, c.sim() / "control", c.dir / "out", *FAST, "--to", "dose 1", "dose_1"]


@case("collide-condition-named-reconstruction", "2", "ok", check=unique_outputs())
def _(c: Ctx):
    model = c.ws.odd_model()
    return ["translate", model, c.sim() / "control", c.dir / "out", *FAST, "--to", "reconstruction", "dose 1"]


@case("collide-one-file-under-two-conditions", "2", "ok", check=unique_outputs())
def _(c: Ctx):
    sim = c.sim()
    img = sorted((sim / "control").glob("*.tif"))[0].relative_to(sim).as_posix()
    c.file("two.csv", f"path,condition\nsim/{img},control\nsim/{img},low\n")
    return ["translate", c.model(), c.dir / "two.csv", c.dir / "out", *FAST, "--to", "high"]


def _stable_after_edit(c: Ctx, res: Result) -> str | None:
    if res.code != 0:
        return None
    first = c.notes["first"]
    for r in c.index():
        key = (r["source_path"], r["target_condition"])
        if key in first and first[key] != r["output_path"]:
            return f"{Path(r['source_path']).name} -> {r['target_condition']} moved from {first[key]} to {r['output_path']}"
    return unique_outputs()(c, res)


@case("names-stable-when-the-manifest-is-edited", "2", "ok-or-error", check=_stable_after_edit,
      replaceable=("out/*",))
def _(c: Ctx):
    sim = c.sim()
    imgs = sorted((sim / "control").glob("*.tif"))[:3]
    c.file("m.csv", "path,condition\n" + "".join(f"sim/control/{p.name},control\n" for p in imgs))
    c.step("translate", c.model(), c.dir / "m.csv", c.dir / "out", *FAST, "--to", "high")
    c.notes["first"] = {(r["source_path"], r["target_condition"]): r["output_path"] for r in c.index()}
    c.file("m.csv", "path,condition\n" + "".join(f"sim/control/{p.name},control\n" for p in imgs[1:]))
    return ["translate", c.model(), c.dir / "m.csv", c.dir / "out", *FAST, "--to", "high"]


# ---- item 3: training into its own data
@case("train-model-inside-the-data", "3", "error", "sim")
def _(c: Ctx):
    return ["train", c.sim(), c.sim() / "model", *TRAIN]


@case("train-model-inside-a-condition-folder", "3", "error", "sim")
def _(c: Ctx):
    return ["train", c.sim(), c.sim() / "control" / "model", *TRAIN]


# ---- item 4: intensities unlike the training set's
def _has_clip_column(c: Ctx, res: Result) -> str | None:
    if res.code != 0:
        return None
    cols = list(c.index()[0])
    if not any("clip" in col for col in cols):
        return f"index.csv reports no clipped fraction (columns: {', '.join(cols)})"
    return None


@case("8-bit-image-into-a-16-bit-model", "4", "warn", check=_has_clip_column)
def _(c: Ctx):
    img = sim_image(c.sim())
    write_tif(c.dir / "eight" / "control" / "a.tif", np.clip(img / 16, 0, 255).astype(np.uint8))
    return ["translate", c.model(), c.dir / "eight" / "control", c.dir / "out", *FAST, "--to", "high"]


@case("float-0-1-image-into-a-16-bit-model", "4", "warn", check=_has_clip_column)
def _(c: Ctx):
    img = sim_image(c.sim())
    write_tif(c.dir / "float" / "control" / "a.tif", (img / 65535.0).astype(np.float32))
    return ["translate", c.model(), c.dir / "float" / "control", c.dir / "out", *FAST, "--to", "high"]


@case("index-reports-clipped-fraction", "4", "ok", check=_has_clip_column)
def _(c: Ctx):
    return ["translate", c.model(), c.sim() / "control", c.dir / "out", *FAST, "--to", "high"]


@case("train-on-mixed-8-and-16-bit", "4", "warn")
def _(c: Ctx):
    sim = c.sim()
    for p in sorted((sim / "low").glob("*.tif"))[:3]:
        write_tif(p, np.clip(tifffile.imread(p) / 16, 0, 255).astype(np.uint8))
    return ["train", sim, c.dir / "model_mixed", *TRAIN]


# ---- item 5: NaN / inf pixels
def _float_with(value: float):
    def setup(c: Ctx):
        img = sim_image(c.sim()).astype(np.float32)
        img[0, 5, 5] = value
        write_tif(c.dir / "bad" / "control" / "poisoned.tif", img)
        write_tif(c.dir / "bad" / "control" / "fine.tif", sim_image(c.sim(), i=1).astype(np.float32))
        return ["translate", c.model(), c.dir / "bad" / "control", c.dir / "out", *FAST, "--to", "high"]
    return setup


case("nan-pixel-in-a-source", "5", "error", "poisoned.tif")(_float_with(float("nan")))
case("inf-pixel-in-a-source", "5", "error", "poisoned.tif")(_float_with(float("inf")))


@case("nan-pixel-in-training-data", "5", "error", "poisoned.tif")
def _(c: Ctx):
    sim = c.sim()
    img = sim_image(sim, "mid").astype(np.float32)
    img[1, 3, 3] = np.nan
    write_tif(sim / "mid" / "poisoned.tif", img)
    return ["train", sim, c.dir / "m", *TRAIN]


@case("measure-a-run-with-a-nan-output", "5", "warn", "nan", timeout=300)
def _(c: Ctx):
    run = c.translate_run("run")
    row = next(r for r in read_csv(run / "index.csv") if r["target_condition"] == "high")
    out = run / row["output_path"]
    img = tifffile.imread(out).astype(np.float32)
    img[:] = np.nan
    tifffile.imwrite(out, img, photometric="minisblack")
    c.notes["nan_file"] = out.name
    return ["measure", run, "--no-judges", "--max-reference", "2", "--workers", "1"]


# ---- item 6: stale results
@case("stale-model-retrained-in-place", "6", "ok-or-error", check=changed_outputs("out"),
      replaceable=("out/*", "model/*"))
def _(c: Ctx):
    model, sim = c.model(), c.sim()
    c.step("translate", model, sim / "control", c.dir / "out", *FAST, "--to", "high")
    c.step("train", sim, model, *TRAIN, "--seed", "7", "--overwrite")
    return ["translate", model, sim / "control", c.dir / "out", *FAST, "--to", "high"]


def _stale_source_check(c: Ctx, res: Result) -> str | None:
    return changed_outputs("out", only=c.notes["changed"])(c, res)


@case("stale-source-image-changed", "6", "ok-or-error", check=_stale_source_check, replaceable=("out/*",))
def _(c: Ctx):
    model, sim = c.model(), c.sim()
    c.step("translate", model, sim / "control", c.dir / "out", *FAST, "--to", "high")
    src = sorted((sim / "control").glob("*.tif"))[0]
    write_tif(src, sim_image(sim, "high", 0))
    c.notes["changed"] = src.stem
    return ["translate", model, sim / "control", c.dir / "out", *FAST, "--to", "high"]


# ---- item 7: --config replay
def _rows_from(cond: str):
    def check(c: Ctx, res: Result) -> str | None:
        if res.code != 0:
            return None
        got = {r["source_condition"] for r in c.index()}
        return None if got == {cond} else f"translated sources of {sorted(got)}, not --from {cond}"
    return check


@case("config-loses-to---from", "7", "ok", check=_rows_from("control"))
def _(c: Ctx):
    c.file("c.json", json.dumps({"source": "low"}))
    return ["translate", c.model(), c.sim(), c.dir / "out", *FAST, "--to", "high", "--from", "control",
            "--config", c.dir / "c.json"]


def _run_json_steps(c: Ctx, res: Result) -> str | None:
    if res.code != 0:
        return None
    steps = find_key(json.loads((c.dir / "out" / "run.json").read_text()), "steps")
    return None if steps == 2 else f"ran with --steps {steps} from the file, not --ste 2"


@case("config-loses-to-an-abbreviated-option", "7", "ok", check=_run_json_steps)
def _(c: Ctx):
    c.file("c.json", json.dumps({"steps": 7, "to": ["high"]}))
    return ["translate", c.model(), c.sim() / "control", c.dir / "out", "--ste", "2", "--inversion-iters", "1",
            "--config", c.dir / "c.json"]


@case("config-loses-to---no-judges", "7", "error", check=lambda c, r: None if json.loads(
      (c.dir / "saved.json").read_text()).get("judges") is False else "the file's judges=true beat --no-judges")
def _(c: Ctx):
    c.file("c.json", json.dumps({"judges": True}))
    return ["measure", c.dir / "no_run", "--no-judges", "--config", c.dir / "c.json", "--save-config",
            c.dir / "saved.json"]


@case("config-steps-text", "7", "error", "steps")
def _(c: Ctx):
    c.file("c.json", json.dumps({"steps": "three"}))
    return ["translate", c.dir / "m", c.dir / "i", c.dir / "out", "--config", c.dir / "c.json"]


@case("config-inversion-not-a-choice", "7", "error", "inversion")
def _(c: Ctx):
    c.file("c.json", json.dumps({"inversion": "foo"}))
    return ["translate", c.dir / "m", c.dir / "i", c.dir / "out", "--config", c.dir / "c.json"]


@case("config-switch-not-a-boolean", "7", "error", "overwrite")
def _(c: Ctx):
    c.file("c.json", json.dumps({"overwrite": "no"}))
    return ["translate", c.dir / "m", c.dir / "i", c.dir / "out", "--config", c.dir / "c.json"]


@case("config-round-trip-resumes-the-same-run", "7", "ok", replaceable=("out/*",))
def _(c: Ctx):
    model, sim = c.model(), c.sim()
    c.step("translate", model, sim / "control", c.dir / "out", *FAST, "--to", "high", "--from", "control",
           "--save-config", c.dir / "saved.json")
    return ["translate", model, sim / "control", c.dir / "out", "--config", c.dir / "saved.json"]


@case("save-config-into-a-missing-folder", "11", "ok-or-error",
      check=lambda c, r: None if r.code != 0 or (c.dir / "cfgs/new/t.json").is_file() else "exit 0, no config written")
def _(c: Ctx):
    return ["translate", c.model(), c.sim() / "control", c.dir / "out", *FAST, "--to", "high",
            "--save-config", c.dir / "cfgs" / "new" / "t.json"]


@case("save-config-under-a-file", "11", "error", "--save-config")
def _(c: Ctx):
    c.file("somefile")
    return ["translate", c.dir / "m", c.dir / "i", c.dir / "out", "--save-config", c.dir / "somefile" / "t.json"]


# ---- item 8: resume with changed settings
def _resume(change: str):
    def setup(c: Ctx):
        sim = c.sim()
        c.step("train", sim, c.dir / "m", *TRAIN)
        argv = ["train", sim, c.dir / "m", "--steps", "4", "--size", "32", "--batch-size", "4",
                "--checkpoint-every", "1", "--lr-schedule", "constant", "--resume"]
        if change == "lr":
            argv += ["--lr", "0.01"]
        elif change == "warmup":
            argv += ["--warmup-steps", "3"]
        elif change == "dropout":
            argv += ["--cond-dropout", "0.2"]
        elif change == "size":
            argv[argv.index("32")] = "48"
        elif change == "data-added":
            shutil.copy2(sorted((sim / "high").glob("*.tif"))[0], sim / "low" / "extra.tif")
        elif change == "data-content":
            p = sorted((sim / "low").glob("*.tif"))[0]
            write_tif(p, sim_image(sim, "high", 1))
        return argv
    return setup


@case("resume-with-nothing-changed", "8", "ok", replaceable=("m/*",))
def _(c: Ctx):
    return _resume("nothing")(c)


for _change, _needle in [("lr", "lr"), ("warmup", "warmup"), ("dropout", "dropout"), ("size", "size"),
                         ("data-added", None), ("data-content", None)]:
    case(f"resume-with-changed-{_change}", "8", "error", _needle)(_resume(_change))


# ---- item 9: duplicate rows, --to high high, manifest column clashing with an output column
@case("manifest-duplicate-rows", "9", "warn", check=no_duplicate_rows())
def _(c: Ctx):
    sim = c.sim()
    img = sorted((sim / "control").glob("*.tif"))[0].name
    c.file("dup.csv", f"path,condition\nsim/control/{img},control\nsim/control/{img},control\n")
    return ["translate", c.model(), c.dir / "dup.csv", c.dir / "out", *FAST, "--to", "high"]


@case("to-high-high", "9", "ok-or-error", check=no_duplicate_rows())
def _(c: Ctx):
    return ["translate", c.model(), c.sim() / "control", c.dir / "out", *FAST, "--to", "high", "high"]


@case("manifest-column-named-source_path", "9", "warn", "source_path")
def _(c: Ctx):
    sim = c.sim()
    img = sorted((sim / "control").glob("*.tif"))[0].name
    c.file("m.csv", f"path,condition,source_path\nsim/control/{img},control,/lab/raw/{img}\n")
    return ["translate", c.model(), c.dir / "m.csv", c.dir / "out", *FAST, "--to", "high"]


# ---- item 10: options that cannot work
@case("guidance-without-condition-dropout", "10", "error", "--cond-dropout")
def _(c: Ctx):
    c.step("train", c.sim(), c.dir / "m0", *TRAIN, "--cond-dropout", "0")  # the default is 0.1 since issue 11
    return ["translate", c.dir / "m0", c.sim() / "control", c.dir / "out", *FAST, "--to", "high",
            "--guidance-scale", "3"]


@case("guidance-on-a-model-that-does-not-record-dropout", "10", "warn", "older model")
def _(c: Ctx):
    model = c.model()
    info = json.loads((model / "phenolens.json").read_text())
    info.pop("cond_dropout", None)
    if isinstance(info.get("training"), dict) and isinstance(info["training"].get("config"), dict):
        info["training"]["config"].pop("cond_dropout", None)
    (model / "phenolens.json").write_text(json.dumps(info))
    return ["translate", model, c.sim() / "control", c.dir / "out", *FAST, "--to", "high", "--guidance-scale", "3"]


@case("ema-decay-above-1", "10", "error", "--ema-decay")
def _(c: Ctx):
    return ["train", c.sim(), c.dir / "m", *TRAIN, "--ema-decay", "1.5"]


@case("ema-decay-equal-1", "10", "error", "--ema-decay")
def _(c: Ctx):
    return ["train", c.sim(), c.dir / "m", *TRAIN, "--ema-decay", "1"]


@case("inversion-iters-0-fixed-point", "10", "error", "--inversion-iters", check=nothing_written("out"))
def _(c: Ctx):
    return ["translate", c.model(), c.sim() / "control", c.dir / "out", "--steps", "2", "--inversion-iters", "0"]


# ---- item 11: one line instead of a traceback
@case("translate-out-under-a-file", "11", "error", "somefile")
def _(c: Ctx):
    c.file("somefile")
    return ["translate", c.model(), c.sim() / "control", c.dir / "somefile" / "out", *FAST, "--to", "high"]


@case("train-out-under-a-file", "11", "error", "somefile")
def _(c: Ctx):
    c.file("somefile")
    return ["train", c.sim(), c.dir / "somefile" / "m", *TRAIN]


@case("simulate-out-under-a-file", "11", "error", "somefile")
def _(c: Ctx):
    c.file("somefile")
    return ["simulate", c.dir / "somefile" / "sim", "--size", "32", "--per-condition", "1"]


@case("report-out-under-a-file", "11", "error", "somefile")
def _(c: Ctx):
    run = c.translate_run("run")
    c.file("somefile")
    return ["report", run, "--out", c.dir / "somefile" / "report.html", "--max-images", "1"]


@case("translate-file-size-limit-hit", "11", "error", "cannot write", fsize=4_000, replaceable=("out/*",))
def _(c: Ctx):
    return ["translate", c.model(), c.sim() / "control", c.dir / "out", *FAST]


@case("device-banana", "11", "error", "--device")
def _(c: Ctx):
    return ["translate", c.model(), c.sim() / "control", c.dir / "out", *FAST, "--device", "banana"]


def _has_cuda() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return "this machine has CUDA" if torch.cuda.is_available() else None


@case("device-cuda-without-cuda", "11", "error", "--device", skip=_has_cuda)
def _(c: Ctx):
    return ["translate", c.model(), c.sim() / "control", c.dir / "out", *FAST, "--device", "cuda"]


@case("memorization-device-banana", "11", "error", "--device")
def _(c: Ctx):
    return ["memorization", c.sim(), c.dir / "mem", "--steps", "1", "--device", "banana"]


@case("train-lr-negative", "11", "error", "--lr")
def _(c: Ctx):
    return ["train", c.sim(), c.dir / "m", *TRAIN, "--lr", "-1"]


@case("measure-nuclei-channel-9", "11", "error", "--nuclei-channel")
def _(c: Ctx):
    return ["measure", c.translate_run("run"), "--nuclei-channel", "9", "--no-judges"]


@case("measure-max-reference-0", "11", "error", "--max-reference")
def _(c: Ctx):
    return ["measure", c.translate_run("run"), "--max-reference", "0", "--no-judges"]


def _truncate_index(c: Ctx) -> Path:
    run = c.translate_run("run")
    text = (run / "index.csv").read_text()
    lines = text.splitlines()
    (run / "index.csv").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 3])
    return run


@case("measure-truncated-index", "11", "error", "index.csv", replaceable=("run/measure/*",))
def _(c: Ctx):
    return ["measure", _truncate_index(c), "--no-judges", "--max-reference", "2", "--workers", "1"]


@case("report-truncated-index", "11", "error", "index.csv", replaceable=("run/report.html",))
def _(c: Ctx):
    return ["report", _truncate_index(c), "--max-images", "1"]


@case("huge-tiff-30000-square", "11", "error", "huge.tif", timeout=150, memory=8 << 30)
def _(c: Ctx):
    path = c.dir / "big" / "control" / "huge.tif"
    path.parent.mkdir(parents=True)
    # a 30000 x 30000 x 4 uint8 TIFF whose pixels are never written: a sparse file, cheap on disk
    mm = tifffile.memmap(path, shape=(4, 30000, 30000), dtype=np.uint8, photometric="minisblack")
    del mm
    return ["translate", c.model(), path.parent, c.dir / "out", *FAST, "--to", "high"]


# ---- Also
def _umask_check(folder: str):
    def check(c: Ctx, res: Result) -> str | None:
        if res.code != 0:
            return None
        for p in (c.dir / folder).rglob("*"):
            if p.is_file() and not p.name.startswith("."):
                mode = stat.S_IMODE(p.stat().st_mode)
                if mode != 0o644:
                    return f"{p.relative_to(c.dir)} has mode {oct(mode)}, not 0o644 (umask 022)"
        return None
    return check


@case("translate-outputs-get-the-umask", "also-umask", "ok", check=_umask_check("out"))
def _(c: Ctx):
    return ["translate", c.model(), c.sim() / "control", c.dir / "out", *FAST, "--to", "high"]


@case("train-outputs-get-the-umask", "also-umask", "ok", check=_umask_check("m"))
def _(c: Ctx):
    return ["train", c.sim(), c.dir / "m", *TRAIN]


def _unicode_check(c: Ctx, res: Result) -> str | None:
    if res.code != 0:
        return None
    err = unique_outputs()(c, res)
    if err:
        return err
    paths = " ".join(r["output_path"] for r in c.index())
    missing = [w for w in ("ßild", "µ", "图像") if w not in paths]
    return f"output names lost {missing}: {paths[:120]}" if missing else None


@case("unicode-file-names", "also-unicode", "ok", check=_unicode_check)
def _(c: Ctx):
    sim = c.sim()
    folder = c.dir / "uni" / "control"
    folder.mkdir(parents=True)
    srcs = sorted((sim / "control").glob("*.tif"))
    shutil.copy2(srcs[0], folder / "ßild 1 µ.tif")
    shutil.copy2(srcs[1], folder / "图像 2.tif")
    shutil.copy2(srcs[2], folder / "2.tif")
    return ["translate", c.model(), folder, c.dir / "out", *FAST, "--to", "high"]


def _conditions_are(expected: list[str]):
    def check(c: Ctx, res: Result) -> str | None:
        if res.code != 0:
            return None
        got = json.loads((c.dir / "m" / "phenolens.json").read_text())["conditions"]
        if got != expected:
            return f"stored condition order {got}, expected {expected}"
        if not all(name in res.stdout + res.stderr for name in expected):
            return "the condition order used was not printed"
        return None
    return check


@case("dose-order-from-manifest-beside-folders", "also-order", "ok", check=_conditions_are(CONDITIONS))
def _(c: Ctx):
    return ["train", c.sim(), c.dir / "m", *TRAIN]


@case("dose-order-natural-numbers", "also-order", "ok", check=_conditions_are(["DMSO", "dose_2uM", "dose_10uM",
                                                                                "dose_100uM"]))
def _(c: Ctx):
    make_dataset(c.dir / "doses", c.sim(), {"dose_10uM": "mid", "dose_100uM": "high", "dose_2uM": "low",
                                             "DMSO": "control"}, per_condition=3)
    return ["train", c.dir / "doses", c.dir / "m", *TRAIN]


@case("model-json-says-3-channels-on-a-4-channel-net", "also-messages", "error", "phenolens.json")
def _(c: Ctx):
    model = c.model()
    info = json.loads((model / "phenolens.json").read_text())
    info["n_channels"] = 3
    (model / "phenolens.json").write_text(json.dumps(info))
    return ["translate", model, c.sim() / "control", c.dir / "out", *FAST, "--to", "high"]


@case("demo-n-images-0", "also-messages", "error", "--n-images", check=nothing_written("demo"), timeout=90)
def _(c: Ctx):
    return ["demo", c.dir / "demo", "--n-images", "0", "--steps", "2"]


# ---- DiffEx (issue 12): the classifier, the semantic model, directions and explain
CLF = ["--steps", "3", "--batch-size", "4"]
DIFFEX = ["--method", "diffex", "--steps", "2", "--batch-size", "4", "--code-dim", "4", "--checkpoint-every", "1"]


@case("classifier-train-into-the-data-folder", "diffex", "error", "sim")
def _(c: Ctx):
    return ["classifier", "train", c.sim(), c.sim() / "clf", *CLF]


@case("classifier-train-into-a-user-folder", "diffex", "error", "mine")
def _(c: Ctx):
    c.file("mine/figure.svg")
    return ["classifier", "train", c.sim(), c.dir / "mine", *CLF, "--overwrite"]


@case("classifier-overwrite-keeps-user-file", "diffex", "ok", replaceable=("clf/*",),
      check=lambda c, r: None if (c.dir / "clf/notes.txt").is_file() else "clf/notes.txt was deleted")
def _(c: Ctx):
    c.step("classifier", "train", c.sim(), c.dir / "clf", *CLF)
    c.file("clf/notes.txt")
    return ["classifier", "train", c.sim(), c.dir / "clf", *CLF, "--overwrite"]


@case("diffex-classifier-of-other-classes", "diffex", "error", "classes", check=nothing_written("dx/unet"))
def _(c: Ctx):
    two = make_dataset(c.dir / "two", c.sim(), {"control": "control", "high": "high"})
    c.step("classifier", "train", two, c.dir / "clf", *CLF)
    return ["train", c.sim(), c.dir / "dx", *DIFFEX, "--classifier", c.dir / "clf"]


@case("explain-directions-of-another-model", "diffex", "error", "another model", check=nothing_written("expl/ranking.csv"))
def _(c: Ctx):
    c.step("classifier", "train", c.sim(), c.dir / "clf", *CLF)
    for name, seed in (("dx1", "1"), ("dx2", "2")):
        c.step("train", c.sim(), c.dir / name, *DIFFEX, "--classifier", c.dir / "clf", "--seed", seed)
    c.step("directions", c.dir / "dx2", c.sim(), c.dir / "dirs", "-k", "2", "--steps", "2")
    return ["explain", c.dir / "dx1", c.dir / "dirs", c.sim(), c.dir / "expl", "--steps", "2"]


@case("directions-alpha-0", "diffex", "error", "--alpha", check=nothing_written("dirs/directions.json"))
def _(c: Ctx):
    c.step("classifier", "train", c.sim(), c.dir / "clf", *CLF)
    c.step("train", c.sim(), c.dir / "dx", *DIFFEX, "--classifier", c.dir / "clf")
    return ["directions", c.dir / "dx", c.sim(), c.dir / "dirs", "--alpha", "0"]



# ---- a screen's whole fields (issue 14): `phenolens crop`
def _screen_fields(c: Ctx, names: dict[str, int], dtype=np.uint16, folder: str = "screen") -> Path:
    """Per-channel files `{field}_w1.tif` / `_w2.tif` of 64 px fields with N bright discs each."""
    root = c.dir / folder
    root.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:64, :64]
    for name, n in names.items():
        img = np.full((64, 64), 100.0)
        for k in range(n):
            img += 2000.0 * (((yy - 16 - 32 * (k % 2)) ** 2 + (xx - 16 - 32 * (k // 2 % 2)) ** 2) <= 16)
        img += np.random.default_rng(len(name)).normal(0, 5, img.shape)
        for ch in ("1", "2"):
            data = img / 10 if dtype == np.uint8 else img
            write_tif(root / f"{name}_w{ch}.tif", np.clip(data, 0, np.iinfo(dtype).max).astype(dtype))
    return root


CROP = ["--pattern", "{well}_w{channel}.tif", "--channel-names", "1=DNA,2=Actin", "--condition", "c",
        "--size", "16", "--nucleus-diameter", "8"]


@case("crop-loaddata-channel-columns-disagree", "crop", "error", "channel columns disagree",
      check=nothing_written("crops"))
def _(c: Ctx):
    screen = _screen_fields(c, {"A01": 2})
    table = c.file("load_data.csv", f"FileName_DNA,PathName_DNA,FileName_Actin,PathName_Tubulin,Metadata_Condition\n"
                                   f"A01_w1.tif,{screen},A01_w2.tif,{screen},c\n")
    return ["crop", table, c.dir / "crops"]


@case("crop-pattern-matches-nothing", "crop", "error", "matches none", check=nothing_written("crops"))
def _(c: Ctx):
    return ["crop", _screen_fields(c, {"A01": 2}), c.dir / "crops", "--pattern", "{plate}_s{site}_{channel}.TIF",
            "--condition", "c"]


@case("crop-a-field-without-nuclei", "crop", "warn", "no nuclei",
      check=lambda c, r: None if len(read_csv(c.dir / "crops/manifest.csv")) == 4 else "the other field was not cropped")
def _(c: Ctx):
    return ["crop", _screen_fields(c, {"A01": 4, "A02": 0}), c.dir / "crops", *CROP, "--border", "pad"]


@case("crop-mixed-bit-depths", "crop", "error", "mixed bit depths", check=nothing_written("crops"))
def _(c: Ctx):
    _screen_fields(c, {"A01": 2})
    _screen_fields(c, {"A02": 2}, dtype=np.uint8)
    return ["crop", c.dir / "screen", c.dir / "crops", *CROP]


@case("crop-out-inside-the-screen", "crop", "error", "inside the input")
def _(c: Ctx):
    screen = _screen_fields(c, {"A01": 2})
    return ["crop", screen, screen / "crops", *CROP]


@case("crop-into-a-user-folder", "crop", "error", "mine")
def _(c: Ctx):
    screen = _screen_fields(c, {"A01": 2})
    c.file("mine/plate_map.xlsx")
    return ["crop", screen, c.dir / "mine", *CROP, "--overwrite"]


@case("crop-resumed-with-other-settings", "crop", "error", "other settings", replaceable=("crops/*",))
def _(c: Ctx):
    screen = _screen_fields(c, {"A01": 2})
    c.step("crop", screen, c.dir / "crops", *CROP)
    return ["crop", screen, c.dir / "crops", *CROP[:-4], "--size", "24", "--nucleus-diameter", "8"]


# ------------------------------------------------------------------------------ verdicts
def message_line(res: Result) -> str:
    """The line a user reads: the first `error:` line, else the first warning, else the first line."""
    lines = [ln.strip() for ln in (res.stderr or "").splitlines() if ln.strip()]
    for pred in (lambda ln: "error:" in ln, lambda ln: "warning" in ln.lower()):
        for ln in lines:
            if pred(ln):
                return ln
    if "Traceback" in (res.stderr or "") and lines:
        return lines[-1]
    return lines[0] if lines else ((res.stdout or "").strip().splitlines() or [""])[0]


def classify(c: Case, res: Result, lost: list[str], problem: str | None) -> tuple[str, str]:
    """(verdict, reason) for a finished case."""
    if lost:
        return "data-loss", f"lost {len(lost)}: {', '.join(lost[:3])}"
    if res.timed_out:
        return "traceback", f"hang: killed after {c.timeout:g} s"
    if "Traceback (most recent call last)" in res.stderr:
        return "traceback", ""
    errors = [ln for ln in res.stderr.splitlines() if "error:" in ln]
    warnings = [ln for ln in res.stderr.splitlines() if "warning" in ln.lower()]
    needle_in = (lambda lines: c.needle is None or any(c.needle.lower() in ln.lower() for ln in lines))
    if res.code == 0:
        if c.expect == "error":
            return "silently-wrong", "exit 0 where an error was required"
        if c.expect == "warn" and not (warnings and needle_in(warnings)):
            return "silently-wrong", "exit 0 without the required warning"
        if problem:
            return "silently-wrong", problem
        return "ok-run", ""
    if res.code == 2 and c.expect in ("error", "warn", "ok-or-error"):
        if len(errors) != 1:
            return "unclear", f"{len(errors)} error lines"
        if not needle_in(errors):
            return "unclear", f"the message does not name {c.needle!r}"
        if problem and c.expect == "error":
            return "silently-wrong", problem
        return "ok-error", ""
    if res.code == 2 and c.expect == "ok":
        return "refused", "exit 2 where the command should work"
    return "unclear", f"exit {res.code}"


def run_case(ws: Workspace, c: Case) -> dict:
    cdir = ws.root / re.sub(r"[^A-Za-z0-9_.-]+", "_", c.name)
    if cdir.exists():
        shutil.rmtree(cdir)
    cdir.mkdir(parents=True)
    ctx = Ctx(ws, cdir)
    row = {"case": c.name, "item": c.item, "expect": c.expect, "code": "", "message": "", "preserved": "",
           "verdict": "", "reason": "", "seconds": 0.0}
    reason = c.skip() if c.skip else None
    if reason:
        row.update(verdict="skipped", reason=reason)
        return row
    try:
        argv = c.setup(ctx)
    except SetupError as err:
        row.update(verdict="setup-failed", reason=str(err))
        return row
    except Exception as err:  # the suite's own preparation broke: report it, run the other cases
        row.update(verdict="setup-failed", reason=f"{type(err).__name__}: {err}"[:200])
        return row
    ctx.before = snapshot(cdir)
    res = phenolens(argv, cdir, timeout=c.timeout, fsize=c.fsize, memory=c.memory)
    # the case folder's path would match a needle by its name: show and judge messages without it
    res.stderr = res.stderr.replace(str(cdir), "$CASE").replace(str(ws.root), "$WS")
    res.stdout = res.stdout.replace(str(cdir), "$CASE").replace(str(ws.root), "$WS")
    after = snapshot(cdir)
    lost = lost_files(ctx.before, after, c.replaceable)
    problem = None
    if c.check is not None:
        try:
            problem = c.check(ctx, res)
        except Exception as err:  # a check that cannot read the result: the result is wrong
            problem = f"check failed: {type(err).__name__}: {err}"
    verdict, why = classify(c, res, lost, problem)
    row.update(code="timeout" if res.timed_out else res.code, message=message_line(res)[:200],
               preserved="no" if lost else "yes", verdict=verdict, reason=why, seconds=round(res.seconds, 1))
    return row


def print_table(rows: list[dict]) -> None:
    w = max(len(r["case"]) for r in rows)
    print(f"{'case':<{w}}  exit  files  {'verdict':<14}  first line of the message")
    for r in rows:
        msg = r["message"] or ""
        extra = f"  [{r['reason']}]" if r["reason"] else ""
        print(f"{r['case']:<{w}}  {str(r['code']):>4}  {r['preserved'] or '-':>5}  {r['verdict']:<14}  "
              f"{msg[:110]}{extra}")


def summary(rows: list[dict]) -> tuple[str, bool]:
    counts = {v: sum(r["verdict"] == v for r in rows) for v in (*BAD, *OTHER_BAD)}
    line = (f"{len(rows)} cases: {counts['data-loss']} data loss, {counts['traceback']} tracebacks, "
            f"{counts['silently-wrong']} silently wrong")
    other = sum(counts[v] for v in OTHER_BAD)
    if other:
        line += "; also " + ", ".join(f"{counts[v]} {v}" for v in OTHER_BAD if counts[v])
    return line, any(counts[v] for v in (*BAD, *OTHER_BAD))


def select(only: str | None) -> list[Case]:
    if not only:
        return list(CASES)
    words = [w.strip() for w in only.split(",") if w.strip()]
    return [c for c in CASES if any(w in c.name for w in words)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", metavar="SUBSTR", help="run only cases whose name contains SUBSTR (comma-separated: any)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary workspace and print its path")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--workspace", type=Path, default=None, help="use (and keep) this folder as the workspace")
    ap.add_argument("--jobs", type=int, default=1, metavar="N", help="run N cases at a time (default 1)")
    ap.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    cases = select(args.only)
    if args.list:
        for c in cases:
            print(f"{c.name:<48} item {c.item:<14} expect {c.expect}")
        print(f"{len(cases)} cases")
        return 0
    if not cases:
        print(f"no case matches {args.only!r}", file=sys.stderr)
        return 2
    root = args.workspace or Path(tempfile.mkdtemp(prefix="phenolens-bad-input-"))
    root.mkdir(parents=True, exist_ok=True)
    ws = Workspace(root)
    rows = []

    def one(c: Case) -> dict:
        row = run_case(ws, c)
        print(f"  {row['verdict']:<14} {c.name} ({row['seconds']} s)", file=sys.stderr, flush=True)
        return row

    try:
        with ThreadPoolExecutor(max(args.jobs, 1)) as pool:
            rows = list(pool.map(one, cases))
        shared = ws.shared_losses()
        if shared:
            rows.append({"case": "(shared fixtures: no case may write there)", "item": "1", "expect": "ok",
                         "code": "", "message": "", "preserved": "no", "verdict": "data-loss",
                         "reason": ", ".join(shared[:3]), "seconds": 0.0})
    finally:
        if args.keep or args.workspace:
            print(f"workspace kept: {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    print_table(rows)
    line, bad = summary(rows)
    print(line)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
