#!/usr/bin/env bash
# Long property-test ("fuzz") runs of the parsers, beyond the bounded case counts CI runs.
#
#   scripts/fuzz-long.sh [-m MINUTES] [-c CASES] [--release] [TARGET [FILTER]]
#
# TARGET is `config` (config/tests/prop.rs), `filters` (filters/tests/prop.rs), `proxy`
# (the persisted-snapshot reader's properties in proxy/src/control.rs) or `all` (default). FILTER, optional, selects properties by name as `cargo test` does (substring),
# e.g. `scripts/fuzz-long.sh filters normalize_path`.
#
# The test binary is run again and again, each round with PROPTEST_CASES=CASES (default
# 20000) for every property and a fresh random PROPTEST_RNG_SEED, until MINUTES (default 10)
# have passed; with `all`, the targets take turns. The last round finishes, so a run may
# overrun by one round. At the end it prints the rounds and cases run and every failure.
#
# A failure is shrunk by proptest and its seed saved in <crate>/proptest-regressions/prop.txt,
# which every later run (CI included) replays first: commit that file with the fix, or with
# the regression test the failure deserves. Each failing round's log is kept under
# target/fuzz-long/, with the command that reproduces it (same seed, same case count).
#
# Debug builds by default, like CI: overflow checks and debug assertions stay on, which is
# how an unchecked multiplication was found. --release runs many more cases per minute.
set -euo pipefail
cd "$(dirname "$0")/.."

minutes=10
cases=20000
profile=()
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        -m|--minutes) minutes="$2"; shift 2 ;;
        -c|--cases) cases="$2"; shift 2 ;;
        --release) profile=(--release); shift ;;
        -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
target="${args[0]:-all}"
filter="${args[1]:-}"
case "$target" in
    config) crates=(config) ;;
    filters) crates=(filters) ;;
    proxy) crates=(proxy) ;;
    all) crates=(config filters proxy) ;;
    *) echo "unknown target $target: config, filters, proxy or all" >&2; exit 2 ;;
esac
# Where each target's properties are, and how cargo names its test binary.
declare -A source=([config]=config/tests/prop.rs [filters]=filters/tests/prop.rs [proxy]=proxy/src/control.rs)
declare -A indent=([config]="    " [filters]="    " [proxy]="        ")
test_args() { # crate -> cargo test arguments that select its property tests' binary
    if [ "$1" = proxy ]; then echo "--bin sigil-proxy"; else echo "--test prop"; fi
}
if ! [[ "$minutes" =~ ^[0-9]+([.][0-9]+)?$ && "$cases" =~ ^[0-9]+$ ]]; then
    echo "MINUTES must be a number and CASES a whole number" >&2
    exit 2
fi

# Build each test binary once and find it.
declare -A exe
for c in "${crates[@]}"; do
    # shellcheck disable=SC2046
    out=$(cargo test "${profile[@]}" -p "sigil-$c" $(test_args "$c") --no-run 2>&1) || {
        echo "$out" >&2
        exit 1
    }
    exe[$c]=$PWD/$(echo "$out" | sed -n 's/.*Executable .* (\(.*\))$/\1/p' | tail -1)
    [ -x "${exe[$c]}" ] || { echo "no test binary for $c in: $out" >&2; exit 1; }
done

# Property tests are the `#[test]`s inside `proptest!` blocks, indented by rustfmt one level
# deeper than the plain ones (regression tests), which run one case.
props() { # crate -> names of its property tests matching the filter
    local i="${indent[$1]}"
    awk -v i="$i" '$0 == i "#[test]" {t=1; next}
        t && index($0, i "fn ") == 1 {s=substr($0, length(i) + 4); sub(/\(.*/, "", s); print s; t=0}' \
        "${source[$1]}" | grep -F -- "$filter" || true
}

logdir="target/fuzz-long/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$logdir"
deadline=$(awk -v m="$minutes" -v now="$(date +%s)" 'BEGIN { printf "%d", now + m * 60 }')
declare -A rounds=() property_cases=() failed_rounds=()
failures=()
start=$(date +%s)
echo "fuzzing ${crates[*]}${filter:+ (filter: $filter)} for $minutes min, $cases cases per property a round; logs in $logdir"
while :; do
    for c in "${crates[@]}"; do
        n=$(props "$c" | wc -l)
        if [ "$n" -eq 0 ]; then
            echo "$c: no property test matches '$filter'" >&2
            exit 2
        fi
        seed=$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')
        log="$logdir/$c-$seed.log"
        t0=$(date +%s)
        set +e
        # Run from the crate, as cargo test does.
        (cd "$c" && PROPTEST_CASES="$cases" PROPTEST_RNG_SEED="$seed" RUST_BACKTRACE=0 \
            "${exe[$c]}" ${filter:+"$filter"} >"../$log" 2>&1)
        rc=$?
        set -e
        rounds[$c]=$(( ${rounds[$c]:-0} + 1 ))
        property_cases[$c]=$(( ${property_cases[$c]:-0} + n * cases ))
        summary=$(grep -a '^test result:' "$log" | tail -1 || true)
        printf '%s round %d: seed %s, %d properties x %d cases, %ds: %s\n' "$c" "${rounds[$c]}" \
            "$seed" "$n" "$cases" "$(( $(date +%s) - t0 ))" "${summary:-no result (rc $rc)}"
        if [ $rc -ne 0 ]; then
            failed_rounds[$c]=$(( ${failed_rounds[$c]:-0} + 1 ))
            for name in $(grep -a -o '^test [A-Za-z0-9_]* \.\.\. FAILED' "$log" | awk '{print $2}' || true); do
                failures+=("$c::$name seed $seed")
                grep -a -A2 'minimal failing input' "$log" | sed 's/^/    /' || true
            done
            echo "PROPTEST_CASES=$cases PROPTEST_RNG_SEED=$seed cargo test ${profile[*]} -p sigil-$c $(test_args "$c") -- ${filter}" \
                >"$log.reproduce"
            echo "    log: $log; reproduce: $(cat "$log.reproduce")"
        else
            rm -f "$log"
        fi
    done
    # Every target gets its turn before the time is checked.
    [ "$(date +%s)" -ge "$deadline" ] && break
done

echo
echo "== fuzz-long: $(( ($(date +%s) - start) / 60 )) min $(( ($(date +%s) - start) % 60 )) s"
for c in "${crates[@]}"; do
    echo "$c: ${rounds[$c]:-0} rounds, ${property_cases[$c]:-0} property cases, ${failed_rounds[$c]:-0} failing rounds"
done
if [ ${#failures[@]} -eq 0 ]; then
    echo "failures: none"
    rmdir "$logdir" 2>/dev/null || true
    exit 0
fi
echo "failures (saved to <crate>/proptest-regressions/prop.txt; logs in $logdir):"
printf '  %s\n' "${failures[@]}" | sort | uniq -c
exit 1
