#!/usr/bin/env bash
# `make fuzz FUZZ_SECONDS=N [FUZZ_TARGETS="npy config_toml"] [FUZZ_JOBS=2]`: builds the fuzz
# targets (fuzz/, its own workspace) with cargo-afl and runs each under AFL++ for N seconds,
# FUZZ_JOBS at a time, from its committed seed corpus (fuzz/corpus/<target>) or, where an
# earlier run left one, resuming from it (target/fuzz/<target>). Then it prints a table per
# target: executions (this run and all runs so far), edges found out of the map, the queue,
# and crashes and hangs. It exits 1 if any target saved a crash or a hang; each crash input is
# in target/fuzz/<target>/default/crashes/.
#
# Why cargo-afl: it runs on the stable toolchain (cargo-fuzz and libFuzzer's Rust bindings
# need nightly for the sanitizer flags), and AFL++ is maintained and fast in persistent mode.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_EACH=${FUZZ_SECONDS:-60}
JOBS=${FUZZ_JOBS:-1}
ALL="manifest safetensors torch_zip pickle hatcat_json headspace_calibration npy config_toml service"
TARGETS=${FUZZ_TARGETS:-$ALL}
AFL_VERSION=0.18.2

bash scripts/fetch-libtorch.sh >/dev/null
if ! cargo afl --version 2>/dev/null | grep -q "$AFL_VERSION"; then
    echo "fuzz: installing cargo-afl $AFL_VERSION (it builds AFL++)" >&2
    cargo install cargo-afl --locked --version "$AFL_VERSION"
fi
# cargo-afl builds AFL++ and its LLVM runtime for this rustc on first use.
cargo afl config --build >/dev/null 2>&1 || true

(cd fuzz && cargo afl build --release --bins 2>&1 | grep -Ev "^\s+(Compiling|Downloaded|Downloading)" >&2)

out=target/fuzz
mkdir -p "$out"
export AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_AUTORESUME=1
export AFL_SKIP_CRASHES=1 AFL_QUIET=1

run_one() {
    local t=$1
    local dir=$out/$t
    mkdir -p "$dir"
    # 1 s per execution is a hang; the 1 GiB allocation limit is the targets' own allocator.
    timeout $((SECONDS_EACH + 120)) cargo afl fuzz -i "fuzz/corpus/$t" -o "$dir" -V "$SECONDS_EACH" -t 1000 -m none \
        -- "fuzz/target/release/$t" >"$dir/afl.log" 2>&1 || echo "fuzz: $t: afl-fuzz exited $? (see $dir/afl.log)" >&2
    # AFL++ carries execs_done over a resume: the ledger keeps it after each run, so that the
    # table can tell this run's executions from the campaign's.
    local stats=$dir/default/fuzzer_stats
    [ -f "$stats" ] && awk -F' *: *' '$1=="execs_done"{print $2}' "$stats" >>"$dir/ledger"
}
export -f run_one
export out SECONDS_EACH
printf '%s\n' $TARGETS | xargs -P "$JOBS" -I{} bash -c 'run_one {}'

status=0
printf '\n| target | executions (this run) | executions (all runs) | exec/s | edges found | map size | queue | crashes | hangs |\n'
printf '|---|---:|---:|---:|---:|---:|---:|---:|---:|\n'
for t in $TARGETS; do
    stats=$out/$t/default/fuzzer_stats
    if [ ! -f "$stats" ]; then
        printf '| %s | (no stats: see %s/afl.log) | | | | | | | |\n' "$t" "$out/$t"
        status=1
        continue
    fi
    get() { awk -F' *: *' -v k="$1" '$1==k{print $2}' "$stats"; }
    total=$(get execs_done)
    before=$(tail -n 2 "$out/$t/ledger" | head -n 1)
    [ "$(wc -l <"$out/$t/ledger")" -ge 2 ] || before=0
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$t" "$((total - before))" "$total" "$(get execs_per_sec)" \
        "$(get edges_found)" "$(get total_edges)" "$(get corpus_count)" "$(get saved_crashes)" "$(get saved_hangs)"
    if [ "$(get saved_crashes)" != "0" ] || [ "$(get saved_hangs)" != "0" ]; then status=1; fi
done
exit $status
