#!/bin/sh
# The compose stack's one-shot `credentials` service (deploy/docker-compose.yml): creates what is missing of the
# stack's credentials, random, and hands each service only its own, in a volume of its own:
#
#   credentials.sh USERS_ACL OUT
#
#   OUT/redis/<user>            one password per `user NAME on` line of USERS_ACL  -> Redis (redis/aclfile.sh)
#   OUT/collector/GRADWATCH_*   the agents' token, its /metrics read token, its Redis URL  -> the collector
#   OUT/aggregator/GRADWATCH_*  its read token, API token and Redis URL  -> the aggregator
#   OUT/prometheus/*-read-token the two read tokens it scrapes with  -> Prometheus
#   OUT/grafana/admin-password  Grafana's admin password  -> Grafana
#
# (the collector and the aggregator turn each file of theirs into the variable it is named after:
# compose/with-credentials.sh). A value that exists is kept, so the stack keeps its credentials across restarts;
# GRADWATCH_TOKEN, GRADWATCH_AGGREGATOR_READ_TOKEN, GRADWATCH_AGGREGATOR_API_TOKEN and GRAFANA_ADMIN_PASSWORD,
# when set, replace theirs. Files belong to the user each service runs as, readable by it only (as root; as
# anyone else, e.g. in the tests, they stay the caller's). Values are 32 random bytes in hex: nothing to escape.
set -eu
[ $# -eq 2 ] || { echo "usage: $0 USERS_ACL OUT" >&2; exit 2; }
users_acl=$1 out=$2
REDIS_ADDRESS=${REDIS_ADDRESS:-redis:6379}
umask 077

random() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; }

# put FILE OWNER VALUE: FILE holds exactly VALUE (no newline), owned by OWNER (uid) when we are root.
put() {
  rm -f "$1.tmp"
  printf %s "$3" > "$1.tmp"
  if [ "$(id -u)" = 0 ]; then chown "$2:$2" "$1.tmp"; fi
  chmod 0400 "$1.tmp"
  mv -f "$1.tmp" "$1"
}

# value FILE [GIVEN]: GIVEN when given, else what FILE holds, else a new random value.
value() {
  if [ -n "${2:-}" ]; then printf %s "$2"
  elif [ -s "$1" ]; then cat "$1"
  else random
  fi
}

for dir in redis collector aggregator prometheus grafana; do
  mkdir -p "$out/$dir"
done

# The uids of the images' users: redis 999, gradwatch 10001 (deploy/Dockerfile), prometheus nobody, grafana 472.
for user in $(sed -n 's/^user \([^ ][^ ]*\) on .*/\1/p' "$users_acl"); do
  put "$out/redis/$user" 999 "$(value "$out/redis/$user")"
done
for user in collector aggregator; do
  [ -s "$out/redis/$user" ] || { echo "credentials.sh: $users_acl has no user $user" >&2; exit 1; }
done

c=$out/collector
put "$c/GRADWATCH_TOKEN" 10001 "$(value "$c/GRADWATCH_TOKEN" "${GRADWATCH_TOKEN:-}")"
put "$c/GRADWATCH_COLLECTOR_READ_TOKEN" 10001 "$(value "$c/GRADWATCH_COLLECTOR_READ_TOKEN")"
put "$c/GRADWATCH_REDIS_URL" 10001 "redis://collector:$(cat "$out/redis/collector")@$REDIS_ADDRESS/0"

a=$out/aggregator
put "$a/GRADWATCH_AGGREGATOR_READ_TOKEN" 10001 \
    "$(value "$a/GRADWATCH_AGGREGATOR_READ_TOKEN" "${GRADWATCH_AGGREGATOR_READ_TOKEN:-}")"
put "$a/GRADWATCH_AGGREGATOR_API_TOKEN" 10001 \
    "$(value "$a/GRADWATCH_AGGREGATOR_API_TOKEN" "${GRADWATCH_AGGREGATOR_API_TOKEN:-}")"
put "$a/GRADWATCH_REDIS_URL" 10001 "redis://aggregator:$(cat "$out/redis/aggregator")@$REDIS_ADDRESS/0"

put "$out/prometheus/collector-read-token" 65534 "$(cat "$c/GRADWATCH_COLLECTOR_READ_TOKEN")"
put "$out/prometheus/aggregator-read-token" 65534 "$(cat "$a/GRADWATCH_AGGREGATOR_READ_TOKEN")"

put "$out/grafana/admin-password" 472 \
    "$(value "$out/grafana/admin-password" "${GRAFANA_ADMIN_PASSWORD:-}")"

echo "credentials.sh: credentials ready (Redis users: $(ls "$out/redis" | tr '\n' ' '))"
