#!/usr/bin/env bash
# sigil-iptables.sh: sends a workload's TCP traffic through its Sigil sidecar (transparent mode).
#
# Run it once, as root, in the workload's network namespace before the workload starts (an init
# container in Kubernetes, `ip netns exec NS sigil-iptables.sh install` elsewhere). It only touches
# the IPv4 nat table and only its own chains plus one jump each from PREROUTING and OUTPUT, so
# `sigil-iptables.sh uninstall` can remove exactly what `install` added.
#
# See README.md next to this file for what is redirected and what is left alone.
set -euo pipefail

PROG=$(basename "$0")

# Our chains in the nat table. Every rule this script adds lives in one of them, except the two
# jumps that hang them off the built-in chains (JUMPS below).
CH_INBOUND=SIGIL_INBOUND          # PREROUTING -p tcp: what arrives for the workload
CH_IN_REDIRECT=SIGIL_IN_REDIRECT  # -> inbound listener
CH_OUTPUT=SIGIL_OUTPUT            # OUTPUT -p tcp: what the workload sends
CH_REDIRECT=SIGIL_REDIRECT        # -> outbound listener
CHAINS=("$CH_INBOUND" "$CH_IN_REDIRECT" "$CH_OUTPUT" "$CH_REDIRECT")
# "builtin-chain rule-spec..." of each jump install adds; uninstall deletes exactly these.
JUMPS=("PREROUTING -p tcp -j $CH_INBOUND" "OUTPUT -p tcp -j $CH_OUTPUT")

usage() {
    cat <<EOF
Usage:
  $PROG install [options]   redirect this network namespace's TCP traffic through the sidecar
  $PROG uninstall           remove every rule and chain that install added (safe to repeat)
  $PROG help                show this text

Options for install (defaults in brackets; ports are 1-65535, lists are comma-separated):
  --proxy-uid UID               UID the sidecar runs as; its traffic is never redirected [1337]
  --proxy-gid GID               also never redirect traffic from processes with this GID [none]
  --outbound-port PORT          sidecar outbound listener (on 127.0.0.1) [15001]
  --inbound-port PORT           sidecar inbound listener [15006]
  --admin-port PORT             sidecar admin listener; inbound traffic to it is not redirected [15000]
  --exclude-inbound-ports LIST  inbound destination ports that bypass the sidecar [none]
  --exclude-outbound-ports LIST outbound destination ports that bypass the sidecar [none]

Install first removes an earlier install, so running it again with new options replaces the
rules. Needs root (CAP_NET_ADMIN) and iptables with the nat table and the owner match.
EOF
}

die() {
    echo "$PROG: error: $*" >&2
    exit 1
}

die_usage() {
    echo "$PROG: error: $*" >&2
    echo "Run '$PROG help' for usage." >&2
    exit 2
}

# Prints each iptables command before running it, so the log shows exactly what was changed.
ipt() {
    echo "+ iptables -t nat $*"
    iptables -w 5 -t nat "$@"
}

# Quiet probe: does the rule / chain exist?
ipt_quiet() {
    iptables -w 5 -t nat "$@" >/dev/null 2>&1
}

