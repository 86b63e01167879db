#!/bin/sh
# Starts redis-server with the options given, as a replica of the master the
# Sentinels name, unless every Sentinel that answers names this server.
#
# Why: a master that died and is restarted (Docker's `restart:`) would
# otherwise come back as an empty master. A Sentinel that has not yet heard of
# the failover sees it answer again and names it to clients, which write jobs
# into it, and those writes are erased when it is made a replica. One
# Sentinel naming another master is enough to follow that one.
#
#   REDIS_HOST_NAME   this server's name as the Sentinels announce it (redis, redis-replica)
#   REDIS_PORT        its port (default 6379)
#   REPLICA_OF        "host port" of the master to follow when no Sentinel answers (empty: start as master)
#   SENTINELS         host:port of each Sentinel (default: the ha profile's three)
#   SENTINEL_PASSWORD the Sentinels' password (unset: REDIS_PASSWORD, the servers' own; empty: none)
#   REDIS_MASTER_NAME the master's name in the Sentinels (default ident)
#
# ident/redis_ha.py restarts a killed server through this script too, so the
# tests and scripts/failover_bench.py run it for real.
set -eu
me="${REDIS_HOST_NAME:?REDIS_HOST_NAME names this server} ${REDIS_PORT:-6379}"
master=${REPLICA_OF:-}
answered=no
password=${SENTINEL_PASSWORD-${REDIS_PASSWORD:-}}
for sentinel in ${SENTINELS:-sentinel-1:26379 sentinel-2:26379 sentinel-3:26379}; do
  if [ -n "$password" ]; then
    named=$(REDISCLI_AUTH="$password" redis-cli -h "${sentinel%:*}" -p "${sentinel##*:}" \
            sentinel get-master-addr-by-name "${REDIS_MASTER_NAME:-ident}" 2>/dev/null || true)
  else
    named=$(redis-cli -h "${sentinel%:*}" -p "${sentinel##*:}" \
            sentinel get-master-addr-by-name "${REDIS_MASTER_NAME:-ident}" 2>/dev/null || true)
  fi
  host=$(printf '%s\n' "$named" | sed -n 1p)
  port=$(printf '%s\n' "$named" | sed -n 2p)
  case "$port" in ''|*[!0-9]*) continue ;; esac
  if [ "$host $port" != "$me" ]; then
    master="$host $port"
    break
  fi
  answered=yes
  master=
done
if [ -n "$master" ]; then
  # shellcheck disable=SC2086 -- "host port", two words on purpose
  set -- "$@" --replicaof $master
  echo "start-redis: replica of $master" >&2
elif [ "$answered" = yes ]; then
  echo "start-redis: the Sentinels name this server the master" >&2
fi
exec redis-server "$@"
