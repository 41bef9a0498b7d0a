"""Configuration from environment variables (12-factor). Every knob is listed in the README.

Defaults give a self-contained single-machine setup: SQLite files under ``FHIRBRIDGE_DATA_DIR`` and a
local Kafka-compatible broker when ``KAFKA_BOOTSTRAP_SERVERS`` is unset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from kafka import codec

from bridge.errors import ConfigError


def _choice(env: dict[str, str], name: str, choices: tuple[str, ...]) -> str:
    """One of ``choices`` (the first is the default), or a ConfigError naming the variable."""
    value = env.get(name, choices[0]).strip().lower() or choices[0]
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _int(env: dict[str, str], name: str, default: int, minimum: int | None = 1) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {raw!r}")
    return value


def _read_key(path: Path | None) -> str | None:
    """A signed-note key file's one line, or None when there is no such file."""
    if path is not None and path.is_file():
        return path.read_text(encoding="utf-8").strip()
    return None


@dataclass(frozen=True, slots=True)
class Topics:
    bundles: str = "fhir.bundles"
    deadletter: str = "fhir.deadletter"
    receipts: str = "ledger.receipts"
    #: the Patient versions the index keeps, for the MPI linker (FHIRBRIDGE_MPI_LINKER=topic, docs/mpi.md)
    mpi: str = "mpi.patients"
    # room to scale: consumers of a group share partitions, and partitions cannot be added later without
    # moving keys (a patient's versions) to other partitions, out of order (docs/deploy.md)
    partitions: int = 12
    replication: int = 1
    retention_ms: int = -1  # keep forever: the topic is the replay source of truth
    max_message_bytes: int = 8 * 1024 * 1024


KAFKA_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
KAFKA_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER")


@dataclass(frozen=True, slots=True)
class KafkaSecurity:
    """How every Kafka client connects (docs/streams.md#secured-connections): the security protocol, the
    TLS files, and the SASL mechanism with its credentials; turned into kafka-python's keyword arguments
    by :func:`bridge.stream.security.client_kwargs`. Secrets come from ``*_FILE`` variables or the
    environment, never from the command line, and are kept out of ``repr``."""

    protocol: str = "PLAINTEXT"  # PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL
    ssl_cafile: Path | None = None  # the CA bundle the brokers' certificates chain to (None: the system's)
    ssl_certfile: Path | None = None  # this client's certificate (mutual TLS), PEM
    ssl_keyfile: Path | None = None  # its private key, PEM
    ssl_key_password: str | None = field(default=None, repr=False)
    ssl_crlfile: Path | None = None
    ssl_check_hostname: bool = True
    sasl_mechanism: str | None = None  # PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512 | OAUTHBEARER
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    sasl_oauth_token_file: Path | None = None  # OAUTHBEARER: read again for every authentication

    @property
    def tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    def describe(self) -> str:
        """``SASL_SSL, SCRAM-SHA-512 as 'alice'``: the protocol and mechanism, for messages (no secret)."""
        if self.sasl_mechanism is None:
            return self.protocol + (", client certificate" if self.ssl_certfile else "")
        who = f" as {self.sasl_username!r}" if self.sasl_username else ""
        return f"{self.protocol}, {self.sasl_mechanism}{who}"


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    """The broker, the topics, and how producers and consumers talk to them (docs/streams.md)."""

    bootstrap_servers: str | None = None
    local_broker: str = "noida"  # noida | kafka | tansu: which local broker to start when there is no cluster
    topics: Topics = field(default_factory=Topics)
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 1500
    max_poll_interval_ms: int = 20000
    consumer_instance_id: str | None = None
    static_membership: str = "auto"  # auto | on | off (bridge/consumers/runtime.py static_membership)
    consumer_batch_size: int = 500
    consumer_linger_ms: int = 50  # wait this long after a batch's first record for more (docs/streams.md)
    consumer_idle_sleep_ms: int = 20  # sleep between polls that return less than a full batch
    consumer_idle_max_sleep_ms: int = 100  # ...doubling while nothing arrives, up to this (decision 37)
    max_request_size: int = 8 * 1024 * 1024
    ingest_linger_ms: int = 50  # producer linger of `fhirbridge ingest` (MLLP and the consumers keep 10 ms)
    compression: str | None = "gzip"  # producer compression_type (None: off); docs/streams.md#producer
    security: KafkaSecurity = field(default_factory=KafkaSecurity)  # docs/streams.md#secured-connections
    bootstrap_timeout_ms: int = 15000  # a client's first metadata answer, else the command fails


