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
// it arrives. Pins are saved in the store's directory and survive a restart; the pin takes effect
// once it is saved, when Pin returns.
func (s *Store) Pin(d v1.Hash, owner string) error {
	if err := s.changePin(d, owner, true); err != nil {
		return fmt.Errorf("pin %s for %q: %w", d, owner, err)
	}
	return nil
}

// Unpin removes owner's pin on d. Removing a pin that does not exist is not an error. The blob
// stays protected until the change is saved.
func (s *Store) Unpin(d v1.Hash, owner string) error {
	if err := s.changePin(d, owner, false); err != nil {
		return fmt.Errorf("unpin %s for %q: %w", d, owner, err)
	}
	return nil
}

// changePin adds (pin) or removes owner's pin on d: it saves pins.json with the change outside
// the store's lock, so that Gets do not wait for the disk, then applies it in memory.
func (s *Store) changePin(d v1.Hash, owner string, pin bool) error {
	if owner == "" {
		return errors.New("empty owner")
	}
	if err := checkDigest(d); err != nil {
		return err
	}
	s.pinsMu.Lock()
	defer s.pinsMu.Unlock()
	s.mu.Lock()
	if _, pinned := s.pins[d.Hex][owner]; pinned == pin {
		s.mu.Unlock()
		return nil
	}
	doc := s.pinsDocLocked(d.Hex, owner, pin)
	s.mu.Unlock()
	// pinsMu keeps other changes out until this one is applied, so doc stays current.
	if err := s.savePins(doc); err != nil {
		return err
	}
	s.mu.Lock()
	if pin {
		s.addPinLocked(d.Hex, owner)
	} else {
		s.dropPinLocked(d.Hex, owner)
	}
	s.mu.Unlock()
	return nil
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

// pinsDocLocked returns the pins with owner's pin on hex added (pin) or removed, as pins.json
// holds them.
func (s *Store) pinsDocLocked(hex, owner string, pin bool) pinsDoc {
	doc := pinsDoc{Pins: make(map[string][]string, len(s.pins)+1)}
	for h, owners := range s.pins {
		if h != hex {
			doc.Pins["sha256:"+h] = slices.Sorted(maps.Keys(owners))
		}
	}
	owners := make(map[string]struct{}, len(s.pins[hex])+1)
	maps.Copy(owners, s.pins[hex])
	if pin {
		owners[owner] = struct{}{}
	} else {
		delete(owners, owner)
	}
	if len(owners) > 0 {
		doc.Pins["sha256:"+hex] = slices.Sorted(maps.Keys(owners))
	}
	return doc
}

// savePins replaces pins.json atomically, so a crash leaves the old or the new pins. The caller
// holds pinsMu.
func (s *Store) savePins(doc pinsDoc) error {
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
