"""Output folders that never destroy a user's files.

Every command that writes a folder (translate, train, finetune, measure, simulate, demo) opens it
through :class:`OutputFolder`. Why: a biologist's images and models are irreplaceable, and one flag
(`--overwrite`) pointed at the wrong folder must not be able to remove them. So:

- a folder phenolens writes holds a marker file (``.phenolens.json``) listing the kind of output and
  every path phenolens wrote into it; `--overwrite` removes *only* those paths, nothing else;
- a non-empty folder without the marker is never written into (nor cleared), except one that an
  older phenolens wrote (before markers): the command says how to recognise it and which files
  it wrote there (``older=``), and only those become the inventory;
- an output folder may not be, contain, or lie inside an input (images, a manifest) or a model
  folder: :func:`check_apart`.

Only the standard library is imported: every layer (data, train, run, demo) uses this module.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable

from phenolens.atomic import write_json_atomic
from phenolens.errors import PhenolensError

MARKER = ".phenolens.json"


def _resolved(path: Path) -> Path:
    return Path(os.path.abspath(os.path.realpath(path)))


def check_apart(out: Path, *, inputs: Iterable[Path] = (), models: Iterable[Path] = (),
                option: str = "OUT") -> None:
    """Refuse an output folder that is, contains, or lies inside an input path or a model folder.

    `inputs` are the folders and files a command reads (a dataset root, a condition folder, a
    manifest and the images it lists); `models` are model folders. An output that contains an input
    file could delete or shadow it; an output inside a dataset folder would be read back as data.
    """
    o = _resolved(Path(out))
    for kind, paths in (("input", inputs), ("model folder", models)):
        for p in paths:
            r = _resolved(Path(p))
            if o == r:
                raise PhenolensError(f"{option} {out}: is the {kind} {p}; choose a new folder for the outputs")
            if r in o.parents and (r.is_dir() or not r.exists()):
                raise PhenolensError(f"{option} {out}: lies inside the {kind} {p}; choose a folder outside it "
                                     "(outputs there would mix with what phenolens reads)")
            if o in r.parents:
                raise PhenolensError(f"{option} {out}: contains the {kind} {p}; choose a new folder for the outputs")


class OutputFolder:
    """A folder phenolens writes into and keeps an inventory of (the marker file).

    Open it with :meth:`open`; call :meth:`record` with every path written (relative to the folder,
    or absolute inside it) so that `clear` can later remove exactly those.
    """

    def __init__(self, path: Path, kind: str, files: Iterable[str] = ()) -> None:
        self.path = Path(path)
        self.kind = kind
        self.files: list[str] = list(dict.fromkeys(files))

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | Path, kind: str, *, overwrite: bool = False, adopt: bool = False,
             older: Callable[[Path], Iterable[str] | None] | None = None, option: str = "OUT") -> "OutputFolder":
        """Create or reopen PATH as an output folder of KIND.

        - new or empty folder: created, marked;
        - marked by phenolens with the same kind: reopened (resume); with `overwrite`, the files it
          recorded are removed first (and nothing else);
        - marked with another kind: refused (a translate run is not a model folder);
        - not empty and unmarked: refused, unless `older(path)` names the files an older phenolens
          wrote there (None: it is not such a folder); those are recorded, nothing else of the
          folder ever is (`adopt=True`: adopt without naming any). With `overwrite` they are removed.
        """
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise PhenolensError(f"{option} {path}: exists and is not a folder")
        marker = path / MARKER
        folder: OutputFolder | None = None
        if marker.is_file():
            folder = cls._read(path, option)
            if folder.kind != kind:
                raise PhenolensError(f"{option} {path}: holds a phenolens {folder.kind} output, not a {kind}; "
                                     "choose another folder")
        elif path.is_dir() and any(path.iterdir()):
            files = older(path) if older is not None else None
            if files is None and not adopt:
                raise PhenolensError(f"{option} {path}: folder is not empty and was not written by phenolens; "
                                     "phenolens never writes into or clears such a folder: choose a new or empty one")
            folder = cls(path, kind, files or ())
        if folder is not None and overwrite:
            folder.clear()
        if folder is None:
            folder = cls(path, kind)
        try:
            path.mkdir(parents=True, exist_ok=True)
            folder._save()
        except OSError as err:
            raise PhenolensError(f"{option} {path}: cannot write there ({err.strerror or err})") from None
        return folder

    @classmethod
    def read(cls, path: str | Path, kind: str, option: str = "OUT") -> "OutputFolder":
        """The folder as another process marked it, read only: the processes of a launch that did not
        open it (:mod:`phenolens.run.shards`) never write the marker."""
        folder = cls._read(Path(path), option)
        if folder.kind != kind:
            raise PhenolensError(f"{option} {path}: holds a phenolens {folder.kind} output, not a {kind}")
        return folder

    @classmethod
    def _read(cls, path: Path, option: str) -> "OutputFolder":
        marker = path / MARKER
        try:
            data = json.loads(marker.read_text())
            return cls(path, str(data["kind"]), [str(f) for f in data.get("files", [])])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise PhenolensError(f"{marker}: unreadable phenolens marker ({err}); move the folder's contents "
                                 "elsewhere or choose another folder") from None

    # ------------------------------------------------------------------ inventory
    def relative(self, p: str | Path) -> str:
        p = Path(p)
        if p.is_absolute():
            try:
                p = p.relative_to(self.path.absolute())
            except ValueError:
                p = _resolved(p).relative_to(_resolved(self.path))
        text = p.as_posix()
        if text in ("", ".") or text.startswith("../") or text == MARKER:
            raise ValueError(f"{p}: not a path inside {self.path}")
        return text

    def record(self, *paths: str | Path, save: bool = True) -> None:
        """Add PATHS (files or folders phenolens made) to the inventory; saved atomically."""
        known = set(self.files)
        new = [r for r in (self.relative(p) for p in paths) if r not in known]
        if new:
            self.files.extend(new)
            if save:
                self._save()

    def owns(self, p: str | Path) -> bool:
        """Whether P (or a folder above it) was written by phenolens into this folder."""
        rel = self.relative(p)
        return any(rel == f or rel.startswith(f.rstrip("/") + "/") for f in self.files)

    def clear(self) -> None:
        """Remove every recorded path, then the folders that this leaves empty; nothing else."""
        for rel in sorted(self.files, key=lambda r: r.count("/"), reverse=True):
            target = self.path / rel
            if target.is_symlink() or target.is_file():
                target.unlink()
            elif target.is_dir():
                shutil.rmtree(target)
            parent = target.parent
            while parent != self.path and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
        self.files = []
        self._save()

    def _save(self) -> None:
        write_json_atomic(self.path / MARKER, {"kind": self.kind, "files": self.files})


__all__ = ["MARKER", "OutputFolder", "check_apart"]
