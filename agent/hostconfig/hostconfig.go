// Package hostconfig points containerd at the Shoal mirror by writing hosts.toml files under
// containerd's registry config directory (config_path, usually /etc/containerd/certs.d), and
// undoes exactly that on uninstall.
//
// For every mirrored registry the file lists the mirror first and the upstream after it, so a
// dead or failing agent costs one short dial and containerd falls back to the upstream. A
// hosts.toml the node already had is never lost: it is kept byte for byte beside Shoal's file
// (hosts.toml.shoal-backup), and Shoal's file is that user file with the mirror added in front
// of the user's hosts. Every file Shoal writes starts with a marker line, which is how Write
// and Remove tell Shoal's files from the user's.
//
// For the agent's own requests upstream, ExistingServer and ExistingTLS read what the node had
// configured for a registry before Shoal (looking through Shoal's files to the user's): where
// the registry is served and how its hosts are reached over TLS.
//
// The layout follows containerd 1.6's remotes/docker/config: hosts are tried in the order of
// their [host."..."] tables in the file, then the top-level server (https://<registry> when
// unset; https://registry-1.docker.io for docker.io). A file without any [host] table does not
// parse in containerd 1.6, which then silently ignores it, so every file Shoal writes has one.
package hostconfig

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/shoal-dev/shoal/internal/oci"
)

// DefaultDialTimeout is the mirror's dial_timeout when Config.DialTimeout is zero: long enough
// for a loopback connection, short enough that a dead agent does not slow pulls down.
const DefaultDialTimeout = 200 * time.Millisecond

// Names of the files Shoal keeps in a registry directory.
const (
	hostsFile  = "hosts.toml"
	backupFile = "hosts.toml.shoal-backup"
	defaultDir = "_default"
)

// Config says which registries containerd should pull through the mirror.
type Config struct {
	// Dir is containerd's registry config directory (its config_path), e.g. /etc/containerd/certs.d.
	Dir string
	// MirrorURL is the agent's mirror endpoint as containerd reaches it, e.g. http://127.0.0.1:5001.
	MirrorURL string
	// Registries are the registry hosts to mirror (docker.io, registry.test:5000, ...); "*" means
	// every registry that has no directory of its own (containerd's _default/hosts.toml).
	Registries []string
	// Upstream returns the URL containerd falls back to for a registry. "" (or a nil Upstream)
	// means the registry's usual endpoint: https://<registry>, https://registry-1.docker.io for
	// docker.io. It is not consulted for "*", nor for registries that already have a user
	// hosts.toml: there the user's own hosts and server stay the fallback.
	Upstream func(registry string) string
	// DialTimeout bounds containerd's connection attempt to the mirror (dial_timeout; honoured by
	// containerd 1.7 and later, ignored by 1.6). Zero means DefaultDialTimeout.
	DialTimeout time.Duration
}

