"""``fhirbridge auth ...``: the embedded authorization server's clients, users and signing key, and a
backend-services token for scripts (docs/auth.md).

* ``auth clients add|list|remove``: a backend service (``--jwks-file`` or ``--jwks-uri``, system/
  scopes) or a SMART app (``--public --redirect-uri``, its scopes);
* ``auth users add|list|remove``: a clinician, data steward or patient; the password comes from
  ``--password-file`` or ``FHIRBRIDGE_AUTH_PASSWORD``, never from the command line;
* ``auth rotate-key``: a new signing key; tokens signed with the old one stay valid until they expire;
* ``auth keygen``: a key pair for a backend-services client (the private JWK, mode 0600, and its JWKS);
* ``auth token``: a client-credentials exchange at a running service; prints the access token.

Heavy modules are imported inside the handlers so that building the CLI stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from bridge.cli._common import fail, settings

PASSWORD_ENV = "FHIRBRIDGE_AUTH_PASSWORD"
EXIT_USAGE = 2


def register(sub: Any, groups: dict[str, Any]) -> None:
    auth = sub.add_parser(
        "auth",
        help="the embedded OAuth 2 authorization server: clients, users, signing key, tokens",
        description="The embedded SMART on FHIR authorization server (docs/auth.md). Its database is "
        "FHIRBRIDGE_AUTH_URL (default sqlite://<data>/auth.db), its keys under FHIRBRIDGE_AUTH_KEYS_DIR.",
    )
    asub = auth.add_subparsers(dest="auth_command", metavar="SUBCOMMAND", parser_class=type(auth))
    asub.required = True

    clients = asub.add_parser("clients", help="register, list and remove clients")
    csub = clients.add_subparsers(dest="clients_command", metavar="SUBCOMMAND", parser_class=type(auth))
    csub.required = True
    p = csub.add_parser(
        "add",
        help="register a backend service (--jwks-file/--jwks-uri) or a SMART app (--public)",
        description="A backend service authenticates with assertions signed by a key of its JWKS "
        "(private_key_jwt, RS384 or ES384) and is granted system/ scopes. A SMART app is public: it "
        "signs in users through /auth/authorize with PKCE, and its redirect URIs are matched exactly. "
        "A client with keys and --redirect-uri can do both.",
    )
    p.add_argument("--id", required=True, help="the client id")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--jwks-file", type=Path, metavar="FILE", help="the client's public JWKS (JSON)")
    how.add_argument("--jwks-uri", metavar="URL", help="where the client publishes its JWKS (https)")
    how.add_argument("--public", action="store_true", help="a public SMART app (no credentials)")
    p.add_argument(
        "--redirect-uri", action="append", default=[], metavar="URI", help="a redirect URI (repeatable)"
    )
    p.add_argument(
        "--scope",
        action="append",
        required=True,
        metavar="SCOPES",
        help='the scopes it may be granted, space-separated (repeatable), e.g. "system/*.rs"',
    )
    p.set_defaults(func=_clients_add)
    p = csub.add_parser("list", help="list the registered clients")
    p.set_defaults(func=_clients_list)
    p = csub.add_parser("remove", help="remove a client (its unused codes go too)")
    p.add_argument("--id", required=True, help="the client id")
    p.set_defaults(func=_clients_remove)

    users = asub.add_parser("users", help="add, list and remove users of the sign-in form")
    usub = users.add_subparsers(dest="users_command", metavar="SUBCOMMAND", parser_class=type(auth))
    usub.required = True
    p = usub.add_parser(
        "add",
        allow_abbrev=False,  # else --password would be taken for --password-file, a password in argv
        help="add a clinician, data steward or patient",
        description=f"The password is read from --password-file or from {PASSWORD_ENV}, never from the "
        "command line (which other users of the machine can see); it is stored as an argon2id hash.",
    )
    p.add_argument("--id", required=True, help="the user id they sign in with")
    p.add_argument("--kind", required=True, choices=("clinician", "steward", "patient"))
    p.add_argument(
        "--organization",
        default=None,
        help="the organisation of a clinician or steward (default FHIRBRIDGE_AUTH_ORGANIZATION, local)",
    )
    p.add_argument(
        "--fhir-user", default=None, metavar="REF", help="e.g. Practitioner/123 (clinicians: required)"
    )
    p.add_argument(
        "--patient", default=None, metavar="PID", help="a patient's Patient id (patients: required)"
    )
    p.add_argument(
        "--password-file", type=Path, default=None, metavar="FILE", help="a file holding the password"
    )
    p.set_defaults(func=_users_add)
    p = usub.add_parser("list", help="list the users (no password hashes)")
    p.set_defaults(func=_users_list)
    p = usub.add_parser("remove", help="remove a user (their unused codes go too)")
    p.add_argument("--id", required=True, help="the user id")
    p.set_defaults(func=_users_remove)

    p = asub.add_parser(
        "rotate-key",
        help="make a new token signing key; tokens signed with the old one stay valid until they expire",
    )
    p.set_defaults(func=_rotate_key)

    p = asub.add_parser(
        "keygen",
        help="write a backend-services client key pair: NAME.jwk (private, 0600) and NAME.jwks.json",
    )
    p.add_argument("--name", required=True, help="file name stem, e.g. the client id")
    p.add_argument("--out", type=Path, default=Path("."), help="directory to write to (default: .)")
    p.add_argument("--alg", choices=("ES384", "RS384"), default="ES384", help="default ES384 (EC P-384)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(func=_keygen)

    p = asub.add_parser(
        "login",
        help="sign in as a user (authorization code with PKCE) and print the access token",
        description="Signs in on the embedded server's form as a registered user, as a public SMART app "
        "would (its client id and one of its redirect URIs; the redirect is read, not followed), and prints "
        "the access token alone. The password is read from FHIRBRIDGE_AUTH_PASSWORD or, without it, "
        "asked for; never from the command line.",
    )
    p.add_argument("--client", required=True, help="the public app's client id")
    p.add_argument("--redirect-uri", required=True, help="one of the app's registered redirect URIs")
    p.add_argument("--user", required=True, help="the user id to sign in as")
    p.add_argument("--scope", action="append", required=True, metavar="SCOPES", help="scopes to ask for")
    p.add_argument(
        "--purpose", default=None, metavar="CODES", help="the purpose of use to state, e.g. ETREAT"
    )
    p.add_argument("--base", default=None, help="the FHIR base (default: the service's)")
    p.set_defaults(func=_login)

    p = asub.add_parser(
        "token",
        help="get an access token by client credentials (private_key_jwt) and print it",
        description="Signs a client assertion with the client's private key, exchanges it at the token "
        'URL of a running service, and prints the access token alone (for curl -H "Authorization: Bearer ...").',
    )
    p.add_argument("--client", required=True, help="the client id")
    p.add_argument("--key-file", required=True, type=Path, help="the client's private key: a JWK or PEM file")
    p.add_argument("--scope", action="append", required=True, metavar="SCOPES", help="scopes to ask for")
    p.add_argument(
        "--purpose",
        default=None,
        metavar="CODES",
        help="the purpose of use to state, v3-ActReason codes (e.g. TREAT, PUBHLTH); a system/ token "
        "without one reads no patient data",
    )
    p.add_argument(
        "--url",
        default=None,
        help="the token URL (default <FHIRBRIDGE_PUBLIC_URL, else the service's address>/auth/token)",
    )
    p.set_defaults(func=_token)


def _scopes(values: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(s for v in values for s in v.split()))


def _store() -> Any:
    from bridge.stores.auth import AuthStore

    return AuthStore.open(settings().auth.url)


# -- clients --------------------------------------------------------------------------------------
def _clients_add(args: argparse.Namespace) -> int:
    import orjson

    from bridge.stores.auth import AuthClient

    jwks = None
    if args.jwks_file is not None:
        try:
            jwks = orjson.loads(args.jwks_file.read_bytes())
        except OSError as exc:
            return fail(f"cannot read {args.jwks_file}: {exc.strerror}")
        except orjson.JSONDecodeError:
            return fail(f"{args.jwks_file} is not JSON")
        if not isinstance(jwks, dict):
            return fail(f"{args.jwks_file} is not a JWKS (a JSON object with 'keys')")
    client = AuthClient(
        client_id=args.id,
        kind="public" if args.public else "confidential-asymmetric",
        scopes=_scopes(args.scope),
        redirect_uris=tuple(args.redirect_uri),
        jwks=jwks,
        jwks_uri=args.jwks_uri,
    )
    store = _store()
    try:
        store.add_client(client)
    finally:
        store.close()
    print(f"client {client.client_id} registered ({client.kind}); scopes: {' '.join(client.scopes)}")
    return 0


def _clients_list(args: argparse.Namespace) -> int:
    store = _store()
    try:
        clients = store.clients()
    finally:
        store.close()
    for c in clients:
        keys = "jwks_uri " + str(c.jwks_uri) if c.jwks_uri else ("jwks" if c.jwks else "no keys")
        redirects = " ".join(c.redirect_uris) or "-"
        print(f"{c.client_id}\t{c.kind}\t{keys}\tscopes: {' '.join(c.scopes)}\tredirect URIs: {redirects}")
    return 0


def _clients_remove(args: argparse.Namespace) -> int:
    store = _store()
    try:
        store.remove_client(args.id)
    finally:
        store.close()
    print(f"client {args.id} removed")
    return 0


# -- users ----------------------------------------------------------------------------------------
def _users_add(args: argparse.Namespace) -> int:
    from bridge.stores.auth import AuthUser

    if args.password_file is not None:
        try:
            password = args.password_file.read_text(encoding="utf-8")
        except OSError as exc:
            return fail(f"cannot read {args.password_file}: {exc.strerror}")
        except UnicodeDecodeError:
            return fail(f"{args.password_file} is not UTF-8 text")
        password = password[:-1] if password.endswith("\n") else password
        password = password[:-1] if password.endswith("\r") else password
    elif os.environ.get(PASSWORD_ENV):
        password = os.environ[PASSWORD_ENV]
    else:
        return fail(f"give the password with --password-file FILE or in {PASSWORD_ENV}", EXIT_USAGE)
    config = settings()
    organization = args.organization
    if organization is None and args.kind in ("clinician", "steward"):
        organization = config.auth.organization
    user = AuthUser(
        user_id=args.id,
        kind=args.kind,
        organization=organization,
        fhir_user=args.fhir_user,
        patient_id=args.patient,
    )
    store = _store()
    try:
        store.add_user(user, password)
    finally:
        store.close()
    print(f"user {user.user_id} added ({user.kind})")
    return 0


def _users_list(args: argparse.Namespace) -> int:
    store = _store()
    try:
        users = store.users()
    finally:
        store.close()
    for u in users:
        print(
            f"{u.user_id}\t{u.kind}\torganization: {u.organization or '-'}\tfhirUser: {u.fhir_user or '-'}"
            f"\tpatient: {u.patient_id or '-'}"
        )
    return 0


def _users_remove(args: argparse.Namespace) -> int:
    store = _store()
    try:
        store.remove_user(args.id)
    finally:
        store.close()
    print(f"user {args.id} removed")
    return 0


# -- keys and tokens ------------------------------------------------------------------------------
def _rotate_key(args: argparse.Namespace) -> int:
    from bridge.service.auth.keys import CLOCK_SKEW, rotate

    config = settings()
    ring = rotate(config.auth.keys_dir, config.auth.token_lifetime)
    previous = ring.retired[0].jwk.get("kid")
    print(
        f"new signing key {ring.kid}; the previous key {previous} stays published for "
        f"{config.auth.token_lifetime + CLOCK_SKEW} s, until the tokens it signed have expired"
    )
    return 0


def _keygen(args: argparse.Namespace) -> int:
    import orjson

    from bridge.service.auth.client import generate_client_key

    base = "".join(c if c.isalnum() or c in "-_." else "_" for c in args.name)
    private, public = args.out / f"{base}.jwk", args.out / f"{base}.jwks.json"
    if not args.force and (private.exists() or public.exists()):
        return fail(f"{private} or {public} exists; use --force to overwrite")
    key = generate_client_key(args.alg)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(orjson.dumps(key.as_dict(private=True), option=orjson.OPT_INDENT_2) + b"\n")
        public.write_bytes(
            orjson.dumps({"keys": [key.as_dict(private=False)]}, option=orjson.OPT_INDENT_2) + b"\n"
        )
    except OSError as exc:
        return fail(f"cannot write the key files: {exc.strerror}")
    print(f"private key: {private}")
    print(f"public JWKS: {public}  (fhirbridge auth clients add --id ID --jwks-file {public} --scope ...)")
    return 0


def _login(args: argparse.Namespace) -> int:
    import getpass

    from bridge.service.auth.client import sign_in

    password = os.environ.get("FHIRBRIDGE_AUTH_PASSWORD") or getpass.getpass(f"password for {args.user}: ")
    base = (args.base or settings().http.fhir_base()).rstrip("/")
    answer = sign_in(
        base,
        args.client,
        args.redirect_uri,
        args.user,
        password,
        " ".join(_scopes(args.scope)),
        purpose=args.purpose,
    )
    print(answer["access_token"])
    print(f"granted: {answer.get('scope')}; expires in {answer.get('expires_in')} s", file=sys.stderr)
    return 0


def _token(args: argparse.Namespace) -> int:
    from bridge.service.auth.client import load_client_key, request_token

    url = args.url or default_token_url()
    key = load_client_key(args.key_file)
    answer = request_token(url, args.client, key, " ".join(_scopes(args.scope)), purpose=args.purpose)
    print(answer["access_token"])
    if answer.get("scope") is not None:
        print(f"granted: {answer['scope']}; expires in {answer.get('expires_in')} s", file=sys.stderr)
    return 0


def default_token_url() -> str:
    """The embedded issuer's token endpoint: ``<FHIR base>/auth/token`` (:meth:`HttpSettings.fhir_base`)."""
    return f"{settings().http.fhir_base()}/auth/token"
