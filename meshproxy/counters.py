"""Process-wide counters kept in one place, for logs now and the admin API and metrics later.

Counters are updated per event (a connection opened, a connect failed), never per packet:
byte counts are accumulated on the session and added here when it closes or is swept.
"""

from __future__ import annotations

from collections.abc import Iterator

Labels = tuple[tuple[str, str], ...]
Key = tuple[str, Labels]


class Counters:
    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values: dict[Key, int] = {}

    def inc(self, name: str, amount: int = 1, **labels: str) -> None:
        self.add(key(name, **labels), amount)

    def add(self, counter: Key, amount: int = 1) -> None:
        """``inc`` of a counter whose key was made once (``key``): for those counted on
        every connection, whose labels do not change."""
        values = self._values
        values[counter] = values.get(counter, 0) + amount

    def get(self, name: str, **labels: str) -> int:
        """The value of one counter; with no labels given, the sum over all its labels."""
        if labels:
            return self._values.get(key(name, **labels), 0)
        return sum(v for (n, _), v in self._values.items() if n == name)

    def items(self) -> Iterator[tuple[str, dict[str, str], int]]:
        for (name, labels), value in sorted(self._values.items()):
            yield name, dict(labels), value

    def as_dict(self) -> dict[str, list[dict[str, object]]]:
        out: dict[str, list[dict[str, object]]] = {}
        for name, labels, value in self.items():
            out.setdefault(name, []).append({"labels": labels, "value": value})
        return out


def key(name: str, **labels: str) -> Key:
    """A counter's key, for ``Counters.add``."""
    return name, _labels(labels)


def _labels(labels: dict[str, str]) -> Labels:
    # Most counters have one label, some run per session: skip the sort for them.
    items = tuple(labels.items())
    return items if len(items) < 2 else tuple(sorted(items))