@dataclass(frozen=True, slots=True)
class LedgerSettings:
    """The Merkle ledger: its database, checkpoint origin and signing key, checkpoint cadence, witnesses."""

    url: str = ""
    origin: str = "fhirbridge.example/ledger"
    key_file: Path | None = None
    checkpoint_every: int = 1000
    checkpoint_interval_ms: int = 1000
    witness_keys: tuple[str, ...] = ()
    # C2SP tlog-witness submission URLs: the writer asks each to cosign new checkpoints (docs/ledger.md)
    tlog_witnesses: tuple[str, ...] = ()
    # single writer: a standby takes over this long after a leader stops answering (docs/deploy.md)
    leader_lease_s: float = 10.0

    def signer_key(self) -> str | None:
        """The ledger's signed-note private key, read from ``key_file`` when it exists."""
        return _read_key(self.key_file)

    def verifier_key(self) -> str | None:
        """The verifier key in the ``.pub`` file beside ``key_file``, when there is one."""
        return _read_key(self.key_file.with_suffix(".pub") if self.key_file else None)


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """The databases the consumers write and the service reads (the ledger's is in LedgerSettings)."""

    index_url: str = ""
    mpi_url: str = ""
    #: who links Patients into persons: ``inline`` (each index consumer, in-process: only one may run)
    #: or ``topic`` (index consumers publish to ``Topics.mpi``; ``fhirbridge mpi run`` links; docs/mpi.md)
    mpi_linker: str = "inline"


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """A listener's certificate and key (PEM files) and, for mutual TLS, the CA its clients' certificates
    must chain to; checked and turned into an ``ssl.SSLContext`` by :func:`bridge.tls.server_context`."""

    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = None

    @property
    def enabled(self) -> bool:
        """Any of the three is set: the listener then serves TLS, or refuses to start."""
        return any(f is not None for f in (self.cert_file, self.key_file, self.client_ca_file))

    def with_paths(
        self, cert_file: Path | None, key_file: Path | None, client_ca_file: Path | None
    ) -> TlsSettings:
        """These settings with the paths given (the CLI's ``--tls-*`` options) in place; ``None`` keeps one."""
        return TlsSettings(
            cert_file=cert_file or self.cert_file,
            key_file=key_file or self.key_file,
            client_ca_file=client_ca_file or self.client_ca_file,
        )


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """The query service's address, the names it answers for (docs/query.md), and its TLS."""

    host: str = "127.0.0.1"
    port: int = 8080
    public_base_url: str | None = None
    allowed_hosts: tuple[
        str, ...
    ] = ()  # Host header names the service answers (empty: see allowed_host_names)
    tls: TlsSettings = field(default_factory=TlsSettings)

    def fhir_base(self) -> str:
        """The service's one FHIR base URL, the ``aud`` of its access tokens and the base of its embedded
        issuer: ``FHIRBRIDGE_PUBLIC_URL``, else the scheme, bind address and port (loopback for a bind to
        every interface). Links in answers still follow the request's ``Host`` (:func:`base_url`)."""
        if self.public_base_url:
            return self.public_base_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.tls.enabled else 'http'}://{host}:{self.port}"

    def allowed_host_names(self) -> frozenset[str] | None:
        """The host names a request's ``Host`` may carry; ``None`` means any.

        Without a public URL the service builds its links (``fullUrl``, paging) from ``Host``, so it
        must not answer for a name it was not given: ``FHIRBRIDGE_ALLOWED_HOSTS``, else the bind
        address and the loopback names. With ``FHIRBRIDGE_PUBLIC_URL`` the links come from that URL,
        and a reverse proxy may send any ``Host``, unless ``FHIRBRIDGE_ALLOWED_HOSTS`` is set as well.
        """
        if self.allowed_hosts:
            return frozenset(self.allowed_hosts)
        if self.public_base_url:
            return None
        names = {"localhost", "127.0.0.1", "::1"}
        if self.host not in ("", "0.0.0.0", "::"):
            names.add(self.host.strip("[]").lower())
        return frozenset(names)


