"""Run every benchmark (one after another, each spawning its own worker processes) and write
``benchmarks/results/latest.json`` and ``latest.md`` (``--quick``: ``latest-quick.*``, gitignored,
so a smoke run never overwrites real figures).

    python -m benchmarks [--quick] [--only encoder,http] [--output-dir benchmarks/results]
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.common import RESULTS_DIR, machine, machine_markdown, run_benchmark, to_markdown

# Cheapest-to-interpret first; gpu last (it only skips on a machine without CUDA).
BENCHMARKS = ("encoder", "quantize", "http", "ceiling", "labels", "probe", "training", "engines", "precision", "photos",
              "gpu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer iterations, smaller sizes")
    parser.add_argument("--only", help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")

    started = time.perf_counter()
    results = {}
    for name in names:
        print(f"[benchmarks] {name} ...", file=sys.stderr, flush=True)
        module = importlib.import_module(f"benchmarks.{name}")
        results[name] = run_benchmark(name, module.run, args.quick)
        status = results[name].get("error") or results[name].get("skipped") or "ok"
        print(f"[benchmarks] {name}: {status} ({results[name]['seconds']} s)", file=sys.stderr, flush=True)
    combined = {"quick": args.quick, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "seconds": round(time.perf_counter() - started, 1), "machine": machine(), "benchmarks": results}

    stem = "latest-quick" if args.quick else "latest"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(combined, indent=2)
    (args.output_dir / f"{stem}.json").write_text(text + "\n")
    markdown = [f"# Benchmarks ({'quick' if args.quick else 'full'} run, {combined['finished']}, {combined['seconds']} s)",
                "Machine:\n\n" + machine_markdown(combined["machine"]), *(to_markdown(r) for r in results.values())]
    (args.output_dir / f"{stem}.md").write_text("\n\n".join(markdown) + "\n")
    print(text)
    print(f"[benchmarks] wrote {args.output_dir / stem}.json and .md", file=sys.stderr)
    return 1 if any(r.get("error") for r in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