// Write makes Dir point containerd at the mirror for exactly cfg.Registries: it writes (or
// merges into the user's) hosts.toml for every registry, and undoes Shoal's files for registries
// no longer listed. Writing the same Config twice yields identical files. An invalid Config is
// rejected before anything is touched; a problem with one registry does not stop the others,
// and all problems are returned together.
func Write(cfg Config) error {
	if err := cfg.validate(); err != nil {
		return err
	}
	if err := os.MkdirAll(cfg.Dir, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", cfg.Dir, err)
	}
	var errs []error
	keep := map[string]bool{}
	for _, registry := range cfg.Registries {
		name, err := containerdDirName(cfg.Dir, registry)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if keep[name] {
			continue // listed twice
		}
		// Kept even when the write fails, so a registry's old file is not pruned below.
		keep[name] = true
		if err := writeRegistry(cfg, registry, filepath.Join(cfg.Dir, name)); err != nil {
			errs = append(errs, fmt.Errorf("registry %s: %w", registry, err))
		}
	}
	if err := undoAll(cfg.Dir, keep); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Remove undoes everything Shoal wrote under dir: users' original hosts.toml files are restored
// byte for byte, Shoal's own files are deleted, as are directories Shoal created once they are
// empty. Files Shoal did not write are never touched. Removing twice is harmless.
func Remove(dir string) error {
	return undoAll(dir, nil)
}

// RegistryDir returns the directory name under containerd's config_path for a registry:
// "*" → "_default", anything else unchanged (host:port is a valid directory name, and one that
// containerd 1.6 looks up). It returns "" for a name ValidateRegistry rejects.
func RegistryDir(registry string) string {
	if ValidateRegistry(registry) != nil {
		return ""
	}
	if registry == "*" {
		return defaultDir
	}
	return registry
}

// ValidateRegistry accepts "*" and registry hosts as they appear in image references: a DNS
// name or IPv4 address, or a bracketed IPv6 address, with an optional :port. Everything else,
// in particular anything with "/", "\", ".." or "_default", is rejected, because the name
// becomes a directory name.
func ValidateRegistry(name string) error {
	if name == "*" {
		return nil
	}
	if err := oci.ValidateRegistry(name); err != nil {
		return fmt.Errorf("invalid registry name %q: %w (want host, host:port or \"*\")", name, err)
	}
	return nil
}

func (cfg *Config) validate() error {
	if cfg.Dir == "" {
		return errors.New("hosts directory is empty")
	}
	if _, err := checkURL(cfg.MirrorURL); err != nil {
		return fmt.Errorf("mirror URL: %w", err)
	}
	if cfg.DialTimeout < 0 {
		return fmt.Errorf("negative dial timeout %v", cfg.DialTimeout)
	}
	for _, r := range cfg.Registries {
		if err := ValidateRegistry(r); err != nil {
			return err
		}
	}
	return nil
}

func (cfg *Config) dialTimeout() time.Duration {
	if cfg.DialTimeout == 0 {
		return DefaultDialTimeout
	}
	return cfg.DialTimeout
}

// upstream returns the validated fallback URL for a registry, "" for "*".
func (cfg *Config) upstream(registry string) (string, error) {
	if registry == "*" {
		return "", nil
	}
	raw := ""
	if cfg.Upstream != nil {
		raw = cfg.Upstream(registry)
	}
	if raw == "" {
		return defaultUpstream(registry), nil
	}
	if !strings.Contains(raw, "://") {
		raw = "https://" + raw // what containerd does with a server without scheme
	}
	u, err := checkURL(raw)
	if err != nil {
		return "", fmt.Errorf("upstream: %w", err)
	}
	if u == cfg.MirrorURL {
		return "", fmt.Errorf("upstream %s is the mirror itself", u)
	}
	return u, nil
}

// defaultUpstream is the endpoint containerd 1.6 uses for a registry without configuration.
func defaultUpstream(registry string) string {
	switch {
	case registry == "docker.io":
		return "https://registry-1.docker.io"
	case isLocalhost(registry):
		return "http://" + registry
	default:
		return "https://" + registry
	}
}

// isLocalhost is containerd's docker.IsLocalhost: such registries default to plain HTTP.
func isLocalhost(registry string) bool {
	host := registry
	if h, _, err := net.SplitHostPort(registry); err == nil {
		host = h
	}
	return host == "localhost" || net.ParseIP(host).IsLoopback()
}

// containerdDirName returns the directory containerd reads for registry. For host:port it
// prefers an existing host_port_ directory, which containerd 1.6 looks up before host:port.
func containerdDirName(dir, registry string) (string, error) {
	order := lookupOrder(registry)
	if len(order) == 3 { // host_port_, host:port, _default
		info, err := os.Stat(filepath.Join(dir, order[0]))
		if err == nil && info.IsDir() {
			return order[0], nil
		}
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return "", err
		}
	}
	return RegistryDir(registry), nil
}

// lookupOrder lists the directories containerd 1.6 tries for a registry, first match wins.
func lookupOrder(registry string) []string {
	if registry == "*" {
		return []string{defaultDir}
	}
	var order []string
	if i := strings.LastIndexByte(registry, ':'); i > 0 { // containerd's hostDirectory
		order = append(order, registry[:i]+"_"+registry[i+1:]+"_")
	}
	return append(order, registry, defaultDir)
}

