#!/bin/sh
# Hospital-facing listener of federation {{federation}} ({{listen}}): nginx in the foreground,
# forwarding only the Fleet API to the SuperLink on loopback. Stop it with SIGQUIT (graceful)
# or SIGTERM. Runs as an ordinary user: pid, logs and temp files stay in $KIT/proxy.
set -eu
KIT=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$KIT/proxy"
exec "${NGINX:-nginx}" -p "$KIT/proxy" -c "$KIT/nginx.conf" -e "$KIT/proxy/error.log" -g 'daemon off;'
