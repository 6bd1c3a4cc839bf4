"""Submitting and managing work on a Ray cluster through Ray's Job Submission API, tagged by tenant."""

from aifactory.jobs.client import Client, JobRecord

__all__ = ["Client", "JobRecord"]
