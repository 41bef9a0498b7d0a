"""Access-token verification benchmark: the cost of one ``TokenVerifier.verify`` with cached keys.

    .venv/bin/python benchmarks/bench_auth.py [--n 5000]

For RS256 (RSA 2048) and ES256 (P-256) tokens shaped like the embedded authorization server's (``iss``,
``aud``, ``sub``, ``client_id``, ``scope``, ``exp``, ``iat``, ``jti``, ``patient``, ``fhirUser``), measures
in one run:

* fhirbridge ``TokenVerifier.verify`` (keys cached: given in-process, as for the embedded issuer; a
  JWKS fetched over HTTP is parsed into the same cache once);
* peer: joserfc ``jwt.decode`` with the key object plus ``JWTClaimsRegistry.validate`` (the library
  alone, without the issuer lookup, the checks of the claims' types and the access context);
* floor: the bare ``cryptography`` signature check of the same token (base64url-decoding the signature,
  and for ES256 its conversion to DER, included): what any verifier must pay.

Prints p50 and mean in milliseconds, the process CPU time per call, and the ratios to the floor. The
CPU may be shared with other work: compare ratios, not absolute figures. The target is 0.2 ms per
verification.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from joserfc import jwt
from joserfc.jwk import ECKey, Key, KeySet, RSAKey

from bridge.service.auth.tokens import Issuer, TokenVerifier

BASE = "https://fhir.example.org/fhir"
ISSUER = BASE + "/auth"
TARGET_MS = 0.2


def b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def make_token(key: Key, alg: str) -> str:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": BASE,
        "sub": "user-1",
        "client_id": "app-1",
        "scope": "openid fhirUser launch/patient patient/*.rs",
        "iat": now,
        "exp": now + 300,
        "jti": "6f1c2d1e-4c1b-4f7e-9a57-3f1f0e0b9d11",
        "patient": "pat-1",
        "fhirUser": "Patient/pat-1",
    }
    return jwt.encode({"alg": alg, "kid": key.kid}, claims, key, algorithms=[alg])


def floor_for(key: Key, alg: str, token: str) -> Callable[[], None]:
    header, payload, signature = token.split(".")
    public = key.as_dict(private=False)
    signing_input = f"{header}.{payload}".encode()
    if alg == "RS256":
        rsa_public = RSAKey.import_key(public).public_key

        def verify_rsa() -> None:
            rsa_public.verify(b64decode(signature), signing_input, padding.PKCS1v15(), hashes.SHA256())

        return verify_rsa
    ec_public = ECKey.import_key(public).public_key

    def verify_ec() -> None:
        raw = b64decode(signature)
        der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
        ec_public.verify(der, signing_input, ec.ECDSA(hashes.SHA256()))

    return verify_ec


def peer_for(key: Key, alg: str, token: str) -> Callable[[], None]:
    public = (RSAKey if alg == "RS256" else ECKey).import_key(key.as_dict(private=False))
    registry = jwt.JWTClaimsRegistry(
        leeway=30, iss={"essential": True, "value": ISSUER}, aud={"essential": True, "value": BASE}
    )

    def decode() -> None:
        registry.validate(jwt.decode(token, public, algorithms=[alg]).claims)

    return decode


def timed_sync(fn: Callable[[], None], n: int) -> tuple[list[float], float]:
    for _ in range(min(200, n)):
        fn()
    samples = []
    c0 = time.process_time()
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return samples, (time.process_time() - c0) * 1000 / n


async def timed_async(fn: Callable[[], Awaitable[Any]], n: int) -> tuple[list[float], float]:
    for _ in range(min(200, n)):
        await fn()
    samples = []
    c0 = time.process_time()
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return samples, (time.process_time() - c0) * 1000 / n


def row(label: str, samples: list[float], cpu: float, floor: tuple[float, float] | None) -> str:
    p50, mean = statistics.median(samples), statistics.fmean(samples)
    ratio = f"{p50 / floor[0]:6.2f}x {mean / floor[1]:6.2f}x" if floor else f"{'1.00x':>7} {'1.00x':>7}"
    return f"  {label:<34} {p50:8.4f} {mean:8.4f} {cpu:8.4f}   {ratio}"


async def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=5000, help="verifications per measurement")
    args = parser.parse_args()

    keys: dict[str, Key] = {
        "RS256": RSAKey.generate_key(2048, parameters={"kid": "rsa-1"}),
        "ES256": ECKey.generate_key("P-256", parameters={"kid": "ec-1"}),
    }
    verifier = TokenVerifier(
        [Issuer(ISSUER, "org-local")], BASE, static_keys={ISSUER: KeySet(list(keys.values())).as_dict()}
    )
    print(f"access-token verification, {args.n} calls each, keys cached (ms per call)")
    print(f"  {'':<34} {'p50':>8} {'mean':>8} {'cpu':>8}   {'p50/floor':>7} {'mean/floor'}")
    worst = 0.0
    for alg, key in keys.items():
        token = make_token(key, alg)
        context = await verifier.verify(token)
        assert context.organization == "org-local" and context.patient == "pat-1"
        floor_samples, floor_cpu = timed_sync(floor_for(key, alg, token), args.n)
        peer_samples, peer_cpu = timed_sync(peer_for(key, alg, token), args.n)
        ours, ours_cpu = await timed_async(functools.partial(verifier.verify, token), args.n)
        floor = (statistics.median(floor_samples), statistics.fmean(floor_samples))
        print(f" {alg}")
        print(row("floor: cryptography verify", floor_samples, floor_cpu, None))
        print(row("peer: joserfc decode + claims", peer_samples, peer_cpu, floor))
        print(row("fhirbridge TokenVerifier.verify", ours, ours_cpu, floor))
        worst = max(worst, statistics.median(ours))
    await verifier.close()
    verdict = "within" if worst <= TARGET_MS else "OVER"
    print(f"target {TARGET_MS} ms per verification: p50 {worst:.4f} ms at worst, {verdict} the target")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
