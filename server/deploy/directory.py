"""The replica directory: a one-replica Serve deployment that each engine replica reports to every second.

Ray Serve routes a request to one replica; it has no call that reaches all of them. What the ingress must know about
every replica (is it ready, what has it resident, its metrics) is therefore pushed here by the replicas and read by
the ingress's ``/ready``, ``/metrics`` and ``/v1/replicas``. A replica not heard from for ``STALE_AFTER_S`` counts as
down (killed, hung, or restarting); a restarted directory is refilled within one report period.
"""

import time
from dataclasses import dataclass, field

REPORT_PERIOD_S = 1.0
STALE_AFTER_S = 5.0


@dataclass
class ReplicaReport:
    """What one engine replica says about itself."""

    replica_id: str
    pid: int
    node: str
    ready: bool
    running: int
    queued: int
    resident: list[str]  # adapters in a slot
    host_copies: list[str]  # adapters in the CPU tier
    multiplexed: list[str]  # the model ids Ray Serve's multiplex cache holds (what routing prefers this replica for)
    metrics: str  # the replica's Prometheus exposition
    reported_at: float = field(default_factory=time.time)


class ReplicaDirectory:
    def __init__(self) -> None:
        self._reports: dict[str, ReplicaReport] = {}

    def report(self, report: ReplicaReport) -> None:
        report.reported_at = time.time()
        self._reports[report.replica_id] = report

    def leave(self, replica_id: str) -> None:
        """A replica shutting down cleanly: stop counting it at once."""
        self._reports.pop(replica_id, None)

    def snapshot(self) -> list[ReplicaReport]:
        """The replicas heard from within STALE_AFTER_S, by id."""
        now = time.time()
        self._reports = {k: r for k, r in self._reports.items() if now - r.reported_at < STALE_AFTER_S * 4}
        return [r for _, r in sorted(self._reports.items()) if now - r.reported_at < STALE_AFTER_S]
