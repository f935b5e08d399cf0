"""Batch conversion on Ray Data (`synthesize --engine ray`, extra `ray`).

The driver (`run.py`) skips the items already done, as the single-process batch mode does, and hands the
rest to Ray Data: one `Speaker` (`speaker.py`) per GPU, or N CPU workers (`resources.py`), each loading
the model through the service once and speaking items with the same per-item code as `jobs.py`. Workers
write their files in place and their manifest lines into shards (`shards.py`), which the driver merges
into `manifest.jsonl`. Nothing here imports Ray at module level, so the package is importable without it.
"""
