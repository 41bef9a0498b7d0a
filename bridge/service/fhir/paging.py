"""The paging cursor of searches and ``$everything``: a page's position, pinned to a snapshot.

The snapshot is the index's insertion high-water mark when the first page was read: later pages see
nothing stored after it, so no entry is skipped or repeated while data is being ingested. The key is
the sort key of the entry the page follows (or, for a "previous" page, precedes). The cursor travels
base64url-encoded in the ``_cursor`` parameter of the absolute paging links; it is not signed (it holds
no more than the links' query does, and every page is authorized anew).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import orjson

from bridge.service.http import FhirHTTPError


@dataclass(frozen=True, slots=True)
class Cursor:
    hwm: int  # the snapshot: the index's high-water mark at the first page
    key: list[Any] | None = None  # the sort key of the entry next to which the page starts
    backward: bool = False  # a "previous" page: the entries before ``key``

    def encode(self) -> str:
        raw = orjson.dumps({"h": self.hwm, "k": self.key, "b": self.backward})
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        try:
            data = orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
            hwm, key, backward = data["h"], data["k"], data["b"]
            if (
                type(hwm) is not int
                or not 0 <= hwm < 2**63
                or not (key is None or isinstance(key, list))
                or not isinstance(backward, bool)
            ):
                raise ValueError
        except (ValueError, KeyError, TypeError, orjson.JSONDecodeError):
            raise FhirHTTPError(
                400, "invalid", "parameter _cursor: not a cursor this server issued (follow the paging links)"
            ) from None
        return cls(hwm, key, backward)
