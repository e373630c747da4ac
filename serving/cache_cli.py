"""``capt engines``: what the engine cache (``CAPT_ENGINE_CACHE``, serving/engine.py) holds, and
clearing it. The cache keeps derived graphs (ViT-B-32's int8 graph is 100 MB), the choices a start
measured (recalled by later starts on this machine), and the self-test's class embeddings; what no
start used for 30 days is swept by the server itself."""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _age(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= length:
            return f"{seconds / length:.0f} {unit}"
    return f"{seconds:.0f} s"


def _engines(args) -> None:
    from serving.engine import UNUSED_S, cache_dir, cache_entries, clear_cache
    if args.older_than is not None and not args.clear:
        raise ValueError("--older-than goes with --clear")
    if args.older_than is not None and args.older_than < 0:
        raise ValueError(f"--older-than must be >= 0 days, got {args.older_than}")
    folder = cache_dir()
    if args.clear:
        deleted = clear_cache(folder, (args.older_than or 0.0) * 86400)
        freed = sum(entry["bytes"] for entry in deleted)
        if args.json:
            print(json.dumps({"folder": str(folder), "deleted": deleted, "bytes_freed": freed}, indent=2))
        else:
            print(f"{folder}: deleted {len(deleted)} entr{'y' if len(deleted) == 1 else 'ies'}, {_size(freed)} freed")
        return
    entries = cache_entries(folder)
    if args.json:
        print(json.dumps({"folder": str(folder), "entries": entries,
                          "bytes": sum(entry["bytes"] for entry in entries)}, indent=2))
        return
    now = time.time()
    print(f"engine cache: {folder} (CAPT_ENGINE_CACHE), {len(entries)} entries, "
          f"{_size(sum(entry['bytes'] for entry in entries))}")
    print(f"what no start used for {UNUSED_S / 86400:.0f} days is swept at a server's start; "
          "`capt engines --clear` deletes it all now")
    for entry in entries:
        line = f"  {entry['kind']:<16} {_size(entry['bytes']):>9}  used {_age(now - entry['last_used'])} ago  {entry['name']}"
        if entry["kind"] == "kept choice":
            if entry.get("error"):
                line += f"  (unreadable: {entry['error']})"
            else:
                measured = entry.get("measured_at") or "?"
                state = "recallable here" if entry["current"] else "another code version or machine: never recalled"
                line += f"  {entry['choice']}: {entry['chosen']} (measured {measured}; {state})"
        print(line)


def register(subparsers) -> tuple[type[BaseException], ...]:
    """``capt engines`` (the ``capt.commands`` entry point, pyproject.toml)."""
    p = subparsers.add_parser("engines", help="the served engine's cache: derived graphs, measured choices "
                                              "(recalled by later starts), their sizes and last use; --clear")
    p.add_argument("--json", action="store_true", help="as JSON")
    p.add_argument("--clear", action="store_true", help="delete the cache's entries (a later start measures again)")
    p.add_argument("--older-than", type=float, metavar="DAYS",
                   help="with --clear: only what no start used for this many days")
    p.set_defaults(run=_engines)
    return ()
