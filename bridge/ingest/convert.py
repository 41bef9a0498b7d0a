"""``fhirbridge convert``'s work: every input through an adapter into a directory, with a ``report.json``.

No Kafka: each bundle is written as ``<input>.<record>.json``; the report lists, per input, the bundles
with their location and the located errors and warnings. An adapter that crashes is reported as an
internal error of that input, never as a traceback.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from adapters.base import Adapter, ConvertedBundle, SourceInfo
from adapters.errors import InternalAdapterError
from bridge.errors import ERROR_ROOTS


def convert_to_directory(
    adapter: Adapter,
    source: SourceInfo,
    inputs: Sequence[Path],
    out: Path,
    on_file: Callable[[dict[str, Any]], None] = lambda entry: None,
) -> dict[str, Any]:
    """Convert ``inputs`` (files, or directories standing for every file under them) into ``out``, which
    exists; writes and returns the report (its ``status`` is ``error`` when any input had an error).
    ``on_file`` sees each input's report entry as it is finished."""
    files: list[dict[str, Any]] = []
    used_names: set[str] = set()
    any_error = False
    n_bundles = 0
    for path in inputs:
        entry: dict[str, Any] = {
            "file": str(path),
            "status": "ok",
            "bundles": [],
            "errors": [],
            "warnings": [],
        }
        stem = _safe(path.name if path.is_dir() else path.stem) or "input"
        base = stem
        k = 2
        while base in used_names:
            base = f"{stem}-{k}"
            k += 1
        used_names.add(base)
        try:
            for i, outcome in enumerate(adapter.convert_path(path, source), start=1):
                if isinstance(outcome, ConvertedBundle):
                    name = f"{base}.{i:04d}.json"
                    (out / name).write_bytes(outcome.body)
                    n_bundles += 1
                    warnings = [w.to_dict() for w in outcome.warnings]
                    entry["bundles"].append(
                        {
                            "output": name,
                            "record": i,
                            "message_id": outcome.message_id,
                            "routing_key": outcome.routing_key,
                            "sha256": outcome.sha256,
                            "resources": len(outcome.bundle.get("entry", [])),
                            "warnings": len(warnings),
                            "location": outcome.location.to_dict(),
                        }
                    )
                    for w in warnings:
                        entry["warnings"].append({"record": i, **w})
                else:
                    err = outcome.error
                    entry["errors"].append(
                        {
                            "record": i,
                            "message": err.message,
                            "location": err.location.to_dict(),
                            "where": str(err.location),
                            "message_id": outcome.message_id,
                            "internal": isinstance(err, InternalAdapterError),
                        }
                    )
        except ERROR_ROOTS as exc:
            entry["errors"].append({"message": str(exc), "location": {"file": str(path)}, "where": str(path)})
        except OSError as exc:
            entry["errors"].append(
                {
                    "message": f"cannot read: {exc.strerror}",
                    "location": {"file": str(path)},
                    "where": str(path),
                }
            )
        except Exception as exc:  # a crashing adapter must still not print a traceback
            entry["errors"].append(
                {
                    "message": f"internal error in adapter {adapter.name}: {type(exc).__name__}: {exc}",
                    "location": {"file": str(path)},
                    "where": str(path),
                    "internal": True,
                }
            )
        if entry["errors"]:
            entry["status"] = "error"
            any_error = True
        files.append(entry)
        on_file(entry)
    summary = {
        "files": len(files),
        "files_with_errors": sum(f["status"] == "error" for f in files),
        "bundles": n_bundles,
        "warnings": sum(len(f["warnings"]) for f in files),
    }
    report = {
        "adapter": adapter.name,
        "adapter_version": getattr(adapter, "version", None),
        "source": source.org_id,
        "status": "error" if any_error else "ok",
        "summary": summary,
        "files": files,
    }
    (out / "report.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    return report


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._")
