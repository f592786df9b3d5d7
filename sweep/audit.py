"""The replayed runs whose request stream is gone or changed:

    python -m sweep.audit [--experiment NAME] [--tracking-uri URI]

A run replayed from a request stream (sweep.worker) is tagged with the stream's key
(`replayed_from`) and the sha256 of the bytes it replayed (`stream_sha256`); the stream itself is
the requests.npz of the run that recorded it (tag `stream_key`). A replayed run can be checked or
replayed again only while that file is there, byte for byte. Listed here: runs whose stream has no
recording run any more or lost its artifact (gone), and runs whose stored stream no longer
hashes to what they replayed (changed). Exit status 0 when there is none, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from sweep.errors import SweepError
from sweep.progress import aligned
from sweep.schema import MlflowConf
from sweep.tracking import STORE_ERRORS, STREAM_ARTIFACT, Tracker, sha256_of, store_failure


def problems(tracker: Tracker) -> list[tuple[str, str, str, str]]:
    """(run id, run name, stream key, what is wrong) of each replayed run that cannot stand."""
    replayed = [
        run
        for run in tracker.search("tags.role = 'run'")
        if {"replayed_from", "stream_sha256"} <= run.data.tags.keys()
    ]
    # Stream key -> [(recording run id, sha256 of its stream as stored now, "" when gone)].
    stored: dict[str, list[tuple[str, str]]] = {}
    with tempfile.TemporaryDirectory(prefix="slicemoe-audit-") as tmp:
        for key in sorted({run.data.tags["replayed_from"] for run in replayed}):
            stored[key] = [
                (run.info.run_id, sha256_of(path) if path else "")
                for run, path in tracker.stored_streams(key, Path(tmp))
            ]
    found = []
    for run in replayed:
        key, want = run.data.tags["replayed_from"], run.data.tags["stream_sha256"]
        streams = stored[key]
        if any(digest == want for _, digest in streams):
            continue
        if not streams:
            wrong = "gone: no run holds this stream any more"
        elif not any(digest for _, digest in streams):
            wrong = f"gone: the {STREAM_ARTIFACT} of run {streams[0][0]} is missing"
        else:
            holder, digest = next(s for s in streams if s[1])
            wrong = (
                f"changed: the {STREAM_ARTIFACT} of run {holder} hashes to {digest[:12]}, "
                f"the run replayed {want[:12]}"
            )
        found.append((run.info.run_id, run.info.run_name, key, wrong))
    return found


def main(argv: list[str] | None = None) -> int:
    defaults = MlflowConf()
    parser = argparse.ArgumentParser(
        prog="python -m sweep.audit", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--experiment", default=defaults.experiment)
    parser.add_argument("--tracking-uri", default=defaults.tracking_uri)
    args = parser.parse_args(argv)
    try:
        tracker = Tracker.open(args.tracking_uri, args.experiment, create=False)
        found = problems(tracker)
    except SweepError as err:
        print(err, file=sys.stderr)
        return 1
    except STORE_ERRORS as err:
        uri = args.tracking_uri
        print(f"mlflow.tracking_uri={uri}: {store_failure(uri, err)}", file=sys.stderr)
        return 1
    where = f"experiment {args.experiment!r} in {tracker.uri}"
    if not found:
        print(f"{where}: every replayed run's request stream is stored unchanged")
        return 0
    print(f"{where}: {len(found)} replayed runs whose request stream is gone or changed")
    print(aligned([("run id", "run", "stream key", "what is wrong"), *found]))
    return 1


if __name__ == "__main__":
    sys.exit(main())
