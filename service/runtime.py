"""One model being served: loading, warm-up, validation and hot reload without downtime.

A reload loads the new artifact and warms it up beside the old one (off the event loop), then
swaps one reference. The batcher reads that reference at the start of each batch, so batches in
flight finish on the old session and the next one runs on the new. A broken artifact is
refused, logged and counted, and the old model keeps serving. Which files are served, and when
they changed, is the repository's business (service/repository.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .artifact import ArtifactError, Detector
from .memory import release_free_memory
from .metrics import ModelMetrics
from .settings import Settings
from .threadnames import ONNXRUNTIME, name_this_thread

log = logging.getLogger(__name__)


class GPURequired(RuntimeError):
    pass


@dataclass(frozen=True)
class _FileStamp:
    mtime_ns: int
    size: int
    inode: int


def stamp(path: str) -> _FileStamp | None:
    """What tells a file replaced or rewritten from the same file (None: it is gone)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _FileStamp(st.st_mtime_ns, st.st_size, st.st_ino)


class ModelRuntime:
    """The session of one artifact file, served under ``metrics.model``."""

    def __init__(
        self,
        settings: Settings,
        metrics: ModelMetrics,
        path: str,
        on_swap: Callable[[Detector, dict[int, float]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.path = path
        # Told of each model swapped in, with its warm-up's seconds per batch size (the batcher's
        # estimates start from them).
        self.on_swap = on_swap
        self.detector: Detector | None = None
        self.loaded_at: float | None = None
        self._lock = asyncio.Lock()
        self.stamp: _FileStamp | None = None  # of the file last loaded or refused

    @property
    def ready(self) -> bool:
        return self.detector is not None

    def _load(self, path: str) -> tuple[Detector, dict[int, float]]:
        """Load, check the providers, warm up every batch size: runs in a worker thread. The
        detector, and the seconds a run of each batch size took once warm."""
        s = self.settings
        name_this_thread(ONNXRUNTIME)  # the session's thread pool, made now, takes the name
        detector = Detector(path, providers=s.providers, intra_op_threads=s.intra_op_threads)
        if s.require_gpu and "CUDAExecutionProvider" not in detector.providers:
            raise GPURequired(
                f"SSD_REQUIRE_GPU is set but ONNX Runtime runs {path} on {detector.providers}: "
                "the CUDA provider did not load (check the CUDA and cuDNN libraries)"
            )
        height, width = detector.info.input_size
        started = time.perf_counter()
        seconds: dict[int, float] = {}
        for batch in range(1, s.max_batch_size + 1):
            images = np.zeros((batch, height, width, 3), dtype=np.uint8)
            detector.run(images)  # the first run of a shape allocates and picks kernels
            timed = time.perf_counter()
            detector.run(images)
            seconds[batch] = time.perf_counter() - timed
        log.info(
            "model %s (%s, sha256 %s) on %s, warmed up for batches 1..%d in %.2f s",
            detector.info.name,
            detector.info.version,
            detector.info.sha256[:12],
            ",".join(detector.providers),
            s.max_batch_size,
            time.perf_counter() - started,
        )
        floor = detector.info.score_threshold
        if s.score_threshold < floor:
            log.warning(
                "SSD_SCORE_THRESHOLD %s is below the floor of model %s (%s, the threshold baked "
                "into the artifact): requests without score_threshold use %s",
                s.score_threshold,
                detector.info.name,
                floor,
                floor,
            )
        return detector, seconds

    def _swap(self, detector: Detector, seconds: dict[int, float]) -> None:
        if self.on_swap is not None:
            self.on_swap(detector, seconds)
        self.detector = detector
        self.loaded_at = time.time()
        self.publish()

    def publish(self) -> None:
        """detector_model_info for the model loaded, under the served name."""
        if self.detector is not None:
            info = self.detector.info
            self.metrics.shared.set_model(
                self.metrics.model, info.version, info.sha256, self.detector.providers[0]
            )

    async def load(self, initial: bool = False) -> Detector:
        """Load the file and swap it in. Raises ArtifactError or GPURequired; the current model,
        if any, keeps serving."""
        path = self.path
        async with self._lock:
            found = stamp(path)
            try:
                detector, seconds = await asyncio.get_running_loop().run_in_executor(None, self._load, path)
            except Exception as exc:
                if not initial:
                    self.metrics.reload("failure")
                self.stamp = found  # do not retry the same broken file on every poll
                if isinstance(exc, ArtifactError | GPURequired):
                    raise
                # ORT failing in warm-up, out of memory, ...
                raise ArtifactError(f"{path} failed to load or warm up: {exc}") from exc
            self._swap(detector, seconds)
            self.stamp = found
            # The previous session's memory (or a refused one's) goes back to the system, so that
            # the next reload's peak (two sessions at once) starts from one model's worth.
            await asyncio.get_running_loop().run_in_executor(None, release_free_memory, True)
            if not initial:
                self.metrics.reload("success")
            return detector

    async def changed(self, settle_s: float) -> bool:
        """Has the file changed since it was last loaded or refused, and stayed so for
        ``settle_s`` (a writer that does not rename may still be writing)?"""
        now = stamp(self.path)
        if now is None or now == self.stamp:
            return False
        await asyncio.sleep(settle_s)
        return stamp(self.path) == now
