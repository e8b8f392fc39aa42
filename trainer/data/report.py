"""The data package's one error type and one report of what a source held and what was kept."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

EXAMPLES_PER_REASON = 5  # offending paths a DataReport keeps per reason


class DataError(ValueError):
    """A data problem; the message says what was found, what is wrong and what to do."""


class EmptyDatasetError(DataError):
    """A source with no usable sample."""


class MissingDependencyError(DataError, ImportError):
    """An optional package a chosen data format needs."""


class BadSample(Exception):
    """One sample that cannot be used; `reason` is the report key. Caught inside the package,
    where it becomes a skip in the report (or a DataError when nothing is left)."""

    def __init__(self, reason: str, where: str):
        super().__init__(f"{reason}: {where}")
        self.reason, self.where = reason, where


@dataclass
class DataReport:
    """What a source held and what was kept (found / used / skipped by reason, a few examples
    each); written into the run folder as data_report.json."""

    source: str
    kind: str
    found: int = 0
    used: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    examples: dict = field(default_factory=dict)  # reason -> a few paths

    def skip(self, reason: str, where) -> None:
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < EXAMPLES_PER_REASON:
            shown.append(str(where))

    def to_dict(self) -> dict:
        return {"source": self.source, "kind": self.kind, "found": self.found, "used": self.used,
                "skipped": dict(self.skipped), "skipped_total": sum(self.skipped.values()),
                "examples": {k: list(v) for k, v in self.examples.items()}}

    def summary(self) -> str:
        reasons = ", ".join(f"{n} {r} (e.g. {self.examples[r][0]})" for r, n in sorted(self.skipped.items()))
        return f"{self.source} ({self.kind}): {self.used} usable of {self.found} found; skipped: {reasons or 'none'}"

    def empty_error(self, hint: str) -> EmptyDatasetError:
        return EmptyDatasetError(f"no usable sample in {self.summary()}. {hint}")
