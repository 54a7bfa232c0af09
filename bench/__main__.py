"""``python -m bench``: run the benchmark suite and print its tables.

Usage (as root, with ``./scripts/services.sh`` up)::

    .venv/bin/python -m bench                 # the full suite (8-15 minutes as root)
    .venv/bin/python -m bench --quick         # smaller images, a few minutes
    .venv/bin/python -m bench --only writer,events --markdown /tmp/tables.md

Benchmarks: writer, prewarm, events, libvirt, memory, api, clone, scale, e2e. Each prints its
tables as soon as it finishes; ``--markdown`` also writes the machine description and
every table to a file (what bench/RESULTS.md is made from).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

from bench.common import Options, Table, machine_description

BENCHMARKS = {
    "writer": "bench.writer",
    "prewarm": "bench.prewarm",
    "events": "bench.events",
    "memory": "bench.memory",
    "libvirt": "bench.domains",
    "api": "bench.api",
    "clone": "bench.clone",
    "scale": "bench.scale",
    "e2e": "bench.reprovision_e2e",
}
"""Name -> module with ``bench(options) -> list[Table]``; run in this order."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes and counts")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per variant (>= 5)")
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    parser.add_argument("--scratch", type=Path, default=Path("/var/tmp/lvw-bench"),
                        help="directory for images and volumes (a real disk, not tmpfs)")
    parser.add_argument("--writer-mib", type=int, default=0,
                        help="virtual MiB of the writer's images (default 512; quick 256)")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    args.scratch.mkdir(parents=True, exist_ok=True)
    options = Options(quick=args.quick, runs=max(args.runs, 5), scratch=args.scratch,
                      writer_mib=args.writer_mib)

    # The in-process daemon logs as in production (JSON, info) but to a file, not the tables.
    from watcher.runtime.observability import configure_logging

    log_file = open(args.scratch / "watcher.log", "a")  # noqa: SIM115 - open for the run
    configure_logging(json=True, level="info", stream=log_file)

    machine = machine_description(args.scratch)
    print("\n".join(machine), flush=True)
    sections: list[str] = ["## Machine", "", *[f"- {line}" for line in machine], ""]
    failed = 0
    suite_started = time.monotonic()
    for name in chosen:
        print(f"\n== {name} ==", flush=True)
        started = time.monotonic()
        load_before = os.getloadavg()[0]
        try:
            module = importlib.import_module(BENCHMARKS[name])
            tables: list[Table] = module.bench(options)
        except Exception:
            failed += 1
            trace = traceback.format_exc()
            print(trace, file=sys.stderr, flush=True)
            sections += [f"### {name}: failed", "", "```", trace.strip(), "```", ""]
            continue
        elapsed = time.monotonic() - started
        for table in tables:
            table.notes.append(
                f"benchmark wall time: {elapsed:.0f} s; 1-minute load average "
                f"{load_before:.1f} at its start, {os.getloadavg()[0]:.1f} at its end "
                f"(other work shares this machine)")
            text = table.markdown()
            print("\n" + text, flush=True)
            sections.append(text)
    total = time.monotonic() - suite_started
    mode = "quick" if options.quick else "full"
    footer = f"suite ({mode}, {options.runs} runs per variant) took {total / 60:.1f} min"
    print(footer)
    sections.append(f"_{footer}_\n")
    if args.markdown:
        args.markdown.write_text("\n".join(sections))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
