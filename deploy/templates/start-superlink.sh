#!/bin/sh
# SuperLink of federation {{federation}}: TLS, SuperNode authentication (only registered keys
# connect), persistent state, no runtime installation of app dependencies, listening on
# loopback only. Hospitals reach its Fleet API through start-proxy.sh. Stop it with SIGTERM.
set -eu
KIT=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$KIT/state"
exec flower-superlink \
    --host 127.0.0.1 \
    --port {{control_port}} \
    --ssl-ca-certfile "$KIT/ca.crt" \
    --ssl-certfile "$KIT/superlink.crt" \
    --ssl-keyfile "$KIT/superlink.key" \
    --enable-supernode-auth \
    --database "$KIT/state/superlink.db" \
    --disable-runtime-dependency-installation \
    "$@"
