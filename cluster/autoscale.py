"""When the router adds or retires a worker of one role (the rule Ray Serve applies to its
replicas): the role wants ``ceil(ongoing / target_ongoing_requests)`` workers, kept between
its bounds, where ``ongoing`` counts the requests its workers run or queue. A wish to grow
must hold for ``upscale_delay_s`` and one to shrink for ``downscale_delay_s`` (a short burst
or lull changes nothing); each decision moves one worker, so the next one sees its effect.

The router does the moving (cluster/router.py): a new worker starts as a replacement does
(Ray holds it pending while the cluster has no room, so an autoscaler below can add a
node); a retired one first stops taking requests, then is stopped when those it holds have
ended, or at ``drain_timeout_s`` (the router then resumes them elsewhere, as after a death).
"""

from __future__ import annotations

import math

from pdserve.cluster.config import RoleConfig


class RoleScaler:
    """The decisions for one role; ``decide`` is called with each fresh view of its load."""

    def __init__(self, role: RoleConfig) -> None:
        self.role = role
        self.min_replicas, self.max_replicas = role.bounds
        self._since: float | None = None  # when the current wish began
        self._wish = 0  # +1 grow, -1 shrink, 0 none

    @property
    def enabled(self) -> bool:
        return self.max_replicas > self.min_replicas

    def desired(self, ongoing: float) -> int:
        want = math.ceil(ongoing / self.role.target_ongoing_requests)
        return min(max(want, self.min_replicas), self.max_replicas)

    def decide(self, ongoing: float, current: int, now: float) -> int:
        """+1 (start a worker), -1 (retire one) or 0. ``current``: the role's workers in
        service plus those starting (not those draining)."""
        want = self.desired(ongoing)
        wish = (want > current) - (want < current)
        if wish != self._wish:
            self._wish, self._since = wish, now
        if wish == 0 or self._since is None:
            return 0
        delay = self.role.upscale_delay_s if wish > 0 else self.role.downscale_delay_s
        if now - self._since < delay:
            return 0
        self._since = now  # the next move waits a full delay again, seeing this one's effect
        return wish
