"""Bulk Data export benchmark: a whole-population ``GET /$export`` against its floor, with peak RSS.

The population is ``bench_query.py``'s (N people seen by 1-3 providers, about 13 resources per record,
one heavy person with a Consent), loaded straight into the index store, linked by the MPI, and logged in
a ledger with a signed checkpoint over every bundle, so that the export's ledger pin, its consent gates
and its per-file patient lists all do their real work.

Each measurement runs in a process of its own (its own heap, so that its peak RSS is its own):

* **export**: the service application in-process (aiohttp test server, real authorization, consent and
  audit), a ``system/*.rs`` TREAT token of an organisation that sent none of the data; kick-off, poll
  every 50 ms until the manifest; resources written per second of wall time from kick-off to manifest;
  RSS just before the kick-off, and the highest RSS sampled every 50 ms during the export;
* **floor**: ``SELECT body FROM resources`` on one connection, every row written to one file with its
  SHA-256 computed as it is written: what streaming the index to disk costs with no paging, pin,
  filter, consent, split or bookkeeping.

Export and floor alternate twice; the ratio is export / floor rate of each pair.

Usage: python benchmarks/bench_export.py [--people 10000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_query import link, population

from bridge.config import Settings
from bridge.stores.index.store import IndexStore
from bridge.stores.ledger import open_ledger
from bridge.stores.mpi import PersonIndex
from ledger import note
from ledger.log import LedgerEntry

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE / 2**20


class Sampler(threading.Thread):
    """The highest RSS seen, sampled every 50 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = rss_mib()
        self.running = True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_mib())
            time.sleep(0.05)


def env_for(data: Path) -> dict[str, str]:
    return {
        "FHIRBRIDGE_DATA_DIR": str(data),
        "FHIRBRIDGE_LEDGER_ORIGIN": "bench.fhirbridge/ledger",
        "FHIRBRIDGE_LOG_LEVEL": "warning",
    }


def build(data: Path, people: int) -> int:
    settings = Settings.from_env(env_for(data))
    built, patients, _heavy = population(people)
    # the population's bundle "hashes" are their offsets in hex, so every one has the same ledger dedup
    # key and each ledger look-up would read every entry; real bundle hashes are SHA-256
    bundles = [replace(b, bundle_sha256=hashlib.sha256(b.bundle_sha256.encode()).hexdigest()) for b in built]
    n = sum(len(b.bundle["entry"]) for b in bundles)
    t = time.perf_counter()
    store = IndexStore.open(settings.stores.index_url)
    for k in range(0, len(bundles), 500):
        store.apply(bundles[k : k + 500])
    store.close()
    mpi = PersonIndex.open(settings.stores.mpi_url)
    link(mpi, patients)
    mpi.close()
    skey, vkey = note.generate_key(settings.ledger.origin)
    assert settings.ledger.key_file is not None
    settings.ledger.key_file.write_text(skey)
    settings.ledger.key_file.with_suffix(".pub").write_text(vkey)
    led = open_ledger(
        settings.ledger.url, origin=settings.ledger.origin, signer_key=skey, checkpoint_every=10**9
    )
    entries = [
        LedgerEntry(
            bundle_sha256=b.bundle_sha256,
            source_org=b.source_org,
            adapter="bench",
            adapter_version="1",
            topic=b.topic,
            partition=b.partition,
            offset=b.offset,
            ingested_at="2026-01-02T00:00:00Z",
            message_id=None,
        )
        for b in bundles
    ]
    for k in range(0, len(entries), 5000):
        led.append(entries[k : k + 5000])
    led.checkpoint_now()
    led.close()
    print(
        f"built {n:,} resources in {len(bundles):,} bundles for {people:,} people in {time.perf_counter() - t:.0f}s"
    )
    return n


