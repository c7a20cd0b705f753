#!/usr/bin/env bash
# Make a local certificate authority and a SuperLink server certificate for TLS tests and
# loopback deployments (self-signed: for development, not for production).
#
#   scripts/make_certs.sh <out-dir> [extra-host ...]
#
# Writes into <out-dir>:
#   ca.key, ca.crt          the local CA (give ca.crt to SuperNodes: --root-certificates,
#                           and to the flwr CLI: root-certificates in $FLWR_HOME/config.toml)
#   server.key, server.pem  the SuperLink's key and certificate (signed by the CA), valid for
#                           127.0.0.1, ::1 and localhost, plus any extra hosts given (a name
#                           or an IP address each)
# Idempotent: existing files are kept (delete <out-dir> to make new ones). Needs openssl.
set -euo pipefail

usage() {
    if [[ "$1" == 0 ]]; then
        sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    else
        sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2
    fi
    exit "$1"
}

[[ $# -ge 1 ]] || usage 2
case "$1" in -h | --help) usage 0 ;; esac
command -v openssl >/dev/null || { echo "make_certs.sh: openssl not found" >&2; exit 1; }

out="$1"
shift
mkdir -p "$out"
cd "$out"

days=3650
if [[ ! -s ca.key || ! -s ca.crt ]]; then
    openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days "$days" \
        -keyout ca.key -out ca.crt -subj "/CN=fml-flower local CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    rm -f server.key server.pem # a new CA invalidates the old server certificate
    echo "made $out/ca.key, $out/ca.crt"
fi

if [[ ! -s server.key || ! -s server.pem ]]; then
    san="DNS:localhost,IP:127.0.0.1,IP:::1"
    for host in "$@"; do
        if [[ "$host" =~ ^[0-9.]+$ || "$host" == *:* ]]; then san+=",IP:$host"; else san+=",DNS:$host"; fi
    done
    printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
        "extendedKeyUsage=serverAuth" "subjectAltName=$san" >server.ext
    openssl req -newkey rsa:2048 -nodes -sha256 -keyout server.key -out server.csr \
        -subj "/CN=localhost" 2>/dev/null
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
        -days "$days" -sha256 -extfile server.ext -out server.pem 2>/dev/null
    rm -f ca.srl server.csr server.ext
    echo "made $out/server.key, $out/server.pem ($san)"
fi
chmod 600 ca.key server.key
openssl verify -CAfile ca.crt server.pem >/dev/null
