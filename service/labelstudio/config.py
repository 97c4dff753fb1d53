"""A Label Studio project's labelling config, read for what predictions need: the
``RectangleLabels`` tag the boxes go to (``from_name``), the ``Image`` tag it labels (``to_name``)
and the task data key that tag shows (``value="$image"``), and the tag's labels; then the model's
classes matched to those labels.

The config is XML that arrives in requests (``setup``'s ``schema``, ``predict``'s
``label_config``): it is parsed by defusedxml, which refuses entities and DTDs, and never past
``MAX_CONFIG_CHARS``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from xml.etree.ElementTree import Element

from defusedxml import ElementTree
from defusedxml.common import DefusedXmlException

# Label Studio's own templates are a few kB; one with thousands of labels stays under this.
MAX_CONFIG_CHARS = 1_000_000


class ConfigError(ValueError):
    """A labelling config predictions cannot be made for; the message says why."""


@dataclass(frozen=True)
class Target:
    """Where a project's boxes go: the ``RectangleLabels`` tag ``from_name``, on the ``Image``
    tag ``to_name``, which shows the task data's ``data_key``; ``labels`` in the tag's order."""

    from_name: str
    to_name: str
    data_key: str
    labels: tuple[str, ...]


def _tags(root: Element, kind: str) -> list[Element]:
    # Label Studio reads tag names without regard to case (<Image>, <image>).
    return [e for e in root.iter() if isinstance(e.tag, str) and e.tag.lower() == kind]


def parse(config: str, from_name: str | None = None) -> Target:
    """The target of ``config``: its ``RectangleLabels`` named ``from_name``, or its first one."""
    if not isinstance(config, str) or not config.strip():
        raise ConfigError("the labelling config is empty")
    if len(config) > MAX_CONFIG_CHARS:
        raise ConfigError(f"the labelling config has {len(config)} characters; at most {MAX_CONFIG_CHARS}")
    try:
        root = ElementTree.fromstring(config, forbid_dtd=True)
    except (ElementTree.ParseError, DefusedXmlException) as exc:
        raise ConfigError(f"the labelling config is not valid XML: {exc}") from None
    boxes = _tags(root, "rectanglelabels")
    if from_name is not None:
        boxes = [b for b in boxes if b.get("name") == from_name]
    if not boxes:
        which = f"named {from_name!r} " if from_name is not None else ""
        raise ConfigError(
            f"the labelling config has no RectangleLabels tag {which}(the detector predicts boxes: "
            '<RectangleLabels name="label" toName="image"> with a <Label value="..."/> per class)'
        )
    tag = boxes[0]
    name, to_name = tag.get("name"), tag.get("toName")
    if not name or not to_name:
        raise ConfigError("the RectangleLabels tag needs both name and toName")
    images = [i for i in _tags(root, "image") if i.get("name") == to_name]
    if not images:
        raise ConfigError(f"RectangleLabels {name!r} labels {to_name!r}, which is not an Image tag")
    value = images[0].get("value", "")
    if not value.startswith("$") or len(value) < 2:
        raise ConfigError(f"the Image tag {to_name!r} shows {value!r}; a task data key ($image) is needed")
    labels = tuple(label.get("value", "") for label in _tags(tag, "label") if label.get("value"))
    if not labels:
        raise ConfigError(f"RectangleLabels {name!r} has no Label values")
    return Target(name, to_name, value[1:], labels)


@dataclass(frozen=True)
class LabelMap:
    """The project's label of each model class (None: the project has none for it)."""

    labels: tuple[str | None, ...]

    @property
    def unlabelled(self) -> list[int]:
        return [i for i, label in enumerate(self.labels) if label is None]

    def describe(self, classes: Sequence[str]) -> str:
        """The classes left without a label, for the log and setup's answer."""
        missing = [classes[i] for i in self.unlabelled]
        if not missing:
            return "every class has a label"
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        return (
            f"{len(missing)} of {len(classes)} classes have no label in the project and are left out: {shown}"
        )


def match(classes: Sequence[str], labels: Sequence[str], renamed: Mapping[str, str]) -> LabelMap:
    """Each model class's label: ``renamed[class]`` where given (it must be one of ``labels``),
    else the label of the same name, else the one label equal to it but for case."""
    known = set(labels)
    folded: dict[str, list[str]] = {}
    for label in labels:
        folded.setdefault(label.casefold(), []).append(label)
    wrong = {c: label for c, label in renamed.items() if c in classes and label not in known}
    if wrong:
        raise ConfigError(
            f"labels mapping {wrong}: not labels of the project (its labels: {', '.join(labels)})"
        )
    out: list[str | None] = []
    for name in classes:
        if name in renamed:
            out.append(renamed[name])
        elif name in known:
            out.append(name)
        else:
            same = folded.get(name.casefold(), [])
            out.append(same[0] if len(same) == 1 else None)
    return LabelMap(tuple(out))
