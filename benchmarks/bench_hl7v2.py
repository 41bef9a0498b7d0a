"""Benchmark of the hl7v2 adapter: messages per second per core to validated bundles.

    .venv/bin/python benchmarks/bench_hl7v2.py [--seconds S] [--mllp] [--mllp-seconds S]

Prints, for an ADT^A01 and an ORU^R01 with 20 OBX (synthetic but realistic; both also checked to
validate) and for the 139 Microsoft samples:

* our rate (CPU time of this process, so per core) to validated bundles, and the share of that time
  spent in R4B validation (measured by converting with and without validation);
* the floor: python-hl7 (``hl7`` package) parsing the same messages plus R4B validation of our output
  (i.e. what a converter built on python-hl7 would at best achieve), and our speed-up over it;

each for three validation paths measured in the same run: plain ``Bundle.model_validate``, the
previous resource-body cache ("before") and the shape cache of ``adapters.validation`` ("after",
docs/validation.md). The floor uses the same validation path as the line it is printed on.

With ``--mllp`` it also starts an MLLP listener producing to a real broker (``KAFKA_BOOTSTRAP_SERVERS``,
else an embedded noida broker started for the run) and measures send-to-ACK latency p50/p99 at 200 msgs/s.
Other processes share the CPU on a busy machine: CPU time is less sensitive to that than wall time, but
the figures are still noisy.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters import bundle as _bundle_mod
from adapters.base import ConvertedBundle, SourceInfo
from adapters.bundle import validate_bundle
from adapters.hl7v2 import HL7v2Adapter
from adapters.validation import clear_cache

SAMPLES = Path(
    os.environ.get("FHIRBRIDGE_SAMPLES", Path(__file__).resolve().parents[2] / "shared" / "samples")
)
SRC = SourceInfo("bench", timezone="America/Chicago")

ADT_A01 = (
    "MSH|^~\\&|EPICADT|STMARY^2.16.840.1.113883.19.4^ISO|FHIRBRIDGE|FB|20240305143000-0600||ADT^A01^ADT_A01|"
    "MSG{n}|P|2.5.1|||AL|NE\r"
    "EVN|A01|20240305143000-0600||01^Patient request^HL70062|1234^NURSE^NANCY\r"
    "PID|1||MRN{n}^^^STMARY^MR~123-45-6789^^^SSA^SS||DOE^JANE^QUINN^^MS||19800229|F||2106-3^White^CDCREC|"
    "12 MAIN ST^APT 4^SPRINGFIELD^IL^62701^USA^H||^PRN^PH^^1^217^5551234~^NET^Internet^jane@example.com|"
    "^WPN^PH^^1^217^5559999|EN^English^ISO639|M^Married^HL70002||ACCT{n}^^^STMARY^AN|||"
    "N^Not Hispanic or Latino^CDCREC\r"
    "NK1|1|DOE^JOHN|SPO^Spouse^HL70063|12 MAIN ST^^SPRINGFIELD^IL^62701^USA|^PRN^PH^^1^217^5550000||"
    "EC^Emergency Contact^HL70131\r"
    "PV1|1|I|4W^401^B^STMARY^^^MAIN^4|E|||1234567890^WELBY^MARCUS^^^DR^^^NPI&2.16.840.1.113883.4.6&ISO||"
    "|MED||||7|||1234567890^WELBY^MARCUS^^^DR^^^NPI&2.16.840.1.113883.4.6&ISO|IP|V{n}^^^STMARY^VN|"
    "||||||||||||||||||||||||20240305142500\r"
    "PV2|||R07.9^Chest pain, unspecified^I10\r"
    "AL1|1|DA|70618^Penicillin^RXNORM|SV|Hives|20100101\r"
    "AL1|2|FA|256349002^Peanut^SCT|MO|Swelling\r"
    "DG1|1||R07.9^Chest pain, unspecified^I10||20240305|A\r"
    "IN1|1|PPO123^Gold PPO|BCBS01^^^STMARY|Blue Cross Blue Shield|PO BOX 1^^CHICAGO^IL^60601|||GRP77|"
    "ACME CORP|||20240101|20241231||PPO|DOE^JANE|SEL^Self^HL70063|19800229|||||||||||||||||POL{n}\r"
)

_PANEL = [
    ("6690-2", "Leukocytes [#/volume] in Blood", "4.5-11.0", "10*3/uL", "7.2"),
    ("789-8", "Erythrocytes [#/volume] in Blood", "4.0-5.2", "10*6/uL", "4.61"),
    ("718-7", "Hemoglobin [Mass/volume] in Blood", "12.0-16.0", "g/dL", "13.9"),
    ("4544-3", "Hematocrit [Volume Fraction] of Blood", "36-46", "%", "41.2"),
    ("787-2", "MCV [Entitic volume]", "80-100", "fL", "89.4"),
    ("785-6", "MCH [Entitic mass]", "26-34", "pg", "30.2"),
    ("786-4", "MCHC [Mass/volume]", "31-37", "g/dL", "33.7"),
    ("788-0", "Erythrocyte distribution width", "11.5-14.5", "%", "13.1"),
    ("777-3", "Platelets [#/volume] in Blood", "150-400", "10*3/uL", "251"),
    ("32623-1", "Platelet mean volume", "7.5-11.5", "fL", "9.8"),
    ("770-8", "Neutrophils/100 leukocytes", "40-75", "%", "58.1"),
    ("736-9", "Lymphocytes/100 leukocytes", "20-45", "%", "31.0"),
    ("5905-5", "Monocytes/100 leukocytes", "2-10", "%", "7.2"),
    ("713-8", "Eosinophils/100 leukocytes", "0-6", "%", "2.9"),
    ("706-2", "Basophils/100 leukocytes", "0-2", "%", "0.8"),
    ("751-8", "Neutrophils [#/volume] in Blood", "1.8-7.7", "10*3/uL", "4.18"),
    ("731-0", "Lymphocytes [#/volume] in Blood", "1.0-4.8", "10*3/uL", "2.23"),
    ("742-7", "Monocytes [#/volume] in Blood", "0.2-1.0", "10*3/uL", "0.52"),
    ("711-2", "Eosinophils [#/volume] in Blood", "0.0-0.5", "10*3/uL", "0.21"),
    ("704-7", "Basophils [#/volume] in Blood", "0.0-0.2", "10*3/uL", "0.06"),
]

ORU_R01 = (
    "MSH|^~\\&|LAB|STMARY^2.16.840.1.113883.19.4^ISO|FHIRBRIDGE|FB|20240305160000-0600||ORU^R01^ORU_R01|"
    "LAB{n}|P|2.5.1|||AL|NE\r"
    "PID|1||MRN{n}^^^STMARY^MR||DOE^JANE^QUINN||19800229|F|||12 MAIN ST^^SPRINGFIELD^IL^62701^USA^H\r"
    "PV1|1|O|LAB^^^STMARY||||1234567890^WELBY^MARCUS^^^DR^^^NPI&2.16.840.1.113883.4.6&ISO|||||||||||OP|"
    "V{n}^^^STMARY^VN\r"
    "ORC|RE|ORD{n}^EPIC|FIL{n}^LAB||CM||||20240305120000-0600|||1234567890^WELBY^MARCUS^^^DR^^^NPI&2.16.840.1.113883.4.6&ISO\r"
    "OBR|1|ORD{n}^EPIC|FIL{n}^LAB|58410-2^CBC panel - Blood by Automated count^LN|||20240305121500-0600||||||||"
    "|1234567890^WELBY^MARCUS^^^DR^^^NPI&2.16.840.1.113883.4.6&ISO||||||20240305155500-0600|||F\r"
    + "".join(
        f"OBX|{i}|NM|{code}^{name}^LN||{value}|{unit}^^UCUM|{rng}|N|||F|||20240305121500-0600|||||"
        f"20240305155500-0600||||STMARY LAB^D^^^^CLIA&2.16.840.1.113883.4.7&ISO^XX^^^05D0000000\r"
        for i, (code, name, rng, unit, value) in enumerate(_PANEL, start=1)
    )
    + "SPM|1|SPC{n}&LAB||119297000^Blood specimen^SCT|||||||||||||20240305121500-0600|20240305130000-0600\r"
)


def quiet() -> None:
    logging.disable(logging.WARNING)
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))


def legacy_validate_bundle(bundle: dict) -> None:  # type: ignore[type-arg]
    """The previous validate_bundle (before docs/validation.md), kept here to measure "before" in the same run.

    Validates the bundle shell, then each resource body not already validated in this process (a
    digest cache of whole resources); on any failure the whole bundle.
    """
    import hashlib

    import orjson
    from fhir.resources.R4B import get_fhir_model_class
    from fhir.resources.R4B.bundle import Bundle

    entries = bundle.get("entry")
    if not isinstance(entries, list):
        Bundle.model_validate(bundle)
        return
    try:
        shell = {**bundle, "entry": [{k: v for k, v in e.items() if k != "resource"} for e in entries]}
        Bundle.model_validate(shell)
        fresh = []
        for e in entries:
            resource = e.get("resource")
            if resource is None:
                continue
            digest = hashlib.blake2b(
                orjson.dumps(resource, option=orjson.OPT_SORT_KEYS), digest_size=16
            ).digest()
            if digest in _legacy_validated:
                continue
            get_fhir_model_class(resource["resourceType"]).model_validate(resource)
            fresh.append(digest)
    except Exception:
        Bundle.model_validate(bundle)
        raise
    _legacy_validated.update(dict.fromkeys(fresh))


_legacy_validated: dict[bytes, None] = {}


def model_validate_only(bundle: dict) -> None:  # type: ignore[type-arg]
    from fhir.resources.R4B.bundle import Bundle

    Bundle.model_validate(bundle)


#: name -> (validator used by BundleBuilder.build, function emptying its cache)
PATHS = {
    "Bundle.model_validate (no cache)": (model_validate_only, lambda: None),
    "before: resource-body cache": (legacy_validate_bundle, _legacy_validated.clear),
    "after: shape cache (adapters.validation)": (validate_bundle, clear_cache),
}


def cpu_rate(fn, items: list, min_seconds: float, clear=lambda: None, each: bool = False) -> float:  # type: ignore[no-untyped-def]
    """Items per CPU second of fn over items, repeated for at least min_seconds of CPU.

    ``clear`` empties the validation cache before every pass (``each``: before every item), so a
    message seen in an earlier pass is not validated for free; within a pass, elements shared by
    several messages (practitioners, codings, units, meta ...) are validated once, as in a real feed.
    """
    n = 0
    start = time.process_time()
    while True:
        clear()
        for it in items:
            if each:
                clear()
            fn(it)
        n += len(items)
        el = time.process_time() - start
        if el >= min_seconds:
            return n / el


def bench_messages(label: str, messages: list[bytes], seconds: float) -> dict[str, float]:
    import hl7

    ours = HL7v2Adapter()
    noval = HL7v2Adapter(validate="false")
    bundles: list[dict] = []  # type: ignore[type-arg]
    for m in messages:
        for o in ours.convert(m, SRC):
            assert isinstance(o, ConvertedBundle), o.error  # type: ignore[union-attr]
            bundles.append(o.bundle)
    entries = sum(len(b["entry"]) for b in bundles) / len(bundles)
    texts = [
        m.decode("utf-8-sig").replace("\r\n", "\r").replace("\n", "\r").strip("\x0b\x1c\r") for m in messages
    ]
    ok_texts = []
    for t in texts:
        try:
            hl7.parse(t)
            ok_texts.append(t)
        except Exception:  # python-hl7 rejects some valid messages; the floor uses only those it parses
            pass
    r_hl7 = cpu_rate(hl7.parse, ok_texts, seconds)
    r_noval = cpu_rate(lambda m: list(noval.convert(m, SRC)), messages, seconds)
    print(
        f"\n{label}: {len(messages)} distinct message(s), {sum(map(len, messages)) / len(messages):.0f} bytes and "
        f"{entries:.1f} bundle entries on average"
    )
    print(f"  ours, without validation            {r_noval:9.0f} msgs/s/core")
    print(
        f"  python-hl7 parse only               {r_hl7:9.0f} msgs/s/core   ({len(ok_texts)}/{len(texts)} parsed)"
    )
    print(
        "  per validation path (cache emptied before every pass over the messages):\n"
        f"  {'':44s}{'ours':>8s}{'val.share':>10s}{'ms/bundle':>10s}{'ms/entry':>9s}{'floor':>8s}{'ours/floor':>11s}"
    )
    results: dict[str, float] = {"noval": r_noval, "hl7": r_hl7}
    original = _bundle_mod.validate_bundle
    try:
        for name, (validator, clear) in PATHS.items():
            _bundle_mod.validate_bundle = validator  # what BundleBuilder.build calls
            r_ours = cpu_rate(lambda m: list(ours.convert(m, SRC)), messages, seconds, clear)
            r_valid = cpu_rate(validator, bundles, seconds, clear)
            floor = 1.0 / (1.0 / r_hl7 + 1.0 / r_valid)
            share = 1.0 - (1.0 / r_noval) / (1.0 / r_ours)
            print(
                f"  {name:44s}{r_ours:8.0f}{share:10.1%}{1000 / r_valid:10.3f}{1000 / r_valid / entries:9.3f}"
                f"{floor:8.0f}{r_ours / floor:10.2f}x"
            )
            results[name] = r_ours
        _bundle_mod.validate_bundle = validate_bundle
        r_cold = cpu_rate(lambda m: list(ours.convert(m, SRC)), messages, seconds, clear_cache, each=True)
        print(
            f"  {'after, cache emptied before every message':44s}{r_cold:8.0f}"
            f"{1.0 - (1.0 / r_noval) / (1.0 / r_cold):10.1%}"
        )
    finally:
        _bundle_mod.validate_bundle = original
    return results


async def mllp_latency(seconds: float, rate: float, connections: int, workers: int = 0) -> None:
    import asyncio
    import tempfile

    from bridge.config import Settings
    from bridge.ingest.mllp import END, MllpServer, frame
    from bridge.stream.broker import start_local
    from bridge.stream.envelope import OrgSigner
    from bridge.stream.producer import Publisher, signing_key_path
    from bridge.stream.topics import ensure_topics

    tmp = Path(tempfile.mkdtemp(prefix="fhirbridge-bench-"))
    handle = None
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        handle = start_local("noida", tmp / "broker")
        bootstrap = handle.bootstrap
    settings = Settings.from_env({"FHIRBRIDGE_DATA_DIR": str(tmp / "data")}).with_bootstrap(bootstrap)
    OrgSigner.generate(SRC.org_id).save(signing_key_path(settings, SRC.org_id))
    ensure_topics(bootstrap, settings.kafka.topics)
    server = MllpServer(
        HL7v2Adapter(), SRC, lambda: Publisher(settings, bootstrap), ack_timeout=30, workers=workers
    )
    await server.start("127.0.0.1", 0)
    conns = connections
    per_conn = rate / conns
    total = int(seconds * rate)
    lat: list[float] = []
    codes: dict[str, int] = {}

    async def client(c: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        t0 = time.perf_counter()
        for k in range(total // conns):
            due = t0 + k / per_conn
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            n = c * 1_000_000 + k
            msg = (ADT_A01 if k % 2 else ORU_R01).format(n=n).encode()
            s = time.perf_counter()
            writer.write(frame(msg))
            await writer.drain()
            ack = await reader.readuntil(END)
            lat.append(time.perf_counter() - s)
            code = ack.split(b"MSA|", 1)[1][:2].decode()
            codes[code] = codes.get(code, 0) + 1
        writer.close()

    # the broker alone: sequential publish -> ack of ready bundles, for comparison
    pub = Publisher(settings, bootstrap)
    adapter = HL7v2Adapter()
    ready = [next(iter(adapter.convert(ADT_A01.format(n=9_000_000 + i).encode(), SRC))) for i in range(60)]
    bare: list[float] = []
    for cb in ready:
        s0 = time.perf_counter()
        pub.publish(cb, adapter, SRC).get(30)  # type: ignore[arg-type]
        bare.append(time.perf_counter() - s0)
    pub.close()
    bare = sorted(bare[10:])
    try:
        t = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(conns)))
        wall = time.perf_counter() - t
    finally:
        await server.close()
        if handle is not None:
            handle.stop()
    lat.sort()
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000  # noqa: E731
    print(
        f"\nMLLP round trip (send -> ACK, AA after broker ack, acks=all) at {rate:.0f} msgs/s over {conns} "
        f"connections, {workers} conversion worker process(es), ADT^A01 and ORU^R01 alternating, "
        f"broker {'embedded noida' if handle else bootstrap}:"
    )
    print(f"  {len(lat)} messages in {wall:.1f} s ({len(lat) / wall:.0f} msgs/s achieved); ACKs {codes}")
    print(
        f"  broker alone (sequential publish -> ack of a ready bundle): p50 {bare[len(bare) // 2] * 1000:.1f} ms, "
        f"max {bare[-1] * 1000:.1f} ms; load average now {os.getloadavg()[0]:.2f}"
    )
    print(
        f"  p50 {p(0.50):.1f} ms   p90 {p(0.90):.1f} ms   p99 {p(0.99):.1f} ms   max {lat[-1] * 1000:.1f} ms"
        f"   mean {statistics.mean(lat) * 1000:.1f} ms"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description="hl7v2 adapter benchmark")
    ap.add_argument("--seconds", type=float, default=3.0, help="CPU seconds per measurement")
    ap.add_argument("--mllp", action="store_true", help="also measure MLLP round trips with a real broker")
    ap.add_argument("--mllp-seconds", type=float, default=20.0)
    ap.add_argument("--mllp-workers", type=int, default=0, help="conversion worker processes of the listener")
    ap.add_argument("--mllp-rate", type=float, default=200.0)
    ap.add_argument(
        "--mllp-connections",
        type=int,
        default=40,
        help="concurrent MLLP connections (each waits for its ACK before sending the next)",
    )
    args = ap.parse_args()
    quiet()
    if os.environ.get("FHIRBRIDGE_GC_THRESHOLD", "").lower() != "default":
        # the GC settings `fhirbridge ingest` and the MLLP listener run with (bridge/gctune.py);
        # FHIRBRIDGE_GC_THRESHOLD=default measures with Python's own
        from bridge.config import Settings
        from bridge.gctune import tune_gc

        tune_gc(Settings.from_env().gc_threshold)
    print(
        f"hl7v2 adapter benchmark (python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f}; CPU time of this process)"
    )
    adt = [ADT_A01.format(n=i).encode() for i in range(500)]
    oru = [ORU_R01.format(n=i).encode() for i in range(200)]
    bench_messages("ADT^A01", adt, args.seconds)
    bench_messages("ORU^R01 with 20 OBX", oru, args.seconds)
    ms = sorted((SAMPLES / "hl7v2" / "ms-fhir-converter").glob("*.hl7"))
    if ms:
        bench_messages("Microsoft samples", [p.read_bytes() for p in ms], args.seconds)
    if args.mllp:
        import asyncio

        asyncio.run(mllp_latency(args.mllp_seconds, args.mllp_rate, args.mllp_connections, args.mllp_workers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