@dataclass(frozen=True, slots=True)
class MllpSettings:
    """The MLLP listener's TLS (its address and options come from ``fhirbridge mllp``'s arguments)."""

    tls: TlsSettings = field(default_factory=TlsSettings)


@dataclass(frozen=True, slots=True)
class TrustSettings:
    """The source organisations' signing keys and the registry of keys the consumers trust (docs/envelope.md)."""

    registry_file: Path | None = None
    signing_keys_dir: Path | None = None


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """The embedded OAuth 2 authorization server (docs/auth.md): its database, the organisation its users
    belong to by default, its signing keys, the token issuers the resource server trusts, the token lifetime."""

    url: str = ""
    organization: str = "local"
    keys_dir: Path = Path("var/auth/keys")
    issuers_file: Path = Path("var/auth/issuers.toml")
    token_lifetime: int = 300  # seconds; at most 300 (SMART Backend Services)


@dataclass(frozen=True, slots=True)
class AuditSettings:
    """The access audit (docs/audit.md): the database of AuditEvents the service writes, and the second
    Merkle log (its database, checkpoint origin and signing key) into which ``fhirbridge audit run``
    appends their hashes."""

    url: str = ""
    origin: str = "fhirbridge.example/ledger/audit"
    key_file: Path | None = None
    log_url: str = ""

    def signer_key(self) -> str | None:
        """The audit log's signed-note private key, read from ``key_file`` when it exists."""
        return _read_key(self.key_file)

    def verifier_key(self) -> str | None:
        """The verifier key in the ``.pub`` file beside ``key_file``, when there is one."""
        return _read_key(self.key_file.with_suffix(".pub") if self.key_file else None)


@dataclass(frozen=True, slots=True)
class ConsentSettings:
    """Patient consent and break-the-glass (docs/consent.md): the base policy when no Consent decides
    (``permit``: opt-out; ``deny``: opt-in), how long a break-the-glass override lasts, and the
    organisations whose clinicians may break the glass (none by default)."""

    default: str = "permit"
    break_glass_minutes: int = 60
    break_glass_organizations: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class ExportSettings:
    """Bulk Data export (docs/bulk.md): the jobs' database, the directory of the NDJSON files, how long a
    finished export is kept, when a file is split (lines, or distinct patients: each download is audited
    with one AuditEvent per patient it holds), the rows read per page, and how many exports run at once."""

    url: str = ""
    directory: Path = Path("var/exports")
    expiry_minutes: int = 60
    file_lines: int = 100_000
    file_patients: int = 2_000
    page_rows: int = 1_000
    max_running: int = 2