def run_export(data: Path) -> dict[str, Any]:
    from aiohttp.test_utils import TestClient, TestServer
    from yarl import URL

    from bridge.gctune import tune_gc
    from bridge.service.app import create_app
    from tests.support.auth import bearer

    settings = Settings.from_env({**os.environ, **env_for(data)})
    tune_gc(settings.gc_threshold)
    headers = bearer(settings, "system/*.rs", organization="bench-reader", purpose="TREAT", subject="bench")

    async def go() -> dict[str, Any]:
        async with TestClient(TestServer(create_app(settings))) as client:
            await client.get("/metadata")
            base_rss = rss_mib()
            maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            sampler = Sampler()
            sampler.start()
            t = time.perf_counter()
            r = await client.get("/$export", headers={**headers, "Prefer": "respond-async"})
            assert r.status == 202, await r.text()
            status = URL(r.headers["Content-Location"]).path
            while True:
                r = await client.get(status, headers=headers)
                if r.status == 200:
                    break
                assert r.status == 202, await r.text()
                await asyncio.sleep(0.05)
            wall = time.perf_counter() - t
            sampler.running = False
            maxrss_export = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            manifest = await r.json()
            written = sum(f["count"] for f in manifest["output"])
            # one download, to show what its audit costs (one AuditEvent per patient in the file)
            first = manifest["output"][0]
            t = time.perf_counter()
            d = await client.get(URL(first["url"]).path, headers=headers)
            body = await d.read()
            download = time.perf_counter() - t
            assert hashlib.sha256(body).hexdigest() == first["extension"]["sha256"]
            after_download = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            await client.delete(status, headers=headers)
            return {
                "resources": written,
                "seconds": wall,
                "files": len(manifest["output"]),
                "errors": len(manifest["error"]),
                "base_rss": base_rss,
                "peak_rss": sampler.peak,
                "maxrss_before": maxrss_before,
                "maxrss_export": maxrss_export,
                "maxrss_download": after_download,
                "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "download_s": download,
                "download_lines": first["count"],
                "download_patients": None,
            }

    return asyncio.run(go())


def run_floor(data: Path) -> dict[str, Any]:
    settings = Settings.from_env(env_for(data))
    path = settings.stores.index_url.removeprefix("sqlite://")
    out = data / "floor.ndjson"
    base_rss = rss_mib()
    sampler = Sampler()
    sampler.start()
    t = time.perf_counter()
    conn = sqlite3.connect(path)
    digest = hashlib.sha256()
    n = 0
    with open(out, "wb") as fh:
        for (body,) in conn.execute("SELECT CAST(body AS BLOB) FROM resources"):
            line = body + b"\n"
            fh.write(line)
            digest.update(line)
            n += 1
        fh.flush()
        os.fsync(fh.fileno())
    wall = time.perf_counter() - t
    sampler.running = False
    conn.close()
    out.unlink()
    return {"resources": n, "seconds": wall, "base_rss": base_rss, "peak_rss": sampler.peak}


def child(phase: str, data: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--phase", phase, "--data", str(data)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        sys.exit(f"the {phase} process failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--people", type=int, default=10_000)
    ap.add_argument("--keep", type=Path, default=None, help="build in (or reuse) this directory and keep it")
    ap.add_argument("--phase", choices=["export", "floor"], help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        result = run_export(args.data) if args.phase == "export" else run_floor(args.data)
        print(json.dumps(result))
        return
    data = args.keep or Path(tempfile.mkdtemp(prefix="bench-export-"))
    try:
        if not (data / "index.db").exists():
            data.mkdir(parents=True, exist_ok=True)
            build(data, args.people)
        for k in range(2):
            floor = child("floor", data)
            exp = child("export", data)
            rate, floor_rate = exp["resources"] / exp["seconds"], floor["resources"] / floor["seconds"]
            print(
                f"[run {k + 1}] export: {exp['resources']:,} resources in {exp['seconds']:.1f}s = {rate:,.0f}/s, "
                f"{exp['files']} files (+{exp['errors']} error file), RSS {exp['base_rss']:.0f} MiB before, "
                f"peak {exp['peak_rss']:.0f} MiB (ru_maxrss {exp['maxrss']:.0f} MiB); one download of "
                f"{exp['download_lines']:,} lines with its audit: {exp['download_s'] * 1000:.0f} ms"
            )
            print(
                f"[run {k + 1}] floor (SELECT body FROM resources streamed to one file with its SHA-256): "
                f"{floor['resources']:,} rows in {floor['seconds']:.1f}s = {floor_rate:,.0f}/s, RSS "
                f"{floor['base_rss']:.0f} -> peak {floor['peak_rss']:.0f} MiB; export / floor = {rate / floor_rate:.2f}"
            )
    finally:
        if args.keep is None:
            shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
