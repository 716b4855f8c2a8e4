#!/usr/bin/env bash
# Renders the chart's agent DaemonSet and controller Deployment (and its metrics Service) with
# default values into the kustomize bases config/agent and config/manager, so that both ways of
# installing run the same pods. Called by `make manifests`; `make verify` fails on drift.
set -euo pipefail
HELM=${HELM:-$HOME/.cache/shoal/bin/helm}
cd "$(dirname "$0")/.."
render() { # template → file
  {
    echo "# Generated from charts/shoal ($1) by hack/kustomize-workloads.sh: edit the chart, then make manifests."
    "$HELM" template shoal charts/shoal --namespace shoal-system --kube-version 1.37.1 --show-only "$1" |
      grep -v -e '^# Source:' -e 'app.kubernetes.io/managed-by: Helm' -e 'helm.sh/chart:'
  } > "$2"
}
render templates/agent.yaml config/agent/agent.yaml
render templates/controller.yaml config/manager/manager.yaml
