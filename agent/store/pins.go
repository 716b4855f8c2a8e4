package store

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// pinsDoc is the format of pins.json.
type pinsDoc struct {
	// Pins maps a digest to the owners pinning it.
	Pins map[string][]string `json:"pins"`
}

// Pin protects d from eviction on behalf of owner (e.g. the Prewarm object that wants it). A blob
// is pinned while at least one owner pins it; pinning again with the same owner changes nothing,
// so reconcilers can pin on every pass. d need not be in the store yet: the pin protects it once
// it arrives. Pins are saved in the store's directory and survive a restart.
func (s *Store) Pin(d v1.Hash, owner string) error {
	if err := checkPinArgs(d, owner); err != nil {
		return fmt.Errorf("pin %s for %q: %w", d, owner, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.pins[d.Hex][owner]; ok {
		return nil
	}
	s.addPinLocked(d.Hex, owner)
	if err := s.savePinsLocked(); err != nil {
		s.dropPinLocked(d.Hex, owner)
		return fmt.Errorf("pin %s for %q: %w", d, owner, err)
	}
	return nil
}

// Unpin removes owner's pin on d. Removing a pin that does not exist is not an error.
func (s *Store) Unpin(d v1.Hash, owner string) error {
	if err := checkPinArgs(d, owner); err != nil {
		return fmt.Errorf("unpin %s for %q: %w", d, owner, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.pins[d.Hex][owner]; !ok {
		return nil
	}
	s.dropPinLocked(d.Hex, owner)
	if err := s.savePinsLocked(); err != nil {
		s.addPinLocked(d.Hex, owner)
		return fmt.Errorf("unpin %s for %q: %w", d, owner, err)
	}
	return nil
}

func checkPinArgs(d v1.Hash, owner string) error {
	if owner == "" {
		return errors.New("empty owner")
	}
	return checkDigest(d)
}

func (s *Store) addPinLocked(hex, owner string) {
	if s.pins[hex] == nil {
		s.pins[hex] = make(map[string]struct{})
	}
	s.pins[hex][owner] = struct{}{}
}

func (s *Store) dropPinLocked(hex, owner string) {
	delete(s.pins[hex], owner)
	if len(s.pins[hex]) == 0 {
		delete(s.pins, hex)
	}
}

// savePinsLocked replaces pins.json atomically, so a crash leaves the old or the new pins.
func (s *Store) savePinsLocked() error {
	doc := pinsDoc{Pins: make(map[string][]string, len(s.pins))}
	for hex, owners := range s.pins {
		doc.Pins["sha256:"+hex] = slices.Sorted(maps.Keys(owners))
	}
	data, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return err
	}
	path := filepath.Join(s.dir, pinsFile)
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
	if err != nil {
		return fmt.Errorf("save pins: %w", err)
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("save pins: %w", err)
	}
	if err := syncDir(s.dir); err != nil {
		return fmt.Errorf("save pins: %w", err)
	}
	return nil
}

func (s *Store) loadPins() error {
	path := filepath.Join(s.dir, pinsFile)
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("open store: load pins: %w", err)
	}
	var doc pinsDoc
	if err := json.Unmarshal(data, &doc); err != nil {
		return fmt.Errorf("open store: %s is corrupt (remove it to drop all pins): %w", path, err)
	}
	for ds, owners := range doc.Pins {
		d, err := v1.NewHash(ds)
		if err == nil {
			err = checkDigest(d)
		}
		if err != nil {
			return fmt.Errorf("open store: %s is corrupt (remove it to drop all pins): %q: %w", path, ds, err)
		}
		for _, o := range owners {
			if o != "" {
				s.addPinLocked(d.Hex, o)
			}
		}
	}
	return nil
}
