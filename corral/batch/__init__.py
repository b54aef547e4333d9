"""The resumable JSONL batch runner behind ``corral run``."""

from corral.batch.runner import BatchOptions, BatchReport, BatchRunner, estimate_cost, preflight

__all__ = ["BatchOptions", "BatchReport", "BatchRunner", "estimate_cost", "preflight"]