@dataclass(frozen=True, slots=True)
class UiSettings:
    """The clinician web app (docs/ui.md): the public OAuth client it signs users in with, the scopes it
    asks for, and the base URL of the API it reads through (empty: this process's own listening socket)."""

    client_id: str = "fhirbridge-ui"
    scope: str = "openid fhirUser user/*.rs"
    api_url: str = ""
    #: added to ``scope`` by a steward's sign-in (``/app/login?role=steward``): the MPI's link and unlink
    steward_scope: str = "user/Person.u"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a fhirbridge process needs to know, grouped by what it is about. Build with :meth:`from_env`."""

    data_dir: Path = Path("var")
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    ledger: LedgerSettings = field(default_factory=LedgerSettings)
    stores: StoreSettings = field(default_factory=StoreSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    mllp: MllpSettings = field(default_factory=MllpSettings)
    trust: TrustSettings = field(default_factory=TrustSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    consent: ConsentSettings = field(default_factory=ConsentSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    ui: UiSettings = field(default_factory=UiSettings)
    gc_threshold: tuple[int, int, int] | None = (50_000, 20, 10)  # None: Python's default

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if environ is None else environ)
        data_dir = Path(env.get("FHIRBRIDGE_DATA_DIR", "var")).resolve()
        topics = Topics(
            bundles=env.get("FHIRBRIDGE_TOPIC_BUNDLES", "fhir.bundles"),
            deadletter=env.get("FHIRBRIDGE_TOPIC_DEADLETTER", "fhir.deadletter"),
            receipts=env.get("FHIRBRIDGE_TOPIC_RECEIPTS", "ledger.receipts"),
            mpi=env.get("FHIRBRIDGE_TOPIC_MPI", "mpi.patients"),
            partitions=_int(env, "FHIRBRIDGE_PARTITIONS", 12),
            replication=_int(env, "FHIRBRIDGE_REPLICATION", 1),
            retention_ms=_int(env, "FHIRBRIDGE_RETENTION_MS", -1, minimum=-1),
            max_message_bytes=_int(env, "FHIRBRIDGE_MAX_MESSAGE_BYTES", 8 * 1024 * 1024),
        )
        local = env.get("FHIRBRIDGE_LOCAL_BROKER", "noida")
        if local not in ("noida", "kafka", "tansu"):
            raise ConfigError(f"FHIRBRIDGE_LOCAL_BROKER must be 'noida', 'kafka' or 'tansu', got {local!r}")
        key_file = env.get("FHIRBRIDGE_LEDGER_KEY_FILE")
        trust = env.get("FHIRBRIDGE_TRUST_REGISTRY")
        signing = env.get("FHIRBRIDGE_SIGNING_KEYS_DIR")
        mpi_linker = env.get("FHIRBRIDGE_MPI_LINKER", "inline")
        if mpi_linker not in ("inline", "topic"):
            raise ConfigError(f"FHIRBRIDGE_MPI_LINKER must be 'inline' or 'topic', got {mpi_linker!r}")
        return cls(
            data_dir=data_dir,
            kafka=KafkaSettings(
                bootstrap_servers=env.get("KAFKA_BOOTSTRAP_SERVERS") or None,
                local_broker=local,
                topics=topics,
                session_timeout_ms=_int(env, "FHIRBRIDGE_SESSION_TIMEOUT_MS", 6000),
                heartbeat_interval_ms=_int(env, "FHIRBRIDGE_HEARTBEAT_INTERVAL_MS", 1500),
                max_poll_interval_ms=_int(env, "FHIRBRIDGE_MAX_POLL_INTERVAL_MS", 20000),
                consumer_instance_id=env.get("FHIRBRIDGE_CONSUMER_INSTANCE_ID") or None,
                static_membership=_choice(
                    env, "FHIRBRIDGE_CONSUMER_STATIC_MEMBERSHIP", ("auto", "on", "off")
                ),
                consumer_batch_size=_int(env, "FHIRBRIDGE_CONSUMER_BATCH", 500),
                consumer_linger_ms=_int(env, "FHIRBRIDGE_CONSUMER_LINGER_MS", 50, minimum=0),
                consumer_idle_sleep_ms=_int(env, "FHIRBRIDGE_CONSUMER_IDLE_SLEEP_MS", 20),
                consumer_idle_max_sleep_ms=_int(env, "FHIRBRIDGE_CONSUMER_IDLE_MAX_SLEEP_MS", 100),
                max_request_size=_int(env, "FHIRBRIDGE_MAX_REQUEST_SIZE", 8 * 1024 * 1024),
                ingest_linger_ms=_int(env, "FHIRBRIDGE_INGEST_LINGER_MS", 50, minimum=0),
                compression=_compression(env.get("FHIRBRIDGE_COMPRESSION", "gzip")),
                security=_kafka_security(env),
                bootstrap_timeout_ms=_int(env, "FHIRBRIDGE_KAFKA_BOOTSTRAP_TIMEOUT_MS", 15000),
            ),
            ledger=LedgerSettings(
                url=env.get("FHIRBRIDGE_LEDGER_URL") or f"sqlite://{data_dir / 'ledger.db'}",
                origin=env.get("FHIRBRIDGE_LEDGER_ORIGIN", "fhirbridge.example/ledger"),
                key_file=Path(key_file) if key_file else data_dir / "ledger.key",
                checkpoint_every=_int(env, "FHIRBRIDGE_CHECKPOINT_EVERY", 1000),
                checkpoint_interval_ms=_int(env, "FHIRBRIDGE_CHECKPOINT_INTERVAL_MS", 1000, minimum=0),
                witness_keys=tuple(
                    k for k in env.get("FHIRBRIDGE_LEDGER_WITNESS_KEYS", "").split(",") if k.strip()
                ),
                tlog_witnesses=tuple(
                    u.strip() for u in env.get("FHIRBRIDGE_LEDGER_TLOG_WITNESSES", "").split(",") if u.strip()
                ),
                leader_lease_s=_int(env, "FHIRBRIDGE_LEDGER_LEADER_LEASE_S", 10, minimum=2),
            ),
            stores=StoreSettings(
                index_url=env.get("FHIRBRIDGE_INDEX_URL") or f"sqlite://{data_dir / 'index.db'}",
                mpi_url=env.get("FHIRBRIDGE_MPI_URL") or f"sqlite://{data_dir / 'mpi.db'}",
                mpi_linker=mpi_linker,
            ),
            http=HttpSettings(
                host=env.get("FHIRBRIDGE_HTTP_HOST", "127.0.0.1"),
                port=_int(env, "FHIRBRIDGE_HTTP_PORT", 8080, minimum=0),
                public_base_url=env.get("FHIRBRIDGE_PUBLIC_URL") or None,
                allowed_hosts=tuple(
                    h.strip().lower() for h in env.get("FHIRBRIDGE_ALLOWED_HOSTS", "").split(",") if h.strip()
                ),
                tls=_tls(env, "FHIRBRIDGE_TLS"),
            ),
            mllp=MllpSettings(tls=_tls(env, "FHIRBRIDGE_MLLP_TLS")),
            trust=TrustSettings(
                registry_file=Path(trust) if trust else None,
                signing_keys_dir=Path(signing) if signing else None,
            ),
            auth=_auth(env, data_dir),
            audit=_audit(env, data_dir),
            consent=_consent(env),
            export=_export(env, data_dir),
            ui=UiSettings(
                client_id=env.get("FHIRBRIDGE_UI_CLIENT_ID") or "fhirbridge-ui",
                scope=env.get("FHIRBRIDGE_UI_SCOPE") or "openid fhirUser user/*.rs",
                api_url=(env.get("FHIRBRIDGE_UI_API_URL") or "").rstrip("/"),
                steward_scope=env.get("FHIRBRIDGE_UI_STEWARD_SCOPE") or "user/Person.u",
            ),
            gc_threshold=_gc_threshold(env.get("FHIRBRIDGE_GC_THRESHOLD", "50000,20,10")),
        )

    def with_bootstrap(self, bootstrap: str) -> Settings:
        return replace(self, kafka=replace(self.kafka, bootstrap_servers=bootstrap))

    def require_bootstrap(self) -> str:
        if not self.kafka.bootstrap_servers:
            raise ConfigError(
                "KAFKA_BOOTSTRAP_SERVERS is not set. Point it at a Kafka cluster, or start the embedded "
                "broker with `fhirbridge broker start` and export the address it prints."
            )
        return self.kafka.bootstrap_servers


def _tls(env: dict[str, str], prefix: str) -> TlsSettings:
    """``<prefix>_CERT_FILE``, ``_KEY_FILE``, ``_CLIENT_CA_FILE`` (paths; the files are read at start)."""

    def path(name: str) -> Path | None:
        value = env.get(f"{prefix}_{name}_FILE", "").strip()
        return Path(value) if value else None

    return TlsSettings(cert_file=path("CERT"), key_file=path("KEY"), client_ca_file=path("CLIENT_CA"))


def _secret(env: dict[str, str], name: str) -> str | None:
    """``<name>_FILE`` (the file's text, less its final newline) or ``<name>``; both set is an error."""
    path, value = env.get(f"{name}_FILE", "").strip(), env.get(name, "")
    if path and value:
        raise ConfigError(f"set {name}_FILE or {name}, not both")
    if not path:
        return value or None
    try:
        text = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"{name}_FILE: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{name}_FILE: {path} is not UTF-8 text") from None
    if not text:
        raise ConfigError(f"{name}_FILE: {path} is empty")
    return text