check_port() { # NAME VALUE
    local name=$1 v=$2
    [[ $v =~ ^[0-9]+$ ]] && ((10#$v >= 1 && 10#$v <= 65535)) ||
        die_usage "$name: '$v' is not a port number (1-65535)"
}

check_id() { # NAME VALUE
    local name=$1 v=$2
    [[ $v =~ ^[0-9]+$ ]] && ((10#$v <= 4294967294)) ||
        die_usage "$name: '$v' is not a numeric id (use 'id -u NAME' / 'id -g NAME' for a name)"
}

join() { # SEP ITEM...
    local IFS=$1
    shift
    echo "$*"
}

# Splits a comma-separated port list into the array named by $3, validating each port.
parse_ports() { # NAME VALUE OUT_ARRAY
    local name=$1 v=$2 p
    local -a parts
    local -n out=$3
    out=()
    [[ -n $v ]] || return 0
    IFS=, read -r -a parts <<<"$v"
    for p in "${parts[@]}"; do
        p=${p//[[:space:]]/}
        [[ -n $p ]] || die_usage "$name: empty entry in '$v'"
        check_port "$name" "$p"
        out+=("$((10#$p))")
    done
}

need_root_and_iptables() {
    command -v iptables >/dev/null 2>&1 || die "iptables not found on PATH"
    [[ $(id -u) -eq 0 ]] || die "must run as root (needs CAP_NET_ADMIN to change the nat table)"
    ipt_quiet -S PREROUTING || die "cannot read the nat table: is the iptable_nat / nf_tables module available?"
}

cmd_uninstall() {
    echo "$PROG: removing Sigil redirection from the nat table"
    local jump removed=0 chain
    for jump in "${JUMPS[@]}"; do
        # shellcheck disable=SC2086 # the rule spec is split on purpose
        while ipt_quiet -C $jump; do
            # shellcheck disable=SC2086
            ipt -D $jump
            removed=1
        done
    done
    # Flush every chain first: they jump to each other, and a chain that is still referenced
    # cannot be deleted.
    for chain in "${CHAINS[@]}"; do
        if ipt_quiet -S "$chain"; then
            ipt -F "$chain"
            removed=1
        fi
    done
    for chain in "${CHAINS[@]}"; do
        if ipt_quiet -S "$chain"; then
            ipt -X "$chain"
        fi
    done
    if ((removed)); then
        echo "$PROG: removed"
    else
        echo "$PROG: nothing to remove (not installed)"
    fi
}

cmd_install() {
    local proxy_uid=1337 proxy_gid="" outbound_port=15001 inbound_port=15006 admin_port=15000
    local excl_in_raw="" excl_out_raw=""
    while (($#)); do
        case $1 in
        --proxy-uid | --proxy-gid | --outbound-port | --inbound-port | --admin-port | \
            --exclude-inbound-ports | --exclude-outbound-ports)
            (($# >= 2)) || die_usage "$1 needs a value"
            local opt=$1 val=$2
            shift 2
            ;;
        --*=*)
            local opt=${1%%=*} val=${1#*=}
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *) die_usage "unknown argument '$1'" ;;
        esac
        case $opt in
        --proxy-uid) proxy_uid=$val ;;
        --proxy-gid) proxy_gid=$val ;;
        --outbound-port) outbound_port=$val ;;
        --inbound-port) inbound_port=$val ;;
        --admin-port) admin_port=$val ;;
        --exclude-inbound-ports) excl_in_raw=$val ;;
        --exclude-outbound-ports) excl_out_raw=$val ;;
        *) die_usage "unknown option '$opt'" ;;
        esac
    done
    check_id --proxy-uid "$proxy_uid"
    [[ -z $proxy_gid ]] || check_id --proxy-gid "$proxy_gid"
    check_port --outbound-port "$outbound_port"
    check_port --inbound-port "$inbound_port"
    check_port --admin-port "$admin_port"
    local -a excl_in excl_out
    parse_ports --exclude-inbound-ports "$excl_in_raw" excl_in
    parse_ports --exclude-outbound-ports "$excl_out_raw" excl_out
    [[ $outbound_port != "$inbound_port" ]] ||
        die_usage "--outbound-port and --inbound-port are both $inbound_port"

    need_root_and_iptables

    # Start from a clean slate so a second install replaces the first instead of stacking.
    cmd_uninstall

    echo "$PROG: installing: inbound TCP -> port $inbound_port, outbound TCP -> 127.0.0.1:$outbound_port"
    echo "$PROG:   inbound ports not redirected: $(join , "$admin_port" "$inbound_port" "$outbound_port" "${excl_in[@]}")"
    echo "$PROG:   outbound not redirected: proxy uid $proxy_uid${proxy_gid:+, proxy gid $proxy_gid}, loopback 127.0.0.0/8${excl_out[*]:+, ports $(join , "${excl_out[@]}")}"

    local chain p
    for chain in "${CHAINS[@]}"; do
        ipt -N "$chain"
    done

    # Inbound: every TCP port goes to the inbound listener, except the sidecar's own ports
    # (admin must stay reachable for probes and scraping; a connection aimed at a listener port
    # is not a workload connection) and the ports the operator excluded.
    ipt -A "$CH_IN_REDIRECT" -p tcp -j REDIRECT --to-ports "$inbound_port"
    for p in "$admin_port" "$inbound_port" "$outbound_port" "${excl_in[@]}"; do
        ipt -A "$CH_INBOUND" -p tcp --dport "$p" -j RETURN
    done
    ipt -A "$CH_INBOUND" -p tcp -j "$CH_IN_REDIRECT"

    # Outbound: the sidecar's own connections (to peers, and plaintext to the local workload
    # after inbound termination) must not be caught again, or they would loop back into it.
    ipt -A "$CH_REDIRECT" -p tcp -j REDIRECT --to-ports "$outbound_port"
    ipt -A "$CH_OUTPUT" -m owner --uid-owner "$proxy_uid" -j RETURN
    if [[ -n $proxy_gid ]]; then
        ipt -A "$CH_OUTPUT" -m owner --gid-owner "$proxy_gid" -j RETURN
    fi
    # Loopback traffic stays local (workload to itself, probes, the admin port).
    ipt -A "$CH_OUTPUT" -o lo -d 127.0.0.0/8 -j RETURN
    for p in "${excl_out[@]}"; do
        ipt -A "$CH_OUTPUT" -p tcp --dport "$p" -j RETURN
    done
    ipt -A "$CH_OUTPUT" -p tcp -j "$CH_REDIRECT"

    # Hook the chains in last, so traffic is redirected only once every exclusion is in place.
    local jump
    for jump in "${JUMPS[@]}"; do
        # shellcheck disable=SC2086
        ipt -A $jump
    done
    echo "$PROG: installed"
}

main() {
    (($#)) || {
        usage >&2
        exit 2
    }
    local cmd=$1
    shift
    case $cmd in
    install) cmd_install "$@" ;;
    uninstall)
        (($# == 0)) || die_usage "uninstall takes no options (got '$*')"
        need_root_and_iptables
        cmd_uninstall
        ;;
    help | -h | --help) usage ;;
    *) die_usage "unknown command '$cmd' (expected install or uninstall)" ;;
    esac
}

main "$@"
