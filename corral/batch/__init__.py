"""Resumable JSONL batch runs (``corral run``): the typed entry point and its parts.

``BatchAPI`` with ``submit``, ``poll`` and ``collect`` drive the provider's Batch API from a
script; ``corral run --via batch-api`` does the same with the run's guarantees.
"""

from corral.batch._batch_api import BatchAPI, collect, poll, submit
from corral.batch._batch_plan import PartLimits, PollSchedule
from corral.batch._batch_wire import RemoteBatch, RemoteFile, RequestCounts
from corral.batch._job import BatchJob, ExitCode, JobResult, run_job
from corral.batch._runner import BatchOptions, BatchReport, BatchRunner, estimate_cost, preflight

__all__ = [
    "BatchAPI",
    "BatchJob",
    "BatchOptions",
    "BatchReport",
    "BatchRunner",
    "ExitCode",
    "JobResult",
    "PartLimits",
    "PollSchedule",
    "RemoteBatch",
    "RemoteFile",
    "RequestCounts",
    "collect",
    "estimate_cost",
    "poll",
    "preflight",
    "run_job",
    "submit",
]