def _kafka_security(env: dict[str, str]) -> KafkaSecurity:
    """``FHIRBRIDGE_KAFKA_SECURITY_PROTOCOL``, ``FHIRBRIDGE_KAFKA_SSL_*`` and ``FHIRBRIDGE_KAFKA_SASL_*``
    (docs/streams.md#secured-connections), checked together: a combination the broker would refuse, or a
    file that is not there, is a ConfigError naming the variable."""
    pre = "FHIRBRIDGE_KAFKA_"
    protocol = env.get(f"{pre}SECURITY_PROTOCOL", "").strip().upper() or "PLAINTEXT"
    if protocol not in KAFKA_SECURITY_PROTOCOLS:
        raise ConfigError(
            f"{pre}SECURITY_PROTOCOL must be one of {', '.join(KAFKA_SECURITY_PROTOCOLS)}, got {protocol!r}"
        )
    tls, sasl = protocol in ("SSL", "SASL_SSL"), protocol.startswith("SASL_")

    def file(name: str) -> Path | None:
        value = env.get(f"{pre}{name}", "").strip()
        if not value:
            return None
        if not tls:
            raise ConfigError(f"{pre}{name} is set, but {pre}SECURITY_PROTOCOL={protocol} does not use TLS")
        if not Path(value).is_file():
            raise ConfigError(f"{pre}{name}: no such file {value}")
        return Path(value)

    cafile, certfile, keyfile, crlfile = (
        file(n) for n in ("SSL_CAFILE", "SSL_CERTFILE", "SSL_KEYFILE", "SSL_CRLFILE")
    )
    key_password = _secret(env, f"{pre}SSL_KEY_PASSWORD")
    if keyfile is not None and certfile is None:
        raise ConfigError(f"{pre}SSL_KEYFILE is set without {pre}SSL_CERTFILE (the client certificate)")
    if key_password is not None and certfile is None:
        raise ConfigError(f"{pre}SSL_KEY_PASSWORD is set without {pre}SSL_CERTFILE (the client certificate)")
    hostname = env.get(f"{pre}SSL_CHECK_HOSTNAME", "").strip().lower() or "true"
    if hostname not in ("true", "false", "1", "0", "yes", "no"):
        raise ConfigError(f"{pre}SSL_CHECK_HOSTNAME must be true or false, got {hostname!r}")

    mechanism = env.get(f"{pre}SASL_MECHANISM", "").strip().upper() or None
    username = env.get(f"{pre}SASL_USERNAME", "").strip() or None
    password = _secret(env, f"{pre}SASL_PASSWORD")
    token = env.get(f"{pre}SASL_OAUTH_TOKEN_FILE", "").strip() or None
    if mechanism is not None and not sasl:
        raise ConfigError(
            f"{pre}SASL_MECHANISM={mechanism} needs {pre}SECURITY_PROTOCOL SASL_SSL or SASL_PLAINTEXT, "
            f"got {protocol}"
        )
    if sasl and mechanism is None:
        raise ConfigError(f"{pre}SECURITY_PROTOCOL={protocol} needs {pre}SASL_MECHANISM")
    if mechanism is not None and mechanism not in KAFKA_SASL_MECHANISMS:
        raise ConfigError(
            f"{pre}SASL_MECHANISM must be one of {', '.join(KAFKA_SASL_MECHANISMS)}, got {mechanism!r}"
        )
    given = {
        f"{pre}SASL_USERNAME": username,
        f"{pre}SASL_PASSWORD": password,
        f"{pre}SASL_OAUTH_TOKEN_FILE": token,
    }
    if mechanism == "OAUTHBEARER":
        needed: tuple[str, ...] = (f"{pre}SASL_OAUTH_TOKEN_FILE",)
    elif mechanism is not None:
        needed = (f"{pre}SASL_USERNAME", f"{pre}SASL_PASSWORD")
    else:
        needed = ()
    for name, value in given.items():
        if value is not None and name not in needed:
            raise ConfigError(
                f"{name} is set, but {pre}SASL_MECHANISM={mechanism or '(none)'} does not use it"
            )
        if value is None and name in needed:
            how = " (or _FILE)" if name.endswith("PASSWORD") else ""
            raise ConfigError(f"{pre}SASL_MECHANISM={mechanism} needs {name}{how}")
    if token is not None and not Path(token).is_file():
        raise ConfigError(f"{pre}SASL_OAUTH_TOKEN_FILE: no such file {token}")
    return KafkaSecurity(
        protocol=protocol,
        ssl_cafile=cafile,
        ssl_certfile=certfile,
        ssl_keyfile=keyfile,
        ssl_key_password=key_password,
        ssl_crlfile=crlfile,
        ssl_check_hostname=hostname in ("true", "1", "yes"),
        sasl_mechanism=mechanism,
        sasl_username=username,
        sasl_password=password,
        sasl_oauth_token_file=Path(token) if token else None,
    )


