package hostconfig

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/pelletier/go-toml/v2"
)

// containerd2DefaultConfigPath is the config_path containerd 2.x uses on Linux when its
// configuration sets none (and no registry mirrors).
const containerd2DefaultConfigPath = "/etc/containerd/certs.d:/etc/docker/certs.d"

// maxConfigFiles bounds how many files a containerd config may import.
const maxConfigFiles = 64

// criPlugin returns where the CRI registry settings live for a containerd config version.
func criPlugin(version int64) (string, bool) {
	switch version {
	case 1:
		return "cri", true // containerd 1.x, short plugin names
	case 2:
		return "io.containerd.grpc.v1.cri", true // containerd 1.x
	case 3:
		return "io.containerd.cri.v1.images", true // containerd 2.x
	}
	return "", false
}

// CheckContainerdConfig reports whether containerd, configured by the config.toml at
// configPath, reads hosts.toml files from dir. It reads the file and its imports as containerd
// does and finds the CRI plugin's registry.config_path. The error, if any, is meant for the
// operator: it says what to set, in which file, and that containerd must then be restarted.
func CheckContainerdConfig(configPath, dir string) error {
	if configPath == "" {
		return errors.New("no containerd config file given")
	}
	if _, err := os.Stat(configPath); errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("containerd config %s does not exist, so containerd ignores Shoal's hosts.toml files; "+
			"create it with `version = 2` and config_path = %s in a [plugins.%s.registry] section, and restart containerd",
			configPath, quote(dir), quote("io.containerd.grpc.v1.cri"))
	}
	cri, err := loadCRISection(configPath)
	if err != nil {
		return err
	}
	version, sectionFile, section, key := cri.version, cri.file, cri.table, cri.key
	fix := fmt.Sprintf("set config_path = %s in the [plugins.%s.registry] section of %s and restart containerd",
		quote(dir), quote(key), sectionFile)

	var value any
	if registry, ok := section["registry"].(map[string]any); ok {
		value = registry["config_path"]
	} else if section["registry"] != nil {
		return fmt.Errorf("%s: plugins.%s.registry is not a table", sectionFile, quote(key))
	}
	roots, isString := value.(string)
	if value == nil && version >= 3 {
		// containerd 2.x (the only reader of version 3 files) reads hosts.toml files from its
		// default directories when config_path is unset, on Linux.
		value, roots, isString = containerd2DefaultConfigPath, containerd2DefaultConfigPath, true
	}
	switch {
	case value == nil || roots == "" && isString:
		return fmt.Errorf("containerd ignores Shoal's hosts.toml files: its CRI plugin has no registry config_path; %s", fix)
	case !isString:
		return fmt.Errorf("%s: config_path is not a string", sectionFile)
	}
	want := filepath.Clean(dir)
	for i, root := range filepath.SplitList(roots) {
		if filepath.Clean(root) != want {
			continue
		}
		if i == 0 {
			return nil
		}
		return fmt.Errorf("containerd's config_path %q lists other directories before %s, and a registry directory (or _default) in those hides Shoal's files; put %s first: %s",
			roots, dir, dir, fix)
	}
	return fmt.Errorf("containerd reads hosts.toml files from %q (config_path in %s), not from %s where Shoal writes them; either %s, or point the agent's --containerd-hosts-dir at containerd's directory",
		roots, sectionFile, dir, fix)
}

// criSection is the CRI plugin's section of a containerd configuration.
type criSection struct {
	version int64          // the effective config version
	key     string         // the plugin's name in that version
	file    string         // the file the section came from (the main file when absent)
	table   map[string]any // nil when the configuration has no such section
}

// loadCRISection reads configPath and its imports in containerd's order (each file's plugin
// sections replace earlier ones wholesale; the last non-zero version wins) and returns the
// effective config version and CRI plugin section, with the file it came from.
func loadCRISection(configPath string) (criSection, error) {
	version, sectionFile, section, err := readCRISection(configPath)
	if err != nil {
		return criSection{}, err
	}
	key, ok := criPlugin(version)
	if !ok {
		return criSection{}, fmt.Errorf("%s: unknown containerd config version %d", configPath, version)
	}
	return criSection{version: version, key: key, file: sectionFile, table: section}, nil
}

// readCRISection is loadCRISection's reading of the files.
func readCRISection(configPath string) (version int64, sectionFile string, section map[string]any, err error) {
	type configFile struct {
		Version int64          `toml:"version"`
		Imports []string       `toml:"imports"`
		Plugins map[string]any `toml:"plugins"`
	}
	plugins := map[string]any{}
	from := map[string]string{} // plugin → file that set it
	loaded := map[string]bool{}
	pending := []string{configPath}
	for len(pending) > 0 {
		path := pending[0]
		pending = pending[1:]
		if loaded[path] {
			continue
		}
		if len(loaded) == maxConfigFiles {
			return 0, "", nil, fmt.Errorf("%s: more than %d imported config files", configPath, maxConfigFiles)
		}
		loaded[path] = true
		content, err := os.ReadFile(path)
		if err != nil {
			return 0, "", nil, fmt.Errorf("read containerd config: %w", err)
		}
		var f configFile
		if err := toml.Unmarshal(content, &f); err != nil {
			return 0, "", nil, fmt.Errorf("containerd config %s is not valid: %w", path, err)
		}
		if f.Version != 0 {
			version = f.Version
		}
		for name, v := range f.Plugins {
			plugins[name] = v
			from[name] = path
		}
		for _, imp := range f.Imports {
			// As containerd 1.6 resolves them: globs as given, other paths relative to the importer.
			if strings.Contains(imp, "*") {
				matches, err := filepath.Glob(imp)
				if err != nil {
					return 0, "", nil, fmt.Errorf("%s: import %q: %w", path, imp, err)
				}
				pending = append(pending, matches...)
				continue
			}
			imp = filepath.Clean(imp)
			if !filepath.IsAbs(imp) {
				imp = filepath.Join(filepath.Dir(path), imp)
			}
			pending = append(pending, imp)
		}
	}
	if version == 0 {
		version = 1 // containerd's default for a file without a version
	}
	key, _ := criPlugin(version)
	if v, ok := plugins[key]; ok {
		section, ok = v.(map[string]any)
		if !ok {
			return 0, "", nil, fmt.Errorf("%s: plugins.%s is not a table", from[key], quote(key))
		}
		return version, from[key], section, nil
	}
	return version, configPath, nil, nil
}

// CheckDiscardUnpackedLayers reports whether containerd, configured by the config.toml at
// configPath, deletes image layers once it has unpacked them (discard_unpacked_layers = true,
// in the CRI plugin's containerd section up to config version 2, in its images plugin in 3).
// Pulls still work; the error says what it costs and how to turn it off.
func CheckDiscardUnpackedLayers(configPath string) error {
	cri, err := loadCRISection(configPath)
	if err != nil {
		return err
	}
	table, where := cri.table, fmt.Sprintf("[plugins.%s]", quote(cri.key))
	if cri.version < 3 {
		table, _ = cri.table["containerd"].(map[string]any)
		where = fmt.Sprintf("[plugins.%s.containerd]", quote(cri.key))
	}
	if discard, _ := table["discard_unpacked_layers"].(bool); discard {
		return fmt.Errorf("containerd deletes image layers once unpacked (discard_unpacked_layers = true in %s of %s): "+
			"images keep running, but containerd fetches the layers again for any new unpack, and tools that read its content store find them missing; "+
			"set it to false and restart containerd to keep them", where, cri.file)
	}
	return nil
}
