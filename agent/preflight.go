package agent

import (
	"cmp"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"

	"github.com/shoal-dev/shoal/agent/hostconfig"
)

// The reasons CheckContainerd gives.
const (
	// ReasonHostsNotRead: containerd does not read hosts.toml files from where the agent writes
	// them (no config_path, another directory, or no config file), so pulls bypass Shoal.
	ReasonHostsNotRead = "ContainerdIgnoresMirror"
	// ReasonDiscardUnpackedLayers: containerd deletes image layers once it has unpacked them.
	ReasonDiscardUnpackedLayers = "ContainerdDiscardsLayers"
	// ReasonAnotherMirror: the node's own hosts.toml for a mirrored registry lists another
	// mirror (k3s's embedded registry, a pull-through cache). Not a fault: containerd tries
	// Shoal, then it, then the registry.
	ReasonAnotherMirror = "AnotherMirrorConfigured"
)

// ContainerdFinding is something in containerd's configuration that keeps Shoal from working as
// it should on the node, with the fix in its message.
type ContainerdFinding struct {
	Reason  string
	Message string
	// Info marks a finding that is worth knowing but keeps nothing from working.
	Info bool
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
	for _, registry := range cfg.MirrorRegistries {
		if registry == "*" {
			continue
		}
		if mirrors, err := hostconfig.ExistingMirrors(cfg.ContainerdHostsDir, registry); err == nil && len(mirrors) > 0 {
			found = append(found, ContainerdFinding{Reason: ReasonAnotherMirror, Info: true, Message: fmt.Sprintf(
				"the node's hosts.toml for %s lists another mirror, %s (k3s's embedded registry writes such entries): containerd tries Shoal first, then it, then the registry; "+
					"run one of the two for a registry, as two peer-to-peer mirrors each fetch what the other could have given",
				registry, strings.Join(mirrors, ", "))})
		}
	}
	return found
}
