"""Reading the report streams: leases per run, claiming a dead replica's entries, decoding, idempotency."""
