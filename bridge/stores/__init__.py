"""What the consumers write and the service reads: the index, the MPI, the ledger, auth, audit, exports."""
