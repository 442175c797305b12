"""The agent <-> collector gRPC contract beyond the proto (proto/gradwatch/v1): the trailing-metadata key
under which the collector sends a google.rpc.RetryInfo push-back and the agent honours it."""

RETRY_INFO_KEY = "google.rpc.retryinfo-bin"  # gRPC's binary-header convention for google.rpc.RetryInfo
