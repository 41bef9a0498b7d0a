"""``fhirbridge groups create|list|delete``: the groups of patients a Bulk Data export may name
(``GET /Group/{id}/$export``; docs/bulk.md). They live in the export store (``FHIRBRIDGE_EXPORT_DB``)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from bridge.cli._common import fail, settings


def register(sub: Any, groups: dict[str, Any]) -> None:
    """Add the ``groups`` group: ``create``, ``list`` and ``delete``."""
    help_text = "groups of patients for Bulk Data export (GET /Group/{id}/$export)"
    group = sub.add_parser("groups", help=help_text, description=help_text)
    gsub = group.add_subparsers(dest="groups_command", metavar="SUBCOMMAND")
    gsub.required = True

    p = gsub.add_parser(
        "create",
        help="define a group of patients",
        description="Define a group (a FHIR id, not starting with org-, which names the source organisations' "
        "groups) of Patient ids, given with --member or one a line in --members-file ('-' = stdin).",
    )
    p.add_argument("--id", required=True, help="the group's id (letters, digits, '-', '.'; at most 64)")
    p.add_argument("--name", default=None, help="a name for people (default: the id)")
    p.add_argument(
        "--member", action="append", default=[], metavar="PATIENT_ID", help="a member (repeatable)"
    )
    p.add_argument("--members-file", default=None, metavar="FILE", help="member Patient ids, one a line")
    p.set_defaults(func=cmd_create)

    p = gsub.add_parser("list", help="the defined groups: id, size, name")
    p.set_defaults(func=cmd_list)

    p = gsub.add_parser("delete", help="delete a defined group (exports already started are unaffected)")
    p.add_argument("--id", required=True)
    p.set_defaults(func=cmd_delete)


def _store() -> Any:
    from bridge.stores.exports import ExportStore

    return ExportStore.open(settings().export.url)


def cmd_create(args: argparse.Namespace) -> int:
    from bridge.stores.exports import ExportError

    members = list(args.member)
    if args.members_file is not None:
        try:
            text = (
                sys.stdin.read() if args.members_file == "-" else Path(args.members_file).read_text("utf-8")
            )
        except (OSError, UnicodeDecodeError) as exc:
            return fail(f"cannot read --members-file: {type(exc).__name__}")
        members += [line.strip() for line in text.splitlines() if line.strip()]
    if not members:
        return fail("a group needs at least one member (--member or --members-file)", 2)
    store = _store()
    try:
        group = store.create_group(args.id, args.name or args.id, members, now=int(time.time()))
    except ExportError as exc:
        return fail(str(exc))
    finally:
        store.close()
    print(f"group {group.id}: {len(group.members)} patients")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    store = _store()
    try:
        for group in store.groups():
            print(f"{group.id}\t{len(group.members)}\t{group.name}")
    finally:
        store.close()
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    store = _store()
    try:
        deleted = store.delete_group(args.id)
    finally:
        store.close()
    if not deleted:
        return fail(f"no group {args.id}")
    print(f"group {args.id} deleted")
    return 0
