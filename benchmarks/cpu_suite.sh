#!/usr/bin/env bash
# Every CPU figure of docs/BENCHMARKS.md, one benchmark after another (never two at once: they share the cores).
# Each writes its output to OUT/<name>.txt; about 80 minutes on a 2-core CPU.
#
#     DEEPPLAIN_DATA=../shared/datasets bash benchmarks/cpu_suite.sh results/bench-$(date +%F)
#
# The Cockpit comparison needs `pip install -e ".[bench]"`; without it that line says so and the rest runs.
set -uo pipefail
out=${1:?usage: bash benchmarks/cpu_suite.sh OUT_FOLDER}
mkdir -p "$out" && out=$(cd "$out" && pwd)  # absolute, from where the script was started
cd "$(dirname "$0")/.."
run() {  # run NAME SCRIPT ARGS...: one benchmark, its output kept
    local name=$1 script=$2; shift 2
    echo "== $name: python benchmarks/$script $* ($(date +%H:%M:%S))"
    python "benchmarks/$script" "$@" > "$out/$name.txt" 2>&1 || echo "   failed: see $out/$name.txt"
    grep -E "^[a-z_0-9]+=" "$out/$name.txt" || true
}
run framework_quick framework_overhead.py --quick
run framework_full framework_overhead.py
run batchnorm batchnorm_cost.py
run van_resnet van_vs_resnet.py
run van_conv van_vs_resnet.py --conv
run dropin dropin_overhead.py
run usps diagnostics_overhead.py --usps --repeats 5
run quick20 diagnostics_overhead.py --quick
run long diagnostics_overhead.py
run per_sample diagnostics_overhead.py --per-sample
run data_path data_path.py
run cockpit peer_cockpit.py --steps 40 --samples 2 --repeats 1
run logger_images logger_image_cost.py
echo "== done ($(date +%H:%M:%S))"
