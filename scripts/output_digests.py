#!/usr/bin/env python
"""Run the quick start and every example script, print the sha1 of every shard they write.

Used to show that a refactor leaves outputs byte-identical:

    python scripts/output_digests.py > before.txt     # on the old tree
    python scripts/output_digests.py > after.txt      # on the new tree
    python scripts/output_digests.py --compare before.txt

Shards are the ``.tar`` files (samples written with fixed mtime and seeds). Model files and JSON
reports are listed too (``--all``) but they can legitimately carry versions or timings.

Float results depend on the numeric libraries, so the record starts with a ``# versions:`` line and a
comparison against a record made with other versions says so first: re-record the baseline from the
old commit in that environment before reading any difference as a change of behaviour.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _content(p: Path) -> bytes:
    """A file's bytes; a stats file's input fingerprint (it hashes the inputs' mtimes) is left out."""
    data = p.read_bytes()
    if p.name.endswith(".stats.json"):
        import json

        stats = json.loads(data)
        if isinstance(stats, dict) and "inputs" in stats:
            stats.pop("inputs")
            return json.dumps(stats, sort_keys=True).encode()
    return data


def digests(out: Path, every: bool) -> dict[str, str]:
    found = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and (every or p.suffix == ".tar"):
            found[str(p.relative_to(out))] = hashlib.sha1(_content(p)).hexdigest()
    return found


_LIBRARIES = ("torch", "numpy", "PIL", "scipy", "sklearn", "faiss", "timm", "open_clip", "pycocotools")


def versions() -> str:
    """One line naming the versions of the libraries whose arithmetic reaches the outputs."""
    import importlib
    import importlib.metadata as md

    found = []
    for name in _LIBRARIES:
        try:
            found.append(f"{name}={importlib.import_module(name).__version__}")
        except (ImportError, AttributeError):
            dist = {"PIL": "pillow", "sklearn": "scikit-learn", "faiss": "faiss-cpu", "open_clip": "open-clip-torch"}
            try:
                found.append(f"{name}={md.version(dist.get(name, name))}")
            except md.PackageNotFoundError:
                found.append(f"{name}=absent")
    return "# versions: " + " ".join(found)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compare", help="a file this script wrote before; exit 1 when any shard differs")
    ap.add_argument("--all", action="store_true", help="list every output file, not only shards")
    ap.add_argument("--only", nargs="*", help="example script names to run (default: all)")
    args = ap.parse_args()
    scripts = sorted(p.name for p in (ROOT / "examples").glob("*.sh"))
    if args.only:
        scripts = [s for s in scripts if s in args.only or s.removesuffix(".sh") in args.only]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    lines = []
    # A fixed folder, not a random temporary one: run folders and checkpoint paths are recorded in outputs.
    # Concurrent runs (several checkouts) take turns on it.
    tmp = Path(tempfile.gettempdir()) / "partkit-output-digests"
    lock = open(str(tmp) + ".lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for script in scripts:
            out = Path(tmp) / script.removesuffix(".sh")
            res = subprocess.run(["bash", str(ROOT / "examples" / script), str(out)], cwd=tmp, env=env,
                                 capture_output=True, text=True)
            if res.returncode != 0:
                print(f"{script} failed:\n{res.stderr[-3000:]}", file=sys.stderr)
                return 2
            for name, sha in digests(out, args.all).items():
                lines.append(f"{sha}  {script}:{name}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not args.compare:
        print("\n".join([versions(), *lines]))
        return 0
    recorded = Path(args.compare).read_text().splitlines()
    header = next((l for l in recorded if l.startswith("# versions:")), None)
    if header != versions():
        print(f"warning: the record was made with other library versions\n  record: {header}\n  here:   {versions()}\n"
              "  float outputs may differ for that reason alone; re-record the baseline here", file=sys.stderr)
    want = dict(reversed(l.split("  ", 1)) for l in recorded if l.strip() and not l.startswith("#"))
    got = dict(reversed(l.split("  ", 1)) for l in lines)
    if args.only:
        want = {k: v for k, v in want.items() if k.split(":", 1)[0] in scripts}
    bad = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
    for k in bad:
        print(f"differs: {k}  before {want.get(k, '-')}  after {got.get(k, '-')}", file=sys.stderr)
    print(f"{len(want) - len(bad)} of {len(want)} recorded outputs identical", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
