"""The HTTP job API's jobs (DESIGN.md, "HTTP job API"), on the one job engine.

Why it is a package: the job's life (``service``: accepted, stored, run, followed,
cancelled, resumed) and what it does to its volume (``volume``: facts, plan, steps) change
for different reasons and are tested apart.
"""

from watcher.jobs.names import api_image_name
from watcher.jobs.service import ApiJobs, JobEnded, JobNotFound

__all__ = ["ApiJobs", "JobEnded", "JobNotFound", "api_image_name"]
