#!/bin/sh
# Starts Redis with the users of users.acl, each with its password: writes the ACL file redis-server loads,
# then runs the rest of the command line with `--aclfile` added. The deployments run it in the official
# redis image (POSIX sh and coreutils' sha256sum, nothing else):
#
#   aclfile.sh USERS_ACL PASSWORD_DIR OUT [redis-server ARGS...]
#
# PASSWORD_DIR holds one file per user, named after it and holding exactly its password (Kubernetes: the
# Secret gradwatch-redis mounted as a volume; compose: the volume the `credentials` service fills). Each
# `user NAME on` line of USERS_ACL gets the SHA-256 of its password, as Redis keeps it, so OUT holds no plain
# password. A user without a password file stays locked: Redis lets no one log in as a user without a
# password, and says so here rather than failing, so Redis still serves the others. `default` stays off.
set -eu
[ $# -ge 3 ] || { echo "usage: $0 USERS_ACL PASSWORD_DIR OUT [redis-server ARGS...]" >&2; exit 2; }
users=$1 passwords=$2 out=$3
shift 3
umask 077
: > "$out.tmp"
while IFS= read -r line || [ -n "$line" ]; do
  case $line in
    "user default "*) ;;
    "user "*" on "*)
      rest=${line#user }
      name=${rest%% *}
      if [ -s "$passwords/$name" ]; then
        # The file's exact bytes: Kubernetes hands the same bytes to the components (secretKeyRef).
        hash=$(sha256sum < "$passwords/$name" | cut -d' ' -f1)
        line="user $name on #$hash ${rest#"$name on "}"
      else
        echo "aclfile.sh: no password for Redis user $name in $passwords: it cannot log in" >&2
      fi
      ;;
  esac
  printf '%s\n' "$line" >> "$out.tmp"
done < "$users"
mv "$out.tmp" "$out"
if [ $# -gt 0 ]; then
  exec "$@" --aclfile "$out"
fi
