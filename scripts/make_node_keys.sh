#!/usr/bin/env bash
# Make SuperNode authentication key pairs for a SuperLink started with --enable-supernode-auth
# (Flower 1.42; development and tests: the private keys are written without a passphrase).
#
#   scripts/make_node_keys.sh <out-dir> <count>
#
# Writes into <out-dir>, for i = 0 .. count-1:
#   node<i>.key   the SuperNode's private key: flower-supernode --auth-supernode-private-key
#   node<i>.pub   its public key, for the operator: flwr supernode register node<i>.pub <conn>
# Made with ssh-keygen (not openssl): Flower reads the private key with
# load_ssh_private_key (OpenSSH format) and the public key with load_ssh_public_key, and
# accepts only EC keys on a NIST curve; these are ECDSA P-384 (ecdsa-sha2-nistp384).
# Idempotent: existing pairs are kept (delete a pair to make a new one; a new key needs a new
# registration). Needs ssh-keygen.
set -euo pipefail

usage() {
    if [[ "$1" == 0 ]]; then
        sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    else
        sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2
    fi
    exit "$1"
}

case "${1:-}" in -h | --help) usage 0 ;; esac
[[ $# -eq 2 ]] || usage 2
[[ "$2" =~ ^[0-9]+$ ]] || { echo "make_node_keys.sh: <count> must be a number, got '$2'" >&2; exit 2; }
command -v ssh-keygen >/dev/null || { echo "make_node_keys.sh: ssh-keygen not found" >&2; exit 1; }

out="$1"
count="$2"
mkdir -p "$out"
cd "$out"

for ((i = 0; i < count; i++)); do
    if [[ -s "node$i.key" && -s "node$i.pub" ]]; then
        continue
    fi
    rm -f "node$i.key" "node$i.key.pub" "node$i.pub"
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "fml-node$i" -f "node$i.key"
    mv "node$i.key.pub" "node$i.pub"
    chmod 600 "node$i.key"
    echo "made $out/node$i.key, $out/node$i.pub"
done
