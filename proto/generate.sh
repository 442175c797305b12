#!/usr/bin/env bash
# Regenerates the committed Python code of gradwatch.v1 from proto/gradwatch/v1/*.proto.
# The generator is pinned (proto/requirements-gen.txt): generated *_pb2_grpc.py refuses to import on
# a grpcio older than the generator, so the pin is also the oldest grpcio gradwatch supports.
# Usage: proto/generate.sh [--check]   (--check: fail when the committed code differs)
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3}
out=gradwatch/v1
if [ "${1:-}" = "--check" ]; then
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  "$python" -m grpc_tools.protoc -I . --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" gradwatch/v1/*.proto
  status=0
  for f in "$tmp"/$out/*.py "$tmp"/$out/*.pyi; do
    if ! cmp -s "$f" "$out/$(basename "$f")"; then echo "proto drift: $out/$(basename "$f") differs from the generator's output; run proto/generate.sh" >&2; status=1; fi
  done
  exit $status
fi
"$python" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. gradwatch/v1/*.proto
echo "generated: $(ls $out/*_pb2*.py* | tr '\n' ' ')"
