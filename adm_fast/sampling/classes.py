"""Which classes to sample: `--classes 0,3,7`, `0-9`, or both mixed (`0-4,7`)."""

from __future__ import annotations

from collections.abc import Iterable


def parse_classes(text: str) -> list[int]:
    """'0-4,7,9' -> [0, 1, 2, 3, 4, 7, 9]: sorted, each class once."""
    out = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            first = int(lo)
            last = int(hi) if sep else first
        except ValueError:
            raise ValueError(f"{part!r} is not a class number or a range like 0-9") from None
        if first < 0 or last < first:
            raise ValueError(f"{part!r} is not a class number or a range like 0-9 "
                             "(non-negative, low-high)")
        out.update(range(first, last + 1))
    if not out:
        raise ValueError(f"no classes in {text!r}; give a list like 0,3,7 or a range like 0-9")
    return sorted(out)


def check_classes(classes: Iterable[int] | None, num_classes: int | None,
                  what: str) -> list[int] | None:
    """classes as a sorted list of distinct ints, each below num_classes (the
    classes of `what`, the model or the classifier that draws the labels);
    None stays None. num_classes None: nothing draws labels here."""
    if classes is None:
        return None
    if num_classes is None:
        raise ValueError(f"classes need a class-conditional model or classifier guidance; "
                         f"{what} draws no labels")
    values = sorted({_as_int(c) for c in classes})
    if not values:
        raise ValueError("classes is empty; give at least one class")
    bad = [c for c in values if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"class {bad[0]} is out of range: {what} has {num_classes} classes "
                         f"(0-{num_classes - 1})")
    return values


def _as_int(c) -> int:
    if isinstance(c, bool) or not hasattr(c, "__index__"):
        raise ValueError(f"classes must be integers, got {c!r}")
    return int(c.__index__())
