#!/usr/bin/env bash
# Runs Shoal's benchmarks and rewrites the measured sections of docs/benchmarks.md.
# Every benchmark that starts servers runs inside a network namespace with no route out
# (the e2e package isolates itself; the mirror benchmark only uses loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp)
trap 'rm -f "$out"' EXIT

echo "== warm path: 1 GiB blob through the mirror vs direct file read" >&2
go test -run '^$' -bench '^BenchmarkWarmBlob$' -benchtime "${BENCHTIME_WARM:-5x}" -count 1 ./agent/mirror | tee -a "$out" >&2

echo "== cold pull-through vs direct from the registry, agent peak RSS (real registry and agent)" >&2
SHOAL_E2E=1 go test -run '^$' -bench '^Benchmark(ColdPull|AgentRSS)' -benchtime "${BENCHTIME_COLD:-3x}" -count 1 -timeout 30m ./test/e2e | tee -a "$out" >&2

go run ./hack/benchreport -doc docs/benchmarks.md -section mirror < "$out"

echo "== swarm: N nodes on a shaped netns testbed, cold and warm, against direct pulls (DESIGN.md §6)" >&2
go run ./hack/swarmbench -nodes "${SWARM_NODES:-8,16,32}" -size-mib "${SWARM_SIZE_MIB:-256}" -doc docs/benchmarks.md >&2
