"""Pagination of the query API's lists that grow with a run's layers, steps or ranks: each list has a default
and a maximum page size, `?limit=` picks one within them, `?offset=` (or a list's own cursor, such as `to=`
for steps) where the page starts, and every answer carries `next`, the path and query of the following page
(null on the last one), so a client follows `next` without knowing how the list is cut.

    page = pages(query(request), DEFAULT, MAXIMUM)      # ValueError: a 400 naming the argument
    items, following = page.cut(everything)             # following: the next offset, or None
    {"...": items, "total": len(everything), "offset": page.offset, "limit": page.limit,
     "next": next_link(request, offset=following)}
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlencode

from starlette.requests import HTTPConnection

from gradwatch.aggregator.http.responses import int_arg, query, raw_path


@dataclass(frozen=True, slots=True)
class Page:
    offset: int
    limit: int

    def cut(self, items: list) -> tuple[list, int | None]:
        """This page of `items` and the offset of the next page (None: this is the last)."""
        end = self.offset + self.limit
        return items[self.offset:end], end if end < len(items) else None


def pages(args: dict[str, list[str]], default: int, maximum: int, limit: str = "limit",
          offset: str = "offset") -> Page:
    """The page the query asks for: `limit` within 1..maximum (default when absent; a larger one is cut to the
    maximum, not refused), `offset` >= 0. ValueError naming the argument when one is not an integer."""
    size, start = int_arg(args, limit), int_arg(args, offset)
    size = default if size is None else max(1, min(size, maximum))
    return Page(max(0, start or 0), size)


def next_link(request: HTTPConnection, **changes: int | str | None) -> str | None:
    """The request's own path and query with `changes` applied (a None value: no next page, so None)."""
    if any(v is None for v in changes.values()):
        return None
    args = {k: v[-1] for k, v in query(request).items()}
    args.update({k: str(v) for k, v in changes.items()})
    return f"{raw_path(request)}?{urlencode(args)}"


def matching(names: list[str], needle: str) -> list[str]:
    """The names containing `needle`, case-insensitively (the live view's layer search); all for ""."""
    if not needle:
        return names
    needle = needle.lower()
    return [n for n in names if needle in n.lower()]
