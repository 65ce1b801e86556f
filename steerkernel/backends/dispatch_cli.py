"""Command line of the dispatch table (:mod:`.dispatch`): show, check, refresh.

    python -m steerkernel.backends.dispatch_cli show [--json] [--table PATH]
    python -m steerkernel.backends.dispatch_cli check PATH
    python -m steerkernel.backends.dispatch_cli refresh RESULT.json [--out PATH] [--base PATH]
        [--dry-run]

``refresh`` reads a result of ``python -m benchmarks --device cuda`` and rewrites the table
(default: the shipped ``steerkernel/backends/dispatch_table.py``) with measured rows ahead of
the predicted ones.  Problems (a malformed table or result) are one line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys

from .dispatch import (MODULE_PATH, TableError, active, format_rows, load, read_table_file,
                       refresh_table, render_module, write_table)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m steerkernel.backends.dispatch_cli",
                                description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("show", help="print the active table")
    s.add_argument("--json", action="store_true")
    s.add_argument("--table", default=None, help="a table file instead of the active one")
    r = sub.add_parser("refresh", help="rewrite the table from a CUDA benchmark result")
    r.add_argument("result", help="JSON written by `python -m benchmarks --device cuda`")
    r.add_argument("--out", default=MODULE_PATH,
                   help=f"where to write (.json or .py; default {MODULE_PATH})")
    r.add_argument("--base", default=None,
                   help="table whose unmeasured rows are kept (default: the shipped one)")
    r.add_argument("--dry-run", action="store_true", help="print the new table, write nothing")
    c = sub.add_parser("check", help="validate a table file")
    c.add_argument("path")
    args = p.parse_args(argv)
    try:
        if args.cmd == "show":
            t = load(args.table) if args.table else active()
            if args.json:
                print(json.dumps(t.describe(), indent=1))
            else:
                print(f"dispatch table: {t.source} ({t.raw.get('source')})")
                print("\n".join("  " + line for line in format_rows(t.raw["rows"])))
            return 0
        if args.cmd == "check":
            t = load(args.path)
            print(f"{args.path}: ok ({len(t.rows)} rows)")
            return 0
        base = read_table_file(args.base) if args.base else None
        table = refresh_table(args.result, base)
        if args.dry_run:
            print(render_module(table) if not args.out.endswith(".json")
                  else json.dumps(table, indent=1))
            return 0
        write_table(table, args.out)
        print(f"wrote {args.out}:")
        print("\n".join("  " + line for line in format_rows(table["rows"])))
        return 0
    except TableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
