"""Sources to fhir.bundles: convert, sign, publish or dead-letter; files and MLLP."""
