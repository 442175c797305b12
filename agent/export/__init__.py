"""From captured rows to the collector: protobuf encoding, the bounded pipeline and the gRPC exporter."""
