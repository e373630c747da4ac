"""``capt engines``: what the engine cache (``CAPT_ENGINE_CACHE``, serving/engine.py) holds, and
clearing it. The cache keeps derived graphs (ViT-B-32's int8 graph is 100 MB), the choices a start
measured (recalled by later starts on this machine), and the self-test's class embeddings; what no
start used for 30 days is swept by the server itself."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path


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


def _contention(entry: dict) -> str:
    """What else used the CPUs while a kept choice was measured: a contended one is only kept with
    CAPT_ENGINE_KEEP_CONTENDED=1, and its timings may not hold on an idle machine."""
    contention = entry.get("cpu_contention")
    if not contention:
        return "CPU use of others not recorded"
    if contention.get("others_share") is None:
        return "CPU use of others unknown (no /proc/stat where it was measured)"
    share = f"others used {contention['others_share']:.0%} of the CPUs"
    if contention.get("throttled_share"):
        share += f", throttled {contention['throttled_share']:.0%}"
    if contention.get("contended"):
        share += " - CONTENDED, kept by CAPT_ENGINE_KEEP_CONTENDED; CAPT_ENGINE_RETUNE=1 on an idle machine measures again"
    return share


def _cache_folder() -> tuple[Path, str]:
    """The folder a server's start would use, without making or probing it as a start does, and where
    that comes from."""
    from serving.engine import FALLBACK_CACHE, configured_cache_dir
    folder = configured_cache_dir()
    source = "CAPT_ENGINE_CACHE" if os.environ.get("CAPT_ENGINE_CACHE") else "default; CAPT_ENGINE_CACHE sets it"
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"the engine cache {folder} ({source}) is not a folder")
    if folder.exists() and not os.access(folder, os.W_OK | os.X_OK):
        # A start falls back to FALLBACK_CACHE where it cannot write: that is the cache it uses.
        return FALLBACK_CACHE, f"{folder} ({source}) cannot be written, so a start uses this fallback"
    return folder, source


def _engines(args) -> None:
    from serving.engine import UNUSED_S, cache_entries, clear_cache
    if args.older_than is not None and not args.clear:
        raise ValueError("--older-than goes with --clear")
    if args.older_than is not None and not (math.isfinite(args.older_than) and args.older_than >= 0):
        raise ValueError(f"--older-than must be a number of days >= 0, got {args.older_than}")
    folder, source = _cache_folder()
    if args.clear:
        deleted, failed = clear_cache(folder, (args.older_than or 0.0) * 86400)
        freed = sum(entry["bytes"] for entry in deleted)
        if args.json:
            print(json.dumps({"folder": str(folder), "deleted": deleted, "not_deleted": failed, "bytes_freed": freed},
                             indent=2))
        else:
            print(f"{folder}: deleted {len(deleted)} entr{'y' if len(deleted) == 1 else 'ies'}, {_size(freed)} freed")
        if failed:
            raise PermissionError(f"{len(failed)} entr{'y' if len(failed) == 1 else 'ies'} of {folder} could not be "
                                  "deleted: " + "; ".join(f"{entry['name']} ({entry['error']})" for entry in failed[:5]))
        return
    entries = cache_entries(folder)
    if args.json:
        print(json.dumps({"folder": str(folder), "source": source, "entries": entries,
                          "bytes": sum(entry["bytes"] for entry in entries)}, indent=2))
        return
    now = time.time()
    state = "" if folder.is_dir() else "; not made yet (the first start makes it)"
    print(f"engine cache: {folder} ({source}{state}), {len(entries)} entries, "
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
                line += f"  {entry['choice']}: {entry['chosen']} (measured {measured}, {_contention(entry)}; {state})"
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
    return (OSError,)  # an unreadable cache, or entries that could not be deleted: "capt: error: ..."
