"""The image's HEALTHCHECK: GET one URL on this container and exit 0 on a 2xx answer, 1 otherwise.

``FHIRBRIDGE_HEALTHCHECK_URL`` names it; unset, it is ``serve``'s ``/metadata`` (public, no token) on
``FHIRBRIDGE_HTTP_PORT`` (8080), over HTTPS when ``FHIRBRIDGE_TLS_CERT_FILE`` is set. ``none`` turns
the check off (one-shot jobs such as ``topics create`` and ``ingest``). The check only ever talks to the
container itself, so an HTTPS certificate is not verified (it is issued for the service's name, not for
127.0.0.1) and nothing secret is sent. Standard library only: it runs in the image's own Python.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.request


def main() -> int:
    url = os.environ.get("FHIRBRIDGE_HEALTHCHECK_URL", "").strip()
    if url.lower() == "none":
        return 0
    if not url:
        scheme = "https" if os.environ.get("FHIRBRIDGE_TLS_CERT_FILE") else "http"
        port = os.environ.get("FHIRBRIDGE_HTTP_PORT", "8080")
        url = f"{scheme}://127.0.0.1:{port}/metadata"
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=4, context=context) as answer:
            ok = 200 <= answer.status < 300
    except Exception as exc:
        print(f"healthcheck {url}: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
