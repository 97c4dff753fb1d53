"""The models being served, by name and version: ``SSD_MODEL_DIR`` or ``SSD_MODEL_PATH`` alone.

A repository folder is laid out as Triton's (``NAME/VERSION/model.onnx``, VERSION a positive
integer) or flat (``NAME.onnx``, version 1); both may sit side by side. Every artifact found is
served, each with its own session (service/runtime.py) and batcher; a name without a version
means its highest. ``SSD_MODEL_PATH`` alone is a repository of one model, named by
``SSD_MODEL_NAME`` or else by the artifact's own ``model`` metadata.

While ``SSD_MODEL_POLL_S`` > 0 the folder is scanned: a file added is loaded, warmed and then
listed; a file replaced is reloaded beside the old session and swapped; a file removed stops
being listed at once and its batcher finishes what it holds. A broken file is refused and
logged, and every other model keeps serving.

All models' batches run in one inference thread: on the CPU one ONNX Runtime run already uses
every core, and two at once would only fight over them (the batchers' times then include the
wait, which is what admission should count).
"""

from __future__ import annotations

import asyncio
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .artifact import ArtifactError, Detector, ModelInfo
from .batcher import Batcher
from .metrics import Metrics
from .runtime import GPURequired, ModelRuntime, stamp
from .settings import Settings
from .threadnames import name_inference_thread

log = logging.getLogger(__name__)

ARTIFACT = "model.onnx"  # the file inside NAME/VERSION/, as Triton names an ONNX model
# A served name travels in URL paths and metric labels: keep it to what needs no escaping.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


class ModelNotFound(LookupError):
    """No such model, or no such version of it (404)."""


class NoModel(ModelNotFound):
    """The repository lists no model at all, so nothing can serve (503, not 404: the fault is
    the server's, and it may pass when a file appears)."""


@dataclass
class ServedModel:
    """One artifact being served: its name and version, its session and its batcher."""

    name: str
    version: int
    runtime: ModelRuntime
    batcher: Batcher
    # Set once its first load has ended, well or not: until then it is "loading".
    tried: asyncio.Event = field(default_factory=asyncio.Event)
    error: str | None = None  # why its file was refused, while it serves nothing

    def identity(self, info: ModelInfo | None = None) -> dict[str, str]:
        """Which model this is, as every answer, the page and the logs name it: the served name
        and repository version, and the artifact (``info``: the one that ran; default: the one
        loaded now)."""
        out = {"name": self.name, "version": str(self.version)}
        info = info or (self.detector.info if self.detector is not None else None)
        if info is not None:
            out |= {"architecture": info.name, "artifact_version": info.version, "sha256": info.sha256}
        return out

    @property
    def detector(self) -> Detector | None:
        return self.runtime.detector

    @property
    def ready(self) -> bool:
        return self.runtime.ready

    @property
    def state(self) -> str:
        if self.ready:
            return "READY"
        return "UNAVAILABLE" if self.tried.is_set() else "LOADING"

    def why_not_ready(self) -> str:
        """What every answer about this model says while it serves nothing: the reason its file
        was refused, where there is one."""
        who = f"model {self.name} (version {self.version})"
        if not self.tried.is_set():
            return f"{who} is still loading"
        return f"{who} is not loaded: {self.error or 'no artifact'}"

    def index_entry(self) -> dict[str, str]:
        """The model as Triton's repository index lists it: name, version, state, and the reason
        where it is not ready."""
        entry = {"name": self.name, "version": str(self.version), "state": self.state}
        if not self.ready:
            entry["reason"] = self.why_not_ready()
        return entry


def scan(folder: Path) -> dict[tuple[str, int], Path]:
    """The artifacts in a repository folder, by (name, version). Anything else is ignored."""
    found: dict[tuple[str, int], Path] = {}
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        log.error("model repository %s cannot be read: %s", folder, exc)
        return found
    for entry in entries:
        if entry.name.startswith("."):
            continue  # editors' and rsync's temporary files
        if entry.is_file() and entry.suffix == ".onnx" and NAME.match(entry.stem):
            found.setdefault((entry.stem, 1), entry)
        elif entry.is_dir() and NAME.match(entry.name):
            try:
                versions = [v for v in entry.iterdir() if v.is_dir() and v.name.isdigit()]
            except OSError:
                continue
            for version in versions:
                number = int(version.name)
                if number > 0 and (version / ARTIFACT).is_file():
                    found[(entry.name, number)] = version / ARTIFACT
    return found


