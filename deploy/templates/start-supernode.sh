#!/bin/sh
# SuperNode of {{site_name}} in federation {{federation}}: TLS verified against the federation CA,
# authenticated with this kit's private key, data and audit paths from node-config.toml.
# Extra flags are passed to flower-supernode. Stop it with SIGTERM.
set -eu
KIT=$(cd "$(dirname "$0")" && pwd)
# FLWR_INTERNAL_* variables switch on Flower-internal servers (e.g. an unauthenticated gRPC
# Control API on all interfaces): never pass any of them on from the caller's environment.
for pneumofed_var in $(env | sed -n 's/^\(FLWR_INTERNAL_[A-Za-z0-9_]*\)=.*/\1/p'); do
    unset "$pneumofed_var"
done
unset pneumofed_var
# Its SuperExec looks for a message to start a ClientApp process for once a second by default; a
# look is a request on loopback, so look every 0.1 s (a message waits 0.05 s for it, not 0.5 s).
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL="${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.1}"
exec flower-supernode \
    --superlink {{superlink_address}} \
    --root-certificates "$KIT/ca.crt" \
    --auth-supernode-private-key "$KIT/node.key" \
    --node-config "$KIT/node-config.toml" \
    --host 127.0.0.1 \
    --port "${PNEUMOFED_RUNTIME_PORT:-9094}" \
    "$@"
