"""Topic to stores: the consumer runtime, the envelope checks, the ledger, index and audit-log sinks, replay."""