async def settled(path: Path, seconds: float) -> bool:
    """The file is there and unchanged after ``seconds``: not a copy still being written."""
    before = stamp(str(path))
    await asyncio.sleep(seconds)
    return before is not None and stamp(str(path)) == before


def describe(model: ServedModel) -> str:
    """A model as the logs name it: served name, version, and the artifact behind them."""
    who = model.identity()
    if "architecture" not in who:
        return f"model {who['name']} version {who['version']}"
    return (
        f"model {who['name']} version {who['version']} ({who['architecture']}, "
        f"artifact {who['artifact_version']}, sha256 {who['sha256'][:12]})"
    )


class Repository:
    """Every model served, looked up by name and version; loads, reloads and retires them."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.folder = Path(settings.model_dir) if settings.model_dir else None
        self._models: dict[tuple[str, int], ServedModel] = {}
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="inference", initializer=name_inference_thread
        )
        self._poller: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()

    # --- Lookup ------------------------------------------------------------------------------

    def models(self) -> list[ServedModel]:
        """Every model listed, by name then version."""
        return [self._models[key] for key in sorted(self._models)]

    def names(self) -> list[str]:
        return sorted({name for name, _ in self._models})

    @property
    def default_name(self) -> str | None:
        """SSD_DEFAULT_MODEL, else the only loaded one, else the first loaded by name: a file that
        failed to load is never the default (a broken ``aa.onnx`` must not take the routes that
        name no model from a good ``shapes.onnx``). Before anything has loaded, the first found."""
        wanted = self.settings.default_model
        if wanted:
            return wanted
        loaded = sorted({name for (name, _), m in self._models.items() if m.ready})
        if loaded:
            return loaded[0]
        names = self.names()
        return names[0] if names else None

    def get(self, name: str | None = None, version: int | str | None = None) -> ServedModel:
        """A model by name (default: the default model) and version (default: its highest)."""
        if not self._models:
            raise NoModel(self._why_empty())
        name = name or self.default_name
        if name is None:
            raise ModelNotFound("no model is being served")
        versions = sorted(v for n, v in self._models if n == name)
        if not versions:
            raise ModelNotFound(f"unknown model {name!r}; served: {', '.join(self.names()) or 'none'}")
        if version in (None, ""):
            return self._models[(name, versions[-1])]
        number = int(version) if isinstance(version, int) or str(version).isdigit() else None
        if number not in versions:
            raise ModelNotFound(
                f"model {name!r} has no version {version}; served: {', '.join(map(str, versions))}"
            )
        return self._models[(name, number)]

    def _why_empty(self) -> str:
        folder = self.folder
        if folder is None:
            return "no model is being served"
        if not folder.exists():
            return f"no model to serve: SSD_MODEL_DIR {folder} does not exist"
        if not folder.is_dir():
            return f"no model to serve: SSD_MODEL_DIR {folder} is not a folder"
        return f"no model to serve: SSD_MODEL_DIR {folder} holds no NAME.onnx or NAME/VERSION/{ARTIFACT}"

    def not_ready(self) -> str | None:
        """Why the repository cannot serve the routes that name no model (None: it can, the
        default model serves). A broken file of another model is no model: it must not take a
        replica that serves the others out of its load balancer (it is listed as UNAVAILABLE
        with its reason, logged and counted instead). Models found at start are all loaded or
        refused before the server listens; one added later is listed once loaded."""
        try:
            model = self.get()
        except ModelNotFound as exc:
            return str(exc)
        return None if model.ready else f"the default {model.why_not_ready()}"

    # --- Life --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load what is there (a model that fails is logged and stays unready), start watching."""
        if self.folder is None:
            await self._start_single(self.settings.model_path)
        else:
            if not self.folder.is_dir():
                log.error("SSD_MODEL_DIR %s is not a folder: no model to serve until it is", self.folder)
            for key, path in scan(self.folder).items():
                await self._add(key, path)
        if self.settings.model_poll_s > 0:
            self._poller = asyncio.get_running_loop().create_task(self._poll(), name="model-repository")

    async def stop(self, timeout_s: float) -> None:
        if self._poller is not None:
            self._poller.cancel()
        await asyncio.gather(*(m.batcher.stop(timeout_s) for m in self._models.values()), *self._retiring)
        self._executor.shutdown(wait=False)

    def _served(self, name: str, version: int, path: Path) -> ServedModel:
        metrics = self.metrics.of(name)
        runtime = ModelRuntime(self.settings, metrics, str(path))
        s = self.settings
        batcher = Batcher(
            lambda: runtime.detector,
            metrics,
            max_batch_size=s.max_batch_size,
            max_queue_delay_s=s.max_queue_delay_ms / 1000.0,
            max_queue_size=s.max_queue_size,
            executor=self._executor,
        )
        runtime.on_swap = batcher.calibrate
        return ServedModel(name, version, runtime, batcher)

    async def _load_first(self, model: ServedModel) -> None:
        try:
            await model.runtime.load(initial=True)
        except GPURequired:
            raise  # SSD_REQUIRE_GPU: refuse to start
        except ArtifactError as exc:
            model.error = str(exc)
            log.error("model %s version %d not loaded: %s", model.name, model.version, exc)
        else:
            model.error = None
        finally:
            model.tried.set()

    async def _start_single(self, path: str) -> None:
        # The name is SSD_MODEL_NAME, else the artifact's own: known once it has loaded, so the
        # file's stem stands in until then (and for good if it never loads).
        model = self._served(self.settings.model_name or Path(path).stem, 1, Path(path))
        model.batcher.start()
        await self._load_first(model)
        named = model.detector.info.name if model.detector is not None else None
        if not self.settings.model_name and named and named != model.name and NAME.match(named):
            self.metrics.forget(model.name)
            model.name = named
            model.runtime.metrics = model.batcher.metrics = self.metrics.of(named)
            model.runtime.publish()
        self._models[(model.name, 1)] = model
        if model.detector is not None:
            log.info("serving %s from %s", describe(model), path)
        elif Path(path).exists() and not self.settings.model_poll_s and self.settings.admin_token is None:
            # Nothing could ever make this process serve: no poll to pick up a fixed file, no
            # token to reload it. Exiting says so where an operator looks (the exit status, a
            # restart loop) instead of a pod that runs and answers 503 for ever. A missing file
            # is waited for: a volume or a retraining job may bring it.
            raise ArtifactError(
                f"{model.error}; nothing can replace it (SSD_MODEL_POLL_S is 0 and no "
                "SSD_ADMIN_TOKEN allows a reload), so the server stops"
            )

    async def _add(self, key: tuple[str, int], path: Path, at_start: bool = True) -> None:
        """Load a new artifact, then list it: requests never see a model still warming up."""
        model = self._served(*key, path)
        model.batcher.start()
        await self._load_first(model)
        if model.detector is None:
            log.error("model %s version %d at %s is listed but not ready", *key, path)
            if not at_start:  # a broken file dropped into a serving repository: alert on it
                model.batcher.metrics.reload("failure")
        self._models[key] = model
        if model.detector is not None:
            log.info("serving %s from %s", describe(model), path)

    def _retire(self, key: tuple[str, int]) -> None:
        model = self._models.pop(key)
        log.info("model %s version %d removed from the repository; finishing its queue", *key)
        if not any(n == key[0] for n, _ in self._models):
            self.metrics.forget(key[0])
        task = asyncio.get_running_loop().create_task(model.batcher.stop(self.settings.shutdown_timeout_s))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def reload(self, model: ServedModel) -> Detector:
        """Load the model's file again now (POST /model/reload). Raises as ModelRuntime.load."""
        try:
            detector = await model.runtime.load(initial=model.detector is None)
        except ArtifactError as exc:
            if model.detector is None:
                model.error = str(exc)
            raise
        model.error = None
        log.info("serving %s from %s", describe(model), model.runtime.path)
        return detector

    async def _poll(self) -> None:
        settle = min(self.settings.model_poll_s, 1.0)
        while True:
            await asyncio.sleep(self.settings.model_poll_s)
            try:
                await self._sync(settle)
            except GPURequired as exc:
                log.error("%s", exc)

    async def _sync(self, settle_s: float) -> None:
        """One scan: what was added, replaced or removed since the last."""
        if self.folder is not None:
            found = scan(self.folder)
            for key in [k for k in self._models if k not in found]:
                self._retire(key)
            for key, path in found.items():
                if key not in self._models and await settled(path, settle_s):
                    await self._add(key, path, at_start=False)
        for model in list(self._models.values()):
            if await model.runtime.changed(settle_s):
                log.info("model file %s changed; reloading", model.runtime.path)
                try:
                    await self.reload(model)
                except (ArtifactError, GPURequired) as exc:
                    log.error(
                        "reload of %s rejected, still serving the previous model: %s", model.runtime.path, exc
                    )
