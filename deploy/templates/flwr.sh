#!/bin/sh
# The Flower CLI with this kit's connection "{{federation}}" (the SuperLink's loopback port), e.g.
#   ./flwr.sh run /path/to/pneumofed {{federation}} --stream
#   ./flwr.sh supernode ls {{federation}}
#   ./flwr.sh supernode unregister NODE_ID {{federation}}
set -eu
KIT=$(cd "$(dirname "$0")" && pwd)
export FLWR_HOME="$KIT/flwr-home"
exec flwr "$@"
