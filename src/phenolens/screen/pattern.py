"""Fields of a screen from a folder of per-channel files and a file-name pattern.

Microscopes write one file per channel per site and put the metadata in the name
(`B04_s1_w1.tif`, `01_POS002_D.TIF`). A pattern such as `{plate}_{well}_s{site}_w{channel}.tif`
says how to read a name: each `{field}` matches a run of characters (`{field:REGEX}` gives its own
expression), `{channel}` must be one of them, and files whose other fields agree are one field of
view. Pattern fields become metadata columns `Metadata_<Field>` (`{well}` -> `Metadata_Well`), as in
a LoadData table, so both sources give the crops' manifest the same columns.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from phenolens.data.records import natural_key
from phenolens.errors import PhenolensError
from phenolens.screen.conditions import ConditionRule
from phenolens.screen.fields import ChannelSource, Field, check_unique_keys, safe_key
from phenolens.screen.platemap import PlateMap

_FIELD = re.compile(r"\{(\w+)(?::([^{}]+))?\}")


def compile_pattern(pattern: str) -> tuple[re.Pattern, list[str]]:
    """The regular expression of PATTERN and its field names, in order; `{channel}` is required."""
    parts, names, pos = [], [], 0
    for m in _FIELD.finditer(pattern):
        parts.append(re.escape(pattern[pos:m.start()]))
        name = m.group(1)
        if name in names:
            raise PhenolensError(f"--pattern {pattern!r}: field {{{name}}} appears twice")
        names.append(name)
        parts.append(f"(?P<{name}>{m.group(2) or '[^/]+?'})")
        pos = m.end()
    parts.append(re.escape(pattern[pos:]))
    if "channel" not in names:
        raise PhenolensError(f"--pattern {pattern!r}: needs a {{channel}} field (the part of the name that "
                             "differs between a site's channel files, e.g. w{channel} in B04_s1_w1.tif)")
    try:
        return re.compile("".join(parts), re.IGNORECASE), names
    except re.error as exc:
        raise PhenolensError(f"--pattern {pattern!r}: not a valid pattern ({exc})") from None


def metadata_name(field: str) -> str:
    """Pattern field -> LoadData-style metadata column: 'well' -> 'Metadata_Well'."""
    return field if field.startswith("Metadata_") else "Metadata_" + field[:1].upper() + field[1:]


def read_pattern(folder: Path, pattern: str, rule: ConditionRule,
                 channel_names: Sequence[tuple[str, str]] | None = None, platemap: PlateMap | None = None) -> list[Field]:
    """Fields of FOLDER (searched recursively when the pattern holds '/').

    CHANNEL_NAMES: (token, name) pairs in channel order (`--channel-names w1=DNA,w2=Actin`); files of
    tokens not listed are left out. Without it every token found is a channel named by its token,
    in natural order (w1 < w2 < w10)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PhenolensError(f"{folder}: not a folder (--pattern reads the files of a folder)")
    regex, names = compile_pattern(pattern)
    id_fields = [n for n in names if n != "channel"]  # the fields that identify a field of view
    files = sorted((p for p in (folder.rglob("*") if "/" in pattern else folder.iterdir())
                    if p.is_file() and not p.name.startswith(".")), key=lambda p: natural_key(str(p)))
    groups: dict[tuple[str, ...], dict[str, Path]] = {}
    for path in files:
        m = regex.fullmatch(path.relative_to(folder).as_posix())
        if m is None:
            continue
        ident = tuple(m.group(n) for n in id_fields)
        token = m.group("channel")
        seen = groups.setdefault(ident, {})
        if token in seen:
            raise PhenolensError(f"--pattern {pattern!r}: {seen[token].name} and {path.name} are the same "
                                 f"field and channel {token!r}; add the part of the name that tells them apart")
        seen[token] = path
    if not groups:
        example = files[0].relative_to(folder).as_posix() if files else "no files at all"
        raise PhenolensError(f"--pattern {pattern!r}: matches none of the {len(files)} files in {folder} "
                             f"(e.g. {example}); fields are written {{name}}, e.g. {{well}}_s{{site}}_w{{channel}}.tif")
    tokens = _channel_tokens(groups, channel_names, pattern)
    meta_names = [metadata_name(n) for n in id_fields]
    rule = rule.resolve(meta_names + id_fields + (platemap.columns if platemap else []),
                        f"--pattern {pattern!r}")
    fields = []
    for ident, found in groups.items():
        missing = [t for t, _ in tokens if t not in found]
        example = next(iter(found.values()))
        if missing:
            raise PhenolensError(f"{example.parent}: field {'_'.join(ident)} has no file for channel {missing[0]!r} "
                                 f"(found: {', '.join(sorted(found, key=natural_key))})")
        meta = dict(zip(meta_names, ident))
        if platemap is not None:
            meta = {**platemap.lookup(meta, str(example)), **meta}
        lookup = {**meta, **dict(zip(id_fields, ident))}
        fields.append(Field(key=safe_key(*ident), condition=rule.condition(lookup, str(example)),
                            channels={name: ChannelSource(found[t]) for t, name in tokens}, meta=meta,
                            plate=meta.get("Metadata_Plate", "")))
    check_unique_keys(fields, f"--pattern {pattern!r}")
    return fields


def _channel_tokens(groups: dict[tuple[str, ...], dict[str, Path]], channel_names: Sequence[tuple[str, str]] | None,
                    pattern: str) -> list[tuple[str, str]]:
    """(token, channel name) pairs in channel order, checked against the tokens the files have."""
    found = sorted({t for g in groups.values() for t in g}, key=natural_key)
    if not channel_names:
        return [(t, t) for t in found]
    lower = {t.lower(): t for t in found}
    pairs = []
    for token, name in channel_names:
        if token.lower() not in lower:
            raise PhenolensError(f"--channel-names: no file matching --pattern {pattern!r} has channel {token!r} "
                                 f"(channels found: {', '.join(found)})")
        pairs.append((lower[token.lower()], name))
    return pairs


__all__ = ["compile_pattern", "metadata_name", "read_pattern"]
