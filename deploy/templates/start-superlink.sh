#!/bin/sh
# SuperLink of federation {{federation}}: TLS, SuperNode authentication (only registered keys
# connect), no runtime installation of app dependencies, listening on loopback only. Hospitals reach its Fleet API through start-proxy.sh. Stop it with SIGTERM.
set -eu
KIT=$(cd "$(dirname "$0")" && pwd)
# FLWR_INTERNAL_* variables switch on Flower-internal servers (e.g. an unauthenticated gRPC
# Control API on all interfaces): never pass any of them on from the caller's environment.
for pneumofed_var in $(env | sed -n 's/^\(FLWR_INTERNAL_[A-Za-z0-9_]*\)=.*/\1/p'); do
    unset "$pneumofed_var"
done
unset pneumofed_var
# uvicorn takes the client address from X-Forwarded-For only when the peer is in this list:
# nginx on loopback, which overwrites the header itself (not a value from the caller's environment).
export FORWARDED_ALLOW_IPS=127.0.0.1
# State in memory: Flower 1.42's SQLite state fails concurrent requests with "database is locked"
# (three SuperNodes replying at once suffice), which fails the run. The price: after a restart,
# run register-hospitals.sh again. `--database FILE` after the script's name keeps state in FILE.
exec flower-superlink \
    --host 127.0.0.1 \
    --port {{control_port}} \
    --ssl-ca-certfile "$KIT/ca.crt" \
    --ssl-certfile "$KIT/superlink.crt" \
    --ssl-keyfile "$KIT/superlink.key" \
    --enable-supernode-auth \
    --database :flwr-in-memory: \
    --disable-runtime-dependency-installation \
    "$@"
