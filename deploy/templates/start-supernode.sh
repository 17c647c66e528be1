#!/bin/sh
# SuperNode of {{site_name}} in federation {{federation}}: TLS verified against the federation CA,
# authenticated with this kit's private key, data and audit paths from node-config.toml.
# Extra flags are passed to flower-supernode. Stop it with SIGTERM.
set -eu
KIT=$(cd "$(dirname "$0")" && pwd)
exec flower-supernode \
    --superlink {{superlink_address}} \
    --root-certificates "$KIT/ca.crt" \
    --auth-supernode-private-key "$KIT/node.key" \
    --node-config "$KIT/node-config.toml" \
    --port "${PNEUMOFED_RUNTIME_PORT:-9094}" \
    "$@"
