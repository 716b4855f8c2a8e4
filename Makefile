# Shoal's single entry point: make build test lint generate manifests bench demo.
SHELL := /usr/bin/env bash
.SHELLFLAGS := -euo pipefail -c

SHOAL_CACHE ?= $(HOME)/.cache/shoal
K8S_VERSION ?= 1.37.1
BIN_DIR := $(SHOAL_CACHE)/bin
CONTROLLER_GEN := $(BIN_DIR)/controller-gen
GOLANGCI_LINT := $(BIN_DIR)/golangci-lint
export KUBEBUILDER_ASSETS := $(SHOAL_CACHE)/k8s/$(K8S_VERSION)
export CGO_ENABLED ?= 0
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X main.version=$(VERSION)
# Fuzz budgets are execution counts, about 20 s each on a 2-core machine. A
# duration (-fuzztime=20s) races Go's fuzz coordinator at the deadline and can
# fail a target with a bare "context deadline exceeded" and no crasher; a count
# has no deadline to race. FUZZ_SCALE multiplies every count (1 = default).
FUZZ_SCALE ?= 1
fuzz_execs = $(shell echo $$(( $(1) * $(FUZZ_SCALE) )))x
GO_TEST_FLAGS ?=

.PHONY: all
all: build

##@ Setup

.PHONY: deps
deps: ## Install apt packages, Go tools and the envtest kube-apiserver (idempotent).
	@hack/install-deps.sh

##@ Build

.PHONY: build
build: ## Build bin/shoal (static).
	go build -trimpath -ldflags "$(LDFLAGS)" -o bin/shoal ./cmd/shoal

# Where make image puts the image: an OCI layout directory, or, with IMAGE_PUSH=host:port/shoal:tag,
# a registry (plain HTTP for loopback ones).
IMAGE_LAYOUT ?= bin/image
IMAGE_PUSH ?=

.PHONY: image
image: build ## Build Shoal's container image without Docker (hack/image): an OCI layout in bin/image, or IMAGE_PUSH=ref.
	go run ./hack/image -binary bin/shoal -version $(VERSION) $(if $(IMAGE_PUSH),-push $(IMAGE_PUSH),-layout $(IMAGE_LAYOUT))

.PHONY: generate
generate: deps ## Generate deepcopy code for the API types.
	@if compgen -G 'api/*/*.go' >/dev/null; then $(CONTROLLER_GEN) object paths=./api/...; fi

.PHONY: manifests
manifests: deps ## Generate CRDs and RBAC into config/ and the chart, and the kustomize bases' workloads from the chart.
	$(CONTROLLER_GEN) crd paths=./api/... output:crd:artifacts:config=config/crd/bases
	$(CONTROLLER_GEN) rbac:roleName=shoal-controller paths=./controllers/... output:rbac:artifacts:config=config/rbac/controller
	$(CONTROLLER_GEN) rbac:roleName=shoal-agent paths=./agent/... output:rbac:artifacts:config=config/rbac/agent
	@# The chart carries the same CRDs, roles and admission policy, rendered from these copies.
	@mkdir -p charts/shoal/files/crds charts/shoal/files/rbac
	cp config/crd/bases/*.yaml charts/shoal/files/crds/
	cp config/rbac/controller/role.yaml charts/shoal/files/rbac/controller.yaml
	cp config/rbac/agent/role.yaml charts/shoal/files/rbac/agent.yaml
	cp config/policy/agent-own-node.yaml charts/shoal/files/agent-own-node.yaml
	@# The kustomize bases run the chart's own pods, rendered with its defaults.
	hack/kustomize-workloads.sh

##@ Verify

.PHONY: verify
verify: generate manifests ## Fail when generated files drift from what is committed, or code is unformatted.
	@drift=$$(git status --porcelain -- api config charts); \
	if [ -n "$$drift" ]; then echo "generated files drift from the commit (run make generate manifests):"; echo "$$drift"; exit 1; fi
	@unformatted=$$(gofmt -l $$(git ls-files '*.go')); \
	if [ -n "$$unformatted" ]; then echo "gofmt needed: $$unformatted"; exit 1; fi

.PHONY: lint
lint: deps ## go vet and golangci-lint.
	go vet ./...
	$(GOLANGCI_LINT) run ./...

##@ Test

.PHONY: test
test: deps verify lint unit fuzz e2e ## Everything CI runs.

.PHONY: unit
unit: ## Unit and integration tests of every package (race detector on).
	CGO_ENABLED=1 go test -race -count=1 -timeout 15m $(GO_TEST_FLAGS) $$(go list ./... | grep -v /test/e2e)
	# The swarm's tests again with pieces moved by agent/piecewire instead of the torrent client.
	SHOAL_SWARM_TEST_DATA_PATH=pieces CGO_ENABLED=1 go test -race -count=1 -timeout 10m $(GO_TEST_FLAGS) ./agent/swarm

.PHONY: fuzz
fuzz: ## Run each fuzz target for a fixed number of executions (FUZZ_SCALE=k for k times more).
	hack/check-fuzz.sh
	go test -run='^$$' -fuzz='^FuzzParseRequest$$' -fuzztime=$(call fuzz_execs,100000) ./agent/mirror
	go test -run='^$$' -fuzz='^FuzzParseDigest$$' -fuzztime=$(call fuzz_execs,400000) ./internal/oci
	go test -run='^$$' -fuzz='^FuzzRenderMerged$$' -fuzztime=$(call fuzz_execs,80000) ./agent/hostconfig
	go test -run='^$$' -fuzz='^FuzzParseRequest$$' -fuzztime=$(call fuzz_execs,45000) ./agent/plan
	go test -run='^$$' -fuzz='^FuzzParseContentRange$$' -fuzztime=$(call fuzz_execs,40000) ./agent/upstream
	go test -run='^$$' -fuzz='^FuzzParseEndpoint$$' -fuzztime=$(call fuzz_execs,40000) ./agent/upstream
	go test -run='^$$' -fuzz='^FuzzParsePeers$$' -fuzztime=$(call fuzz_execs,40000) ./agent/membership
	go test -run='^$$' -fuzz='^FuzzReadFrame$$' -fuzztime=$(call fuzz_execs,40000) ./agent/piecewire
	go test -run='^$$' -fuzz='^FuzzParseReference$$' -fuzztime=$(call fuzz_execs,40000) ./controllers/resolve

.PHONY: e2e
e2e: ## End-to-end tests: real registry, containerd through CRI, agents (root; isolated network namespace).
	SHOAL_E2E=1 go test -count=1 -timeout 30m $(GO_TEST_FLAGS) ./test/e2e/...

##@ Run

.PHONY: bench
bench: deps ## Benchmarks; writes docs/benchmarks.md.
	hack/bench.sh

.PHONY: bench-scale
bench-scale: deps ## The controller's scale benchmark alone (envtest, about 3 minutes); writes its section of docs/benchmarks.md.
	hack/bench.sh scale

.PHONY: demo
demo: deps ## Local cluster story on network namespaces: registry, containerd, agent.
	go run ./hack/demo

.PHONY: clean
clean:
	rm -rf bin

.PHONY: help
help: ## Show this help.
	@awk 'BEGIN {FS = ":.*##"} /^[a-zA-Z_-]+:.*?##/ { printf "  %-12s %s\n", $$1, $$2 } /^##@/ { printf "\n%s\n", substr($$0, 5) }' $(MAKEFILE_LIST)
