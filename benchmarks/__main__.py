"""``python -m benchmarks``: every benchmark, results in benchmarks/results/ (see run_all.py)."""
from benchmarks.run_all import main

raise SystemExit(main())
