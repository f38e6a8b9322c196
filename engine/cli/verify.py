"""`entk verify FILE`: check every checksum of a run, kernel, chaos or Jacobian file."""

from __future__ import annotations

import argparse

from .options import add_json, check_outputs, write_json


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("verify", help="check every checksum of an entk file (run, kernel, chaos, Jacobian)",
                       description="Check an entk file against its checksums (docs/FORMAT.md, 'Checksums'): the "
                                   "header, the HDF5 metadata, every row written so far and every completion flag. "
                                   "Exit 0: intact; 1: damaged (the damaged part is named) or written without "
                                   "checksums; 2: not an entk file.")
    p.add_argument("file", metavar="FILE", help="an entk run, kernel, tiled kernel, chaos or Jacobian file")
    add_json(p, "also write the result as JSON")
    p.set_defaults(handler=run)
    return p


def run(args) -> int:
    from ..store.verify import verify_file

    check_outputs(files=[("--json", args.json)], inputs=[("FILE", args.file)])
    res = verify_file(args.file)
    if res.ok:
        print(f"{res.path}: ok: {res.format} version {res.version}, {res.datasets} datasets, {res.rows} rows "
              f"checked, {res.units[0]}/{res.units[1]} units complete")
    else:
        print(f"{res.path}: {res.problem}")
    if args.json:
        write_json(args.json, "verify", {"file": str(res.path), "ok": res.ok, "format": res.format,
                                         "version": res.version, "rows": res.rows, "units": list(res.units),
                                         "problem": res.problem})
    return 0 if res.ok else 1
