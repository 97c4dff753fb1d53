"""What admission knows about time, learnt as the service runs (service/batcher.py uses it).

- ``BatchTimes``: seconds per batch size on the current model, measured at warm-up, then a
  moving average over the batches run.
- ``Pace``: how many times their batch times batches take now. On a slower or busier CPU than
  the warm-up's, a batch's inference shares the cores with decoding, HTTP and other processes.
- ``Lateness``: how much later than the batch times at the current pace admitted requests have
  recently finished all the same (the event loop's own delays, another model's batch on the
  shared inference thread).

Pace and lateness are learnt from batches and answered requests, so while nothing runs nothing
teaches them: what was learnt holds for ``FORGET_AFTER_S``, then fades (halving every
``FORGET_HALF_LIFE_S``), so that an estimate that refuses every request wears off. Neither
faded: after a storm of retried refusals (64 clients, timeout_ms=300) a learnt lateness refused
every request for good; beside an SSD300 on the same inference thread, a pace learnt from a batch
that waited for the SSD300's did.
"""

from __future__ import annotations

import math
from collections.abc import Callable

FORGET_AFTER_S = 1.0
FORGET_HALF_LIFE_S = 1.0


def _faded(value: float, rest: float, learnt_at: float, now: float) -> float:
    """``value`` learnt at ``learnt_at``, as it stands at ``now``: unchanged for FORGET_AFTER_S,
    then halfway back to ``rest`` every FORGET_HALF_LIFE_S."""
    idle = now - learnt_at - FORGET_AFTER_S
    return rest + (value - rest) * 0.5 ** (idle / FORGET_HALF_LIFE_S) if idle > 0 else value


class BatchTimes:
    """Seconds per batch size on the current model: the warm-up's measurements, then a moving
    average over the batches run."""

    def __init__(self) -> None:
        self._seconds: dict[int, float] = {}

    def reset(self, seconds: dict[int, float]) -> None:
        self._seconds = dict(seconds)

    def record(self, size: int, seconds: float) -> None:
        """A batch of ``size`` ran in ``seconds``. One batch moves its size's time by at most a
        fifth: a batch stalled by the process (a full garbage collection holding the GIL while
        another model loaded: 0.73 s against 0.013) must not make every later estimate of that
        size long; a CPU that stays slower is the pace's to learn, at once."""
        old = self._seconds.get(size)
        self._seconds[size] = seconds if old is None else 0.8 * old + 0.2 * min(seconds, 2 * old)

    def __bool__(self) -> bool:
        return bool(self._seconds)

    def of(self, size: int) -> float:
        """One batch of ``size`` (0 when nothing is measured yet: admission cannot refuse)."""
        times = self._seconds
        if size <= 0 or not times:
            return 0.0
        if size in times:
            return times[size]
        # Unmeasured: from the nearest smaller size, linearly (batching is sublinear, so this errs
        # on the long side), or for a size below every measured one, the smallest's time.
        below = [k for k in times if k < size]
        if below:
            k = max(below)
            return times[k] * size / k
        return times[min(times)]

    def drain(self, images: int, max_batch: int) -> float:
        """Running ``images`` queued images: full batches, then the rest."""
        full, rest = divmod(max(images, 0), max_batch)
        return full * self.of(max_batch) + self.of(rest)


class Pace:
    """How many times their batch times (``BatchTimes``) batches take now: at the start of a
    burst on one core beside a CPU-bound process, batches of 8 took 0.5-0.6 s against the
    warm-up's 0.2, the batch times' moving average took 5 batches to come within 25% of it, and
    admission let in work on the old figure that later missed its deadlines (504s).

    A slower pace is taken at once, from the batch that showed it or from the running one as it
    overruns (admission must not admit on a stale, faster one), but one batch can make it at
    most ``MAX_STEP`` times what it was: a batch stalled by the process (a full garbage
    collection holding the GIL while another model loaded) ran 56 times its batch time, and
    taken whole that refused a lone client's every request for seconds (503s with nothing
    queued). Waiting for a second batch to confirm a slower pace instead brought the 504s back
    beside the CPU-bound process (5-22 of 600). A quicker pace is eased into, halfway per batch.
    Never below 1: the batch times learn a faster CPU by themselves. The ratio is against the
    batch time before it learnt the same batch: the estimate for that size then errs long for a
    few batches, the safe side, where against the moved time every other size would err short."""

    # Above the largest slowdown seen at a burst's start (3x: 0.6 s against 0.2), so that such a
    # slowdown is learnt from one batch; a larger one takes two.
    MAX_STEP = 4.0

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._factor = 1.0
        self._learnt_at = -math.inf

    def reset(self) -> None:
        self._factor, self._learnt_at = 1.0, -math.inf

    def factor(self) -> float:
        return _faded(self._factor, 1.0, self._learnt_at, self._clock())

    def showing(self, ratio: float) -> float:
        """The pace once a batch has run (or while it is running, so far) ``ratio`` times its
        batch time, if that is slower: the ratio, at most MAX_STEP times the pace."""
        now = self.factor()
        return max(now, min(ratio, self.MAX_STEP * now))

    def learn(self, ratio: float) -> None:
        """A batch ran ``ratio`` times its batch time."""
        now = self.factor()
        self._factor = max(1.0, self.showing(ratio) if ratio > now else 0.5 * (now + ratio))
        self._learnt_at = self._clock()


class Lateness:
    """A moving average of how much later than estimated (without it) admitted requests finished:
    never below 0, an early finish only means there was room. Learnt from the raw estimate,
    not the corrected one, so it cannot feed on itself."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._seconds = 0.0
        self._learnt_at = -math.inf

    def seconds(self) -> float:
        return _faded(self._seconds, 0.0, self._learnt_at, self._clock())

    def learn(self, late: float) -> None:
        self._seconds = max(0.0, 0.9 * self.seconds() + 0.1 * late)
        self._learnt_at = self._clock()
