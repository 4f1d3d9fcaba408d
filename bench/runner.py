"""Runs the benchmarks named on the command line, prints each result, writes JSON + Markdown."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench import Options
from bench.loadwatch import LoadWatch
from bench.report import Result, markdown_table, stamp, to_markdown, write, write_summary
from hymirec.settings import Settings

NAMES = ("ingest", "freshness", "topk", "codebook", "train", "memory", "scale")


def _module(name: str):
    # Imported on demand: `bench codebook` does not need Kafka clients, `bench ingest` not torch.
    import importlib

    return importlib.import_module(f"bench.{name}")


def run_benchmarks(names: list[str], settings: Settings, opts: Options, out_dir: Path) -> list[Result]:
    results = []
    for name in names:
        print(f"\n=== bench {name}{' (quick)' if opts.quick else ''} ===", flush=True)
        started = time.time()
        with LoadWatch() as watch:
            result = _module(name).run(settings, opts)
        result = stamp(result, settings, started, watch.record)
        if result.load["busy"]:
            print(f"WARNING: the machine was busy: {result.load['warning']}", flush=True)
        print(to_markdown(result))
        json_path, md_path = write(result, out_dir)
        print(f"wrote {json_path} and {md_path}", flush=True)
        results.append(result)
    if len(results) > 1:
        json_path, md_path = write_summary(results, out_dir)
        rows = [{"benchmark": r.name, **t} for r in results for t in r.targets]
        print("\n=== DESIGN §7 targets ===\n" + markdown_table(rows, ["benchmark", "what", "measured", "spread", "verdict"]))
        print(f"wrote {json_path} and {md_path}")
    return results


def bench_command(args: argparse.Namespace, settings: Settings) -> int:
    names = list(NAMES) if args.which == "all" else [args.which]
    opts = Options(quick=args.quick, full=args.full, sizes=tuple(args.sizes) if args.sizes else None,
                   repeat=args.repeat)
    run_benchmarks(names, settings, opts, args.out)
    return 0