def _auth(env: dict[str, str], data_dir: Path) -> AuthSettings:
    """``FHIRBRIDGE_AUTH_*``: defaults under ``<data>/auth`` (the database beside the others)."""
    keys = env.get("FHIRBRIDGE_AUTH_KEYS_DIR")
    issuers = env.get("FHIRBRIDGE_AUTH_ISSUERS")
    lifetime = _int(env, "FHIRBRIDGE_AUTH_TOKEN_LIFETIME", 300)
    if lifetime > 300:
        raise ConfigError(f"FHIRBRIDGE_AUTH_TOKEN_LIFETIME must be at most 300 seconds, got {lifetime}")
    return AuthSettings(
        url=env.get("FHIRBRIDGE_AUTH_URL") or f"sqlite://{data_dir / 'auth.db'}",
        organization=env.get("FHIRBRIDGE_AUTH_ORGANIZATION") or "local",
        keys_dir=Path(keys) if keys else data_dir / "auth" / "keys",
        issuers_file=Path(issuers) if issuers else data_dir / "auth" / "issuers.toml",
        token_lifetime=lifetime,
    )


def _consent(env: dict[str, str]) -> ConsentSettings:
    """``FHIRBRIDGE_CONSENT_DEFAULT`` (permit or deny), ``FHIRBRIDGE_BREAK_GLASS_MINUTES`` (1 to 1440),
    ``FHIRBRIDGE_BREAK_GLASS_ORGANIZATIONS`` (organisation ids separated by commas)."""
    default = env.get("FHIRBRIDGE_CONSENT_DEFAULT", "permit").strip().lower() or "permit"
    if default not in ("permit", "deny"):
        raise ConfigError(f"FHIRBRIDGE_CONSENT_DEFAULT must be permit or deny, got {default!r}")
    minutes = _int(env, "FHIRBRIDGE_BREAK_GLASS_MINUTES", 60)
    if not 1 <= minutes <= 1440:
        raise ConfigError(f"FHIRBRIDGE_BREAK_GLASS_MINUTES must be 1 to 1440, got {minutes}")
    orgs = frozenset(
        o.strip() for o in env.get("FHIRBRIDGE_BREAK_GLASS_ORGANIZATIONS", "").split(",") if o.strip()
    )
    return ConsentSettings(default=default, break_glass_minutes=minutes, break_glass_organizations=orgs)


