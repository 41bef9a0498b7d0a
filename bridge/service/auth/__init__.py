"""Identity and authorization (SMART on FHIR 2.2): scopes, access-token verification, the embedded
authorization server, and the middleware that checks every request before any data is read."""
