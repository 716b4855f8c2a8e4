package agent

import (
	"cmp"
	"errors"
	"io/fs"
	"os"

	"github.com/shoal-dev/shoal/agent/hostconfig"
)

// The reasons CheckContainerd gives.
const (
	// ReasonHostsNotRead: containerd does not read hosts.toml files from where the agent writes
	// them (no config_path, another directory, or no config file), so pulls bypass Shoal.
	ReasonHostsNotRead = "ContainerdIgnoresMirror"
	// ReasonDiscardUnpackedLayers: containerd deletes image layers once it has unpacked them.
	ReasonDiscardUnpackedLayers = "ContainerdDiscardsLayers"
)

// ContainerdFinding is something in containerd's configuration that keeps Shoal from working as
// it should on the node, with the fix in its message.
type ContainerdFinding struct {
	Reason  string
	Message string
}

// The agent reports what CheckContainerd finds as events on its Node.
// +kubebuilder:rbac:groups="",resources=events,verbs=create

// CheckContainerd is the agent's preflight: it reads containerd's configuration (never changes
// it, never restarts containerd) and says what is wrong for Shoal. It finds nothing when the
// agent writes no hosts.toml or was given no config file to check.
func CheckContainerd(cfg Config) []ContainerdFinding {
	if cfg.ContainerdConfig == "" || cfg.ContainerdHostsDir == "" {
		return nil
	}
	var found []ContainerdFinding
	// containerd names the directory as it sees it, which is not where a containerized agent
	// has it mounted.
	dir := cmp.Or(cfg.ContainerdHostsDirOnHost, cfg.ContainerdHostsDir)
	if err := hostconfig.CheckContainerdConfig(cfg.ContainerdConfig, dir); err != nil {
		found = append(found, ContainerdFinding{Reason: ReasonHostsNotRead, Message: err.Error()})
	}
	if _, err := os.Stat(cfg.ContainerdConfig); errors.Is(err, fs.ErrNotExist) {
		return found
	}
	if err := hostconfig.CheckDiscardUnpackedLayers(cfg.ContainerdConfig); err != nil {
		found = append(found, ContainerdFinding{Reason: ReasonDiscardUnpackedLayers, Message: err.Error()})
	}
	return found
}
