"""gradwatch.collector: accepts agents' Export calls over gRPC and writes them into Redis streams."""
