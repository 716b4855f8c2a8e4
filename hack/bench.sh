#!/usr/bin/env bash
# Runs Shoal's benchmarks and rewrites the measured sections of docs/benchmarks.md.
# Usage: hack/bench.sh [SECTION...], sections mirror, swarm and scale; none = all of them.
# Every benchmark that starts servers runs inside a network namespace with no route out
# (the e2e package, swarmbench and scalebench isolate themselves; the mirror benchmark only
# uses loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
sections=("$@")
if [ ${#sections[@]} -eq 0 ]; then
	sections=(mirror swarm scale)
fi
for s in "${sections[@]}"; do
	case "$s" in
	mirror | swarm | scale) ;;
	*)
		echo "bench.sh: unknown section $s (want mirror, swarm or scale)" >&2
		exit 2
		;;
	esac
done
want() { [[ " ${sections[*]} " == *" $1 "* ]]; }

if want mirror; then
	out=$(mktemp)
	trap 'rm -f "$out"' EXIT

	echo "== warm path: 1 GiB blob through the mirror vs direct file read" >&2
	go test -run '^$' -bench '^BenchmarkWarmBlob$' -benchtime "${BENCHTIME_WARM:-5x}" -count 1 ./agent/mirror | tee -a "$out" >&2

	echo "== cold pull-through vs direct from the registry, agent peak RSS (real registry and agent)" >&2
	SHOAL_E2E=1 go test -run '^$' -bench '^Benchmark(ColdPull|AgentRSS)' -benchtime "${BENCHTIME_COLD:-3x}" -count 1 -timeout 30m ./test/e2e | tee -a "$out" >&2

	go run ./hack/benchreport -doc docs/benchmarks.md -section mirror < "$out"
fi

if want swarm; then
	# The grid: every N with every size, 3 runs of cold and warm each (about an hour). A cell
	# whose stores need more than SWARM_MAX_CELL_GIB (N × S) is skipped: 1 GiB at N = 32.
	echo "== swarm: N nodes on a shaped netns testbed, cold and warm, against direct pulls" >&2
	go run ./hack/swarmbench -nodes "${SWARM_NODES:-8,16,32}" -size-mib "${SWARM_SIZE_MIB:-16,64,256,1024}" \
		-runs "${SWARM_RUNS:-3}" -max-cell-gib "${SWARM_MAX_CELL_GIB:-16}" -doc docs/benchmarks.md >&2
	# A realistic image pulled through CRI by every node's containerd (about 20 minutes).
	echo "== swarm: a multi-layer image through real containerd, cold and warm, against direct pulls" >&2
	go run ./hack/swarmbench -nodes "${IMAGE_NODES:-8,16}" -image-mib "${IMAGE_MIB:-256}" -runs "${SWARM_RUNS:-3}" \
		-scenarios image-direct,image-cold,image-warm -section swarm-image -doc docs/benchmarks.md >&2
fi

if want scale; then
	# SCALEBENCH_ARGS, e.g. "-nodes 100 -pods 2000", changes the size; the section shows the command.
	read -ra scale_args <<<"${SCALEBENCH_ARGS:-}"
	echo "== controller at scale: Nodes, pending Pods and images in envtest, API writes and seed latency" >&2
	go run ./hack/scalebench -prewarms "${SCALE_PREWARMS:-10}" "${scale_args[@]}" -doc docs/benchmarks.md >&2
fi
