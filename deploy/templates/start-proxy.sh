#!/bin/sh
# Hospital-facing listener of federation {{federation}} ({{listen}}): nginx in the foreground,
# forwarding only the Fleet API to the SuperLink on loopback. Stop it with SIGQUIT (graceful)
# or SIGTERM. Runs as an ordinary user: pid, logs and temp files stay in $KIT/proxy.
set -eu
KIT=$(cd "$(dirname "$0")" && pwd)
# FLWR_INTERNAL_* variables switch on Flower-internal servers (e.g. an unauthenticated gRPC
# Control API on all interfaces): never pass any of them on from the caller's environment.
for pneumofed_var in $(env | sed -n 's/^\(FLWR_INTERNAL_[A-Za-z0-9_]*\)=.*/\1/p'); do
    unset "$pneumofed_var"
done
unset pneumofed_var
mkdir -p "$KIT/proxy"
exec "${NGINX:-nginx}" -p "$KIT/proxy" -c "$KIT/nginx.conf" -e "$KIT/proxy/error.log" -g 'daemon off;'