def _audit(env: dict[str, str], data_dir: Path) -> AuditSettings:
    """``FHIRBRIDGE_AUDIT_*``: the databases beside the others, the origin under the ledger's."""
    key_file = env.get("FHIRBRIDGE_AUDIT_KEY_FILE")
    ledger_origin = env.get("FHIRBRIDGE_LEDGER_ORIGIN", "fhirbridge.example/ledger")
    return AuditSettings(
        url=env.get("FHIRBRIDGE_AUDIT_URL") or f"sqlite://{data_dir / 'audit.db'}",
        origin=env.get("FHIRBRIDGE_AUDIT_ORIGIN") or f"{ledger_origin}/audit",
        key_file=Path(key_file) if key_file else data_dir / "audit.key",
        log_url=env.get("FHIRBRIDGE_AUDIT_LOG_URL") or f"sqlite://{data_dir / 'audit-log.db'}",
    )


def _export(env: dict[str, str], data_dir: Path) -> ExportSettings:
    """``FHIRBRIDGE_EXPORT_*``: the jobs' database beside the others, the files under ``<data>/exports``."""
    directory = env.get("FHIRBRIDGE_EXPORT_DIR")
    return ExportSettings(
        url=env.get("FHIRBRIDGE_EXPORT_DB") or f"sqlite://{data_dir / 'exports.db'}",
        directory=Path(directory) if directory else data_dir / "exports",
        expiry_minutes=_int(env, "FHIRBRIDGE_EXPORT_EXPIRY_MINUTES", 60),
        file_lines=_int(env, "FHIRBRIDGE_EXPORT_FILE_LINES", 100_000),
        file_patients=_int(env, "FHIRBRIDGE_EXPORT_FILE_PATIENTS", 2_000),
        page_rows=_int(env, "FHIRBRIDGE_EXPORT_PAGE_ROWS", 1_000),
        max_running=_int(env, "FHIRBRIDGE_EXPORT_MAX_RUNNING", 2),
    )


COMPRESSION_TYPES = ("gzip", "snappy", "lz4", "zstd")


def _compression(value: str) -> str | None:
    v = value.strip().lower()
    if v in ("", "none"):
        return None
    if v not in COMPRESSION_TYPES:
        raise ConfigError(
            f"FHIRBRIDGE_COMPRESSION must be none or one of {', '.join(COMPRESSION_TYPES)}, got {value!r}"
        )
    if not getattr(codec, f"has_{v}")():
        raise ConfigError(
            f"FHIRBRIDGE_COMPRESSION={v} needs its codec library, which is not installed "
            f"(kafka-python's {v} extra); gzip needs none"
        )
    return v


def _gc_threshold(value: str) -> tuple[int, int, int] | None:
    if value.strip().lower() == "default":
        return None
    try:
        parts = tuple(int(p) for p in value.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or parts[0] < 1 or min(parts) < 0:
        raise ConfigError(
            f"FHIRBRIDGE_GC_THRESHOLD must be three integers like 50000,20,10 (or 'default'), got {value!r}"
        )
    return (parts[0], parts[1], parts[2])
