"""Typed, located adapter errors (public API).

:class:`AdapterError` is the root of every exception the ``adapters`` package defines; the package
imports nothing from ``bridge``, so the root lives here. Details live in attributes, not in the text.

A :class:`Location` says where in the input a problem sits. Fields that do not apply to a format
stay ``None``: HL7 v2 uses message/segment/field/repetition/component, C-CDA uses ``xpath`` and
``line``, CSV uses ``line`` and ``column``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Location:
    """Where in an input something was found. All positions are 1-based, as in HL7 v2 specs."""

    file: str | None = None
    message_index: int | None = None
    line: int | None = None
    segment: str | None = None
    segment_index: int | None = None
    field: int | None = None
    repetition: int | None = None
    component: int | None = None
    subcomponent: int | None = None
    column: str | None = None
    xpath: str | None = None

    def with_file(self, file: str | None) -> Location:
        if file is None or self.file == file:
            return self
        d = asdict(self)
        d["file"] = file
        return Location(**d)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def __str__(self) -> str:
        parts: list[str] = []
        if self.file:
            parts.append(self.file)
        if self.message_index is not None:
            parts.append(f"message {self.message_index}")
        if self.line is not None:
            parts.append(f"line {self.line}")
        if self.segment:
            seg = self.segment
            if self.field is not None:
                seg += f"-{self.field}"
                if self.repetition is not None and self.repetition > 1:
                    seg += f"[{self.repetition}]"
                if self.component is not None:
                    seg += f".{self.component}"
                    if self.subcomponent is not None:
                        seg += f".{self.subcomponent}"
            parts.append(f"segment {seg}")
        if self.column:
            parts.append(f"column {self.column}")
        if self.xpath:
            parts.append(self.xpath)
        return ", ".join(parts) if parts else "(unknown location)"


class AdapterError(Exception):
    """The root of every error of the adapters, their shared parts and the adapter registry."""


class AdapterNotFound(AdapterError):
    def __init__(self, name: str, available: list[str]) -> None:
        super().__init__(f"no adapter named {name!r}; available: {', '.join(available) or 'none'}")
        self.name = name
        self.available = available


class AdapterLoadError(AdapterError):
    """An entry point in ``fhirbridge.adapters`` is broken (import failure, duplicate, wrong type)."""

    def __init__(self, entry_point: str, reason: str) -> None:
        super().__init__(f"adapter entry point {entry_point}: {reason}")
        self.entry_point = entry_point
        self.reason = reason


class ParseError(AdapterError):
    """The input cannot be converted. Carries the adapter name and a :class:`Location`."""

    def __init__(self, message: str, *, adapter: str, location: Location | None = None) -> None:
        self.message = message
        self.adapter = adapter
        self.location = location or Location()
        super().__init__(self.message)

    def __str__(self) -> str:
        return f"{self.adapter}: {self.location}: {self.message}"

    def __reduce__(self) -> tuple[Any, ...]:
        # keyword-only arguments: the default exception pickling (cls(*args)) would lose them
        return (_rebuild_parse_error, (type(self), self.message, self.adapter, self.location))

    def to_dict(self) -> dict[str, Any]:
        return {"adapter": self.adapter, "message": self.message, "location": self.location.to_dict()}


class InternalAdapterError(ParseError):
    """The adapter failed on this record because of a bug in the adapter, not in the input.

    Reported like a :class:`ParseError` (located, never a traceback), but the conformance kit counts it
    as a crash.
    """


def _rebuild_parse_error(cls: type[ParseError], message: str, adapter: str, location: Location) -> ParseError:
    return cls(message, adapter=adapter, location=location)


class ValidationFailed(AdapterError):
    """The bundle an adapter produced failed R4B validation: a bug in the adapter, reported located."""

    def __init__(self, adapter: str, errors: list[dict[str, Any]], location: Location | None = None) -> None:
        self.adapter = adapter
        self.errors = errors
        self.location = location or Location()
        first = errors[0] if errors else {}
        super().__init__(
            f"{adapter}: {self.location}: produced a bundle that fails FHIR R4 validation: "
            f"{'.'.join(str(p) for p in first.get('loc', ()))}: {first.get('msg', '')}"
        )