// writeRegistry makes regDir/hosts.toml list the mirror first.
func writeRegistry(cfg Config, registry, regDir string) error {
	hostsPath := filepath.Join(regDir, hostsFile)
	if err := removeTemps(regDir); err != nil {
		return err
	}
	current, err := readOptional(hostsPath)
	if err != nil {
		return err
	}
	state, ours := parseMarker(current)
	var original []byte // the user's file, when there is one
	switch {
	case current != nil && !ours:
		original, state = current, stateMerged
	case ours && state == stateMerged:
		if original, err = os.ReadFile(filepath.Join(regDir, backupFile)); err != nil {
			return fmt.Errorf("%s is a merge of a user file whose backup is unreadable; restore it by hand: %w", hostsPath, err)
		}
	case ours:
		// Rewrite Shoal's own file, keeping the record of whether Shoal created the directory.
	default:
		state = stateNewFile
		if _, err := os.Stat(regDir); errors.Is(err, fs.ErrNotExist) {
			state = stateNewDir
		} else if err != nil {
			return err
		}
	}

	var content []byte
	if len(original) > 0 {
		content, err = renderMerged(state, cfg.MirrorURL, cfg.dialTimeout(), original)
	} else {
		// No user file, or an empty one, which containerd treats as absent.
		var upstream string
		var certs certFiles
		if upstream, err = cfg.upstream(registry); err != nil {
			return err
		}
		if certs, err = findCertFiles(regDir); err != nil {
			return err
		}
		content, err = renderNew(state, cfg.MirrorURL, cfg.dialTimeout(), upstream, certs)
	}
	if err != nil {
		return fmt.Errorf("refusing to write %s: %w", hostsPath, err)
	}
	if ours && string(current) == string(content) {
		return nil
	}

	if state == stateNewDir {
		if err := os.Mkdir(regDir, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
			return err
		}
		// Mkdir is subject to the umask; containerd only needs to read.
		if err := os.Chmod(regDir, 0o755); err != nil {
			return err
		}
	}
	if current != nil && !ours {
		if err := backup(regDir); err != nil {
			return err
		}
	}
	return writeAtomic(hostsPath, content)
}

// undoAll undoes Shoal's files in every registry directory under dir except those in keep.
func undoAll(dir string, keep map[string]bool) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range entries {
		if keep[e.Name()] {
			continue
		}
		regDir := filepath.Join(dir, e.Name())
		// Follows symlinks: a registry directory may be a link the user made.
		if info, err := os.Stat(regDir); err != nil || !info.IsDir() {
			continue
		}
		if err := undo(regDir); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// undo restores regDir to what it was before Shoal, if Shoal wrote its hosts.toml.
func undo(regDir string) error {
	hostsPath := filepath.Join(regDir, hostsFile)
	backupPath := filepath.Join(regDir, backupFile)
	if err := removeTemps(regDir); err != nil {
		return err
	}
	current, err := readOptional(hostsPath)
	if err != nil || current == nil {
		return err
	}
	state, ours := parseMarker(current)
	if !ours {
		return nil
	}
	hasBackup, err := exists(backupPath)
	if err != nil {
		return err
	}
	switch {
	case state == stateMerged && !hasBackup:
		return fmt.Errorf("%s merges a user file whose backup %s is missing; left in place, edit it by hand", hostsPath, backupPath)
	case state == stateMerged, !knownState(state) && hasBackup:
		// Rename puts back the user's original file itself: content, mode, owner, even a symlink.
		if err := os.Rename(backupPath, hostsPath); err != nil {
			return fmt.Errorf("restore %s: %w", hostsPath, err)
		}
		syncDir(regDir)
		return nil
	}
	if err := os.Remove(hostsPath); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if state == stateNewDir {
		if info, err := os.Lstat(regDir); err == nil && info.IsDir() {
			// Fails, as it should, when someone else has put files there since.
			if err := os.Remove(regDir); err != nil && !errors.Is(err, fs.ErrExist) && !isNotEmpty(err) {
				return err
			}
		}
	}
	return nil
}

func knownState(s string) bool {
	return slices.Contains([]string{stateMerged, stateNewDir, stateNewFile}, s)
}
