"""One run on several processes: `accelerate launch` (or torchrun) splits the work, journals keep it.

Why: a screen holds 10^5-10^6 images and translation is bound by the UNet's forward, so the lever
left is more devices. The field's launcher is Accelerate: `accelerate launch --num_processes N -m
phenolens translate ...` starts N copies of the command (one per GPU, or CPU processes talking over
gloo; under Slurm or torchrun the same), each seeing its rank in the environment. phenolens needs no
launcher of its own, only three things, all here:

- **who does what** (:class:`Shard`): the work is cut into chunks of one batch in the input's order
  and chunk k goes to process k mod N. A process's batches are then exactly the batches of a
  one-process run, so its outputs are the same numbers.
- **a journal per process** (:class:`Journal`): each process appends the rows of every finished batch
  to its own CSV with one `write` call after the batch's files are written. Nothing is ever rewritten
  during a run, so the cost per batch stays flat however many rows came before, and a process killed
  mid-write leaves at most a cut last line, which the reader drops (its image is redone). No two
  processes write one file.
- **one merge** (:func:`merge_journals`): the first process streams the kept rows and every journal
  into the final table (atomically), row by row, so memory stays flat; a re-run merges what a killed
  run left before deciding what is still to do.
"""

from __future__ import annotations

import csv
import filecmp
import io
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Iterable, Iterator, Sequence, TypeVar

from phenolens.errors import PhenolensError
from phenolens.folders import OutputFolder
from phenolens.launch import accelerate_on_cpu, launched_world

Item = TypeVar("Item")

JOURNALS = "_journal"  # the folder of the journals, inside a run folder
# how long a process waits for the others at a barrier (the first process plans the run alone; at the
# end the fastest waits for the slowest); torch's default of 30 min is too short for a screen's shard
BARRIER_TIMEOUT = timedelta(hours=24)


@dataclass
class Shard:
    """This process's place in a launch: rank RANK of WORLD (0 of 1 when not launched)."""

    rank: int = 0
    world: int = 1
    device: str | None = None  # the device the launcher gave this process (cuda:<local rank>, cpu)
    _state: object = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[Item], chunk: int) -> list[Item]:
        """This process's items: chunks of CHUNK consecutive items, chunk k to process k mod WORLD."""
        chunk = max(1, chunk)
        return [x for k in range(self.rank, -(-len(items) // chunk), self.world) for x in items[k * chunk:(k + 1) * chunk]]

    def barrier(self) -> None:
        """Wait until every process of the launch gets here (nothing to wait for alone)."""
        if self.world > 1:
            self._state.wait_for_everyone()

    def journal_name(self, stem: str = "rows") -> str:
        return f"{JOURNALS}/{stem}-{self.rank}.csv"


def current_shard(device: str | None = None) -> Shard:
    """This process's shard. Under a launcher, Accelerate's PartialState joins the process group
    (NCCL on GPUs, gloo on CPUs) and names this process's device; alone, nothing is initialised."""
    if launched_world() == 1:
        return Shard()
    from accelerate import PartialState

    state = PartialState(cpu=accelerate_on_cpu(device), timeout=BARRIER_TIMEOUT)
    if state.num_processes != launched_world():
        raise PhenolensError(f"launched as {launched_world()} processes but accelerate joined {state.num_processes} "
                             f"(device {device or 'default'}); pass --device cpu or the launch's accelerator")
    where = "cpu" if state.device.type == "cpu" else str(state.device)
    return Shard(state.process_index, state.num_processes, where, state)


def journal_names(world: int, stem: str = "rows") -> list[str]:
    return [Shard(rank=r, world=world).journal_name(stem) for r in range(world)]


class Journal:
    """A CSV that one process appends finished rows to, one `write` per call (see the module doc)."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.path = Path(path)
        self.columns = list(columns)

    def append(self, rows: Sequence[dict]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size == 0:
                writer.writeheader()
            writer.writerows(rows)
            data = buf.getvalue().encode()
            while data:  # a regular file takes it in one call; a short write only on a full disk
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)


def trim_cut_row(path: Path, block: int = 1 << 16) -> None:
    """Truncate PATH after its last newline: the cut row a killed append left (which readers drop anyway)
    goes, so that the next append starts on a line of its own instead of being glued to it."""
    with open(path, "rb+") as fh:
        end = fh.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            start = max(0, pos - block)
            fh.seek(start)
            data = fh.read(pos - start)
            nl = data.rfind(b"\n")
            if nl >= 0:
                pos = start + nl + 1
                break
            pos = start
        if pos < end:
            fh.truncate(pos)


def read_journal(path: Path) -> Iterator[dict]:
    """The complete rows of a journal, one at a time: a last line cut short by a kill is dropped,
    as is a row with fields missing."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return
    end = text.rfind("\n")
    reader = csv.DictReader(io.StringIO(text[:end + 1], newline=""))
    for row in reader:
        if None not in row and all(v is not None for v in row.values()):
            yield row


def merge_journals(table: Path, columns: Sequence[str], kept: Iterable[dict], journals: Sequence[Path], *,
                   create_empty: bool = True) -> int:
    """Write TABLE (atomically, streamed through a temporary file) as the rows of KEPT followed by
    those of every journal, in COLUMNS; returns the number of rows. Unchanged content leaves TABLE
    untouched (its mtime too), so a re-run with nothing to do changes nothing on disk; with no rows
    and not CREATE_EMPTY, a TABLE that does not exist is not made."""
    tmp = table.with_name(f".{table.name}.tmp-{os.getpid()}")
    n = 0
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            for rows in (kept, *(read_journal(p) for p in journals)):
                for row in rows:
                    writer.writerow(row)
                    n += 1
        if table.is_file() and filecmp.cmp(tmp, table, shallow=False) or not (n or create_empty or table.exists()):
            tmp.unlink()
        else:
            os.replace(tmp, table)
    finally:
        if tmp.exists():
            tmp.unlink()
    return n


def remove_journals(journals: Iterable[Path], folder: OutputFolder) -> None:
    """Remove merged JOURNALS that phenolens wrote into FOLDER (its marker lists them), then their
    folder when it is empty. Paths are taken as they are on disk, whether OUT was given relative or not."""
    for p in journals:
        if p.is_file() and folder.owns(Path(p).absolute()):
            p.unlink()
            if not any(p.parent.iterdir()):
                p.parent.rmdir()


def existing_journals(folder: Path, stem: str = "rows") -> list[Path]:
    """The journals of STEM in FOLDER, by rank (a killed launch may have had another number of processes)."""
    def rank(p: Path) -> int:
        try:
            return int(p.stem.rsplit("-", 1)[1])
        except (IndexError, ValueError):
            return 1 << 30
    return sorted((folder / JOURNALS).glob(f"{stem}-*.csv"), key=rank)
