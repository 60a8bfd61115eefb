#!/usr/bin/env bash
# Installs the Debian packages Sigil's quickstart and test suite use, when missing.
# Usage: scripts/setup.sh [--perf]   (--perf adds nginx with the stream module, wrk and h2load)
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have cc || need+=(gcc libc6-dev)          # ring (rustls' crypto) builds C code
have curl || need+=(curl)                 # quickstart and tests: the real HTTP client
have openssl || need+=(openssl)           # tests: s_client as a real TLS peer
have ip || need+=(iproute2)               # transparent-mode tests: network namespaces
have iptables || need+=(iptables)         # transparent-mode tests: the init script
have setpriv || need+=(util-linux)        # transparent-mode tests: proxy under its own UID
have protoc || need+=(protobuf-compiler)  # etcd-client compiles etcd's .proto files at build time
[ -e /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)  # ... importing protobuf's own
have etcd || need+=(etcd-server)          # tests: sigil-control replicas sharing an etcd store
compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || need+=(postgresql)  # tests: replicas sharing an audit store
if [ "${1:-}" = "--perf" ]; then
    have nginx || need+=(nginx)
    [ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
    have wrk || need+=(wrk)
    have h2load || need+=(nghttp2-client)
fi

if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
echo "setup: installing ${need[*]}" >&2
sudo=()
if [ "$(id -u)" -ne 0 ]; then
    if ! have sudo; then
        echo "setup: need root (or sudo) to install: ${need[*]}" >&2
        exit 1
    fi
    sudo=(sudo)
fi
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
