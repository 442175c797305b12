"""gradwatch.v1: generated protobuf and gRPC code of the wire protocol (see proto/gradwatch/v1/*.proto).

Regenerate with `proto/generate.sh`; never edit the *_pb2*.py files by hand.
"""
