#!/bin/sh
# Register hospitals' SuperNode public keys with the running SuperLink: every key in
# hospital-keys/, or only the hospitals named on the command line (e.g. a newly added one).
set -eu
KIT=$(cd "$(dirname "$0")" && pwd)
export FLWR_HOME="$KIT/flwr-home"
if [ "$#" -eq 0 ]; then
    set -- $(cd "$KIT/hospital-keys" && ls -- *.pub | sed 's/\.pub$//')
fi
for name in "$@"; do
    flwr supernode register "$KIT/hospital-keys/$name.pub" {{federation}} --name "$name"
done
