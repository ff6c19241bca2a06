"""A token bucket shared by every transfer of one server: ``max_rate`` bytes per second, all streams together."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from .errors import ConfigError

#: how long a limited sender sleeps at most between health checks
_STEP = 0.05


class RateLimiter:
    """Serving never takes more than ``rate`` bytes per second: by any time ``t`` after serving starts, at most
    ``rate * t + burst`` bytes have been handed to the sockets (``burst``: a hundredth of a second's worth, at
    least 1 MiB). A message may start ``burst / rate`` seconds before its slot ends."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
            raise ConfigError(f"max_rate must be a positive number of bytes per second, got {rate!r}")
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else max(self.rate / 100, float(1 << 20))
        self._lock = threading.Lock()
        self._next = time.monotonic()  # when the bucket is empty of debt

    def take(self, nbytes: int, check: Callable[[], None] | None = None) -> None:
        """Reserve ``nbytes`` and sleep until the bucket allows them (calling ``check`` while sleeping)."""
        with self._lock:
            now = time.monotonic()
            self._next = max(self._next, now) + nbytes / self.rate  # idle time is not saved up
            wake = self._next - self.burst / self.rate
        while True:
            left = wake - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, _STEP))
            if check is not None:
                check()
