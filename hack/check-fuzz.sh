#!/usr/bin/env bash
# Checks that `make fuzz` runs every fuzz target of the module and names only targets that exist:
# `go test -fuzz` with a pattern that matches nothing passes silently, so a renamed or moved
# target would otherwise stop being fuzzed without anyone noticing.
set -euo pipefail
cd "$(dirname "$0")/.."

status=0
declare -A have
while IFS=: read -r file _ line; do
	name=$(sed -E 's/^func (Fuzz[A-Za-z0-9_]*).*/\1/' <<<"$line")
	dir=./$(dirname "$file")
	have["$name $dir"]=1
	if ! grep -qE -- "-fuzz='\^${name}\\$\\$'.* ${dir}\$" Makefile; then
		echo "check-fuzz: ${name} in ${dir} is not run by 'make fuzz'" >&2
		status=1
	fi
done < <(grep -rnE --include='*_test.go' '^func Fuzz[A-Za-z0-9_]*\(' agent cmd internal api controllers 2>/dev/null || true)

while read -r name dir; do
	if [[ -z ${have["$name $dir"]:-} ]]; then
		echo "check-fuzz: 'make fuzz' names ${name} in ${dir}, which does not exist" >&2
		status=1
	fi
done < <(sed -nE "s/.*-fuzz='\^(Fuzz[A-Za-z0-9_]*)\\$\\$'.* (\.\/[^ ]+)\$/\1 \2/p" Makefile)
exit $status
