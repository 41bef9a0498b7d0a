"""The access audit (docs/audit.md): AuditEvents for every access (:mod:`.events`) and the patient's
"who has seen my record" view with inclusion proofs (:mod:`.access_log`)."""
