"""Resumable JSONL batch runs (``corral run``): the typed entry point and its parts."""

from corral.batch._job import BatchJob, ExitCode, JobResult, run_job
from corral.batch._runner import BatchOptions, BatchReport, BatchRunner, estimate_cost, preflight

__all__ = [
    "BatchJob",
    "BatchOptions",
    "BatchReport",
    "BatchRunner",
    "ExitCode",
    "JobResult",
    "estimate_cost",
    "preflight",
    "run_job",
]
