#!/bin/sh
# Entry point of the collector and the aggregator in deploy/docker-compose.yml:
#
#   with-credentials.sh DIR COMMAND [ARGS...]
#
# Each file of DIR (their volume, which compose/credentials.sh fills) becomes the environment variable it is
# named after, holding the file's content; then COMMAND runs. The secrets so reach the process without being
# in the compose file, in `docker inspect` or on a command line.
set -eu
dir=$1
shift
for file in "$dir"/*; do
  [ -f "$file" ] || { echo "with-credentials.sh: no credentials in $dir (has the credentials service run?)" >&2; exit 1; }
  export "${file##*/}=$(cat "$file")"
done
exec "$@"
