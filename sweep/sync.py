"""The spool: results the tracking store could not take, kept on the driver's disk until pushed.

When writing a run to MLflow fails (a tracking server away for longer than the client's retries,
a locked or full database), its record (sweep.tracking.RunRecord) is written here instead and the
sweep keeps computing. The spool is pushed again every few seconds while the sweep runs, at its
end, by a relaunch of the same command before it decides what to compute (so a spooled run is
never computed again), or by hand:

    python -m sweep.sync [SPOOL] [--tracking-uri URI]

Each entry is a folder `<spool>/<id>/` holding record.json (the record, its tracking URI and
experiment, the last error) and the record's artifacts under artifacts/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from sweep.errors import SweepError
from sweep.tracking import STORE_ERRORS, Held, RunRecord, Tracker

DEFAULT = "mlflow-spool"


@dataclass
class Entry:
    folder: Path
    uri: str
    experiment: str
    record: RunRecord
    error: str = ""


class Spool:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder).absolute()

    def put(self, record: RunRecord, uri: str, experiment: str, error: str = "") -> Entry:
        """Keep a record whose artifacts are in memory (RunRecord.detached) or on this disk."""
        # A parent run's record is a snapshot: the newest replaces the older.
        name = record.run_id if record.run_id else f"new-{record.key}-{uuid.uuid4().hex[:8]}"
        entry = Entry(self.folder / name, uri, experiment, record, error)
        try:
            (entry.folder / "artifacts").mkdir(parents=True, exist_ok=True)
            for artifact, item in list(record.artifacts.items()):
                path = entry.folder / "artifacts" / artifact
                if isinstance(item, bytes):
                    path.write_bytes(item)
                elif Path(item) != path:
                    shutil.copyfile(item, path)
                record.artifacts[artifact] = str(path)
            self.save(entry)
        except OSError as err:
            raise SweepError(
                f"cannot write the spool {entry.folder}: {err.strerror or err}; the result of run "
                f"[{record.name}] is lost (free space, or set mlflow.spool to a writable folder)"
            ) from None
        return entry

    def save(self, entry: Entry) -> None:
        """record.json written whole or not at all (a crash never leaves half a record)."""
        data = dataclasses.asdict(entry.record)
        data["artifacts"] = sorted(data["artifacts"])
        blob = {"uri": entry.uri, "experiment": entry.experiment, "error": entry.error}
        tmp = entry.folder / "record.json.tmp"
        tmp.write_text(json.dumps({**blob, "record": data}))
        os.replace(tmp, entry.folder / "record.json")

    def entries(self, uri: str | None = None, experiment: str | None = None) -> list[Entry]:
        """Spooled records, those of `uri` and `experiment` only if given; runs before parents."""
        found = []
        for path in sorted(self.folder.glob("*/record.json")):
            try:
                blob = json.loads(path.read_text())
                data = blob["record"]
                names = data.pop("artifacts")
                data["metrics"] = [tuple(m) for m in data["metrics"]]
                record = RunRecord(**data)
                uri_, experiment_, error = blob["uri"], blob["experiment"], blob["error"]
            except OSError:
                continue  # unreadable now: left for the user, never deleted
            except (ValueError, KeyError, TypeError) as err:
                self.quarantine(path.parent, err)
                continue
            record.artifacts = {n: str(path.parent / "artifacts" / n) for n in names}
            entry = Entry(path.parent, uri_, experiment_, record, error)
            if uri in (None, entry.uri) and experiment in (None, entry.experiment):
                found.append(entry)
        return sorted(found, key=lambda e: e.record.key == "")

    def quarantine(self, folder: Path, err: Exception) -> None:
        """A malformed record moves to `<spool>-malformed/` beside the spool, said once; the
        others are pushed as usual."""
        dest = self.folder.parent / f"{self.folder.name}-malformed" / folder.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(folder), dest)
        print(
            f"[sweep] spool record {folder}/record.json is malformed ({type(err).__name__}: "
            f"{err}); moved to {dest}, the rest is pushed",
            file=sys.stderr,
        )

    def push(self, entries: list[Entry], tracker: Tracker) -> list[Entry]:
        """Push entries to `tracker`, removing each one the store took; returns those left. Stops
        at the first failure that says the store is away (the rest would fail the same way)."""
        left = []
        for i, entry in enumerate(entries):
            try:
                tracker.push(entry.record)
            except Held as err:  # its key is being computed elsewhere: tried again later
                entry.error = str(err)
                self.save(entry)
                left.append(entry)
                continue
            except STORE_ERRORS as err:
                entry.error = tracker.failure(err)
                self.save(entry)  # keeps a run id the push created, so it is never made twice
                return left + entries[i:]
            shutil.rmtree(entry.folder)
        return left


def describe(entries: list[Entry], limit: int = 20) -> str:
    lines = [
        f"  [{e.record.name}]" + (f" (run key {e.record.key})" if e.record.key else "")
        for e in entries[:limit]
    ]
    if len(entries) > limit:
        lines.append(f"  ... and {len(entries) - limit} more")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sweep.sync", description=__doc__.split("\n")[0]
    )
    parser.add_argument("spool", nargs="?", help=f"the spool folder ({DEFAULT})")
    parser.add_argument(
        "--tracking-uri", help="push here instead of the tracking URI each run was meant for"
    )
    args = parser.parse_args(argv)
    # No default spool: nothing was ever spooled here. A folder named that is not there: a typo.
    if args.spool is not None and not Path(args.spool).is_dir():
        print(f"{args.spool}: no such spool folder", file=sys.stderr)
        return 1
    spool = Spool(args.spool or DEFAULT)
    pending = spool.entries()
    if not pending:
        print(f"nothing to push in {spool.folder}")
        return 0
    left: list[Entry] = []
    targets = sorted({(args.tracking_uri or e.uri, e.experiment) for e in pending})
    for uri, experiment in targets:
        group = [
            e for e in pending if (args.tracking_uri or e.uri, e.experiment) == (uri, experiment)
        ]
        try:
            tracker = Tracker.open(uri, experiment)
        except SweepError as err:
            print(f"{uri}: {err}", file=sys.stderr)
            left += group
            continue
        rest = spool.push(group, tracker)
        print(f"{uri} (experiment {experiment}): pushed {len(group) - len(rest)} of {len(group)}")
        left += rest
    if left:
        print(
            f"{len(left)} left in {spool.folder}; the last error: {left[0].error}\n"
            + describe(left),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
