"""Browser tests: Debian's Chromium driven by Playwright against a fhirbridge serve subprocess."""
