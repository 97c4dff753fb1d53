"""What each Label Studio project asked for in ``setup``'s ``extra_params``, kept per project.

Label Studio sends ``setup`` before every batch of predictions (with the project's id and
labelling config), and ``predict`` names the project again, so the settings are kept in memory:
a restarted service has them again at the next ``setup``. A project's ``extra_params`` are
checked when they are sent, so that a mistake shows in Label Studio's connection dialog, not at
the first prediction.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import APIError
from ..tiling import Tiling

# Projects remembered at once, the least recently set up forgotten first: at most this many, and
# at most this many characters of configs and label renames together (setup is unauthenticated,
# as Label Studio calls it: 1,024 configs of a megabyte each would be a gigabyte).
MAX_PROJECTS = 1024
MAX_KEPT_CHARS = 16_000_000


class ProjectSettings(BaseModel):
    """The ``extra_params`` a project may send (any other key is refused, naming it)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: Annotated[str | None, Field(max_length=128)] = None  # a model of the repository
    version: Annotated[str | None, Field(max_length=20)] = None
    score_threshold: Annotated[float | None, Field(ge=0, le=1, allow_inf_nan=False)] = None
    max_detections: Annotated[int | None, Field(ge=1)] = None
    tile: str | None = None  # auto, off or WxH, as /detect's
    tile_overlap: float | None = None
    from_name: Annotated[str | None, Field(max_length=256)] = None  # which RectangleLabels tag
    labels: Annotated[dict[str, str], Field(max_length=4096)] = {}  # model class -> project label

    @classmethod
    def parse(cls, params: Any, tile_default: str, overlap_default: float) -> ProjectSettings:
        """``extra_params`` as sent (None or {} for none): 422 naming what is wrong."""
        try:
            settings = cls.model_validate(params or {})
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'extra_params'}: {e['msg']}" for e in exc.errors()
            )
            raise APIError(422, f"extra_params: {problems}", "invalid_parameters") from None
        settings.tiling(tile_default, overlap_default)
        return settings

    def tiling(self, default: str, default_overlap: float) -> Tiling | None:
        return Tiling.parse(self.tile, self.tile_overlap, default, default_overlap)


class Projects:
    """Each project's settings and labelling config by its id (``"ID.timestamp"``)."""

    def __init__(self, limit: int = MAX_PROJECTS, chars: int = MAX_KEPT_CHARS) -> None:
        self.limit, self.chars = limit, chars
        self._known: OrderedDict[str, tuple[ProjectSettings, str | None]] = OrderedDict()
        self._kept = 0

    @staticmethod
    def _weight(project: str, settings: ProjectSettings, schema: str | None) -> int:
        return len(project) + len(schema or "") + sum(len(k) + len(v) for k, v in settings.labels.items())

    def set(self, project: str, settings: ProjectSettings, schema: str | None) -> None:
        self._forget(project)
        self._known[project] = (settings, schema)
        self._kept += self._weight(project, settings, schema)
        while len(self._known) > self.limit or (self._kept > self.chars and len(self._known) > 1):
            self._forget(next(iter(self._known)))

    def _forget(self, project: str) -> None:
        if project in self._known:
            self._kept -= self._weight(project, *self._known.pop(project))

    def get(self, project: str | None) -> tuple[ProjectSettings, str | None]:
        """A project's settings and config as set up last (defaults for one never set up)."""
        if project is not None and project in self._known:
            self._known.move_to_end(project)
            return self._known[project]
        return ProjectSettings(), None
