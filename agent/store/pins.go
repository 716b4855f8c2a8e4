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
	"strings"

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
	if err := s.changePins([]v1.Hash{d}, owner, true); err != nil {
		return fmt.Errorf("pin %s for %q: %w", d, owner, err)
	}
	return nil
}

// Unpin removes owner's pin on d. Removing a pin that does not exist is not an error. The blob
// stays protected until the change is saved.
func (s *Store) Unpin(d v1.Hash, owner string) error {
	if err := s.changePins([]v1.Hash{d}, owner, false); err != nil {
		return fmt.Errorf("unpin %s for %q: %w", d, owner, err)
	}
	return nil
}

// PinAll pins every digest of ds for owner, as Pin does, saving the pins once: an image's
// manifest and blobs are pinned with one write of pins.json rather than one per blob. If a
// digest is invalid nothing is pinned.
func (s *Store) PinAll(ds []v1.Hash, owner string) error {
	if err := s.changePins(ds, owner, true); err != nil {
		return fmt.Errorf("pin %d blobs for %q: %w", len(ds), owner, err)
	}
	return nil
}

// UnpinAll removes owner's pins on every digest of ds, as Unpin does, saving the pins once.
func (s *Store) UnpinAll(ds []v1.Hash, owner string) error {
	if err := s.changePins(ds, owner, false); err != nil {
		return fmt.Errorf("unpin %d blobs for %q: %w", len(ds), owner, err)
	}
	return nil
}

// PinnedBy returns the digests owner pins, sorted, whether or not their blobs are in the store:
// what a component pinned before a restart, for it to reconcile with what it wants now.
func (s *Store) PinnedBy(owner string) []v1.Hash {
	s.mu.Lock()
	var ds []v1.Hash
	for hex, owners := range s.pins {
		if _, ok := owners[owner]; ok {
			ds = append(ds, v1.Hash{Algorithm: "sha256", Hex: hex})
		}
	}
	s.mu.Unlock()
	slices.SortFunc(ds, func(a, b v1.Hash) int { return strings.Compare(a.Hex, b.Hex) })
	return ds
}

// PinnedBytes returns the size of the complete blobs that at least one owner pins: the part of
// the store that eviction cannot free.
func (s *Store) PinnedBytes() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	var n int64
	for hex := range s.pins {
		if e := s.index[hex]; e != nil {
			n += e.size
		}
	}
	return n
}

// changePins adds (pin) or removes owner's pins on ds: it saves pins.json with the change
// outside the store's lock, so that Gets do not wait for the disk, then applies it in memory.
// Nothing is written when no pin changes.
func (s *Store) changePins(ds []v1.Hash, owner string, pin bool) error {
	if owner == "" {
		return errors.New("empty owner")
	}
	for _, d := range ds {
		if err := checkDigest(d); err != nil {
			if len(ds) > 1 {
				err = fmt.Errorf("%s: %w", d, err)
			}
			return err
		}
	}
	s.pinsMu.Lock()
	defer s.pinsMu.Unlock()
	s.mu.Lock()
	var change []string // hex digests whose pin changes
	for _, d := range ds {
		if _, pinned := s.pins[d.Hex][owner]; pinned != pin && !slices.Contains(change, d.Hex) {
			change = append(change, d.Hex)
		}
	}
	if len(change) == 0 {
		s.mu.Unlock()
		return nil
	}
	doc := s.pinsDocLocked(change, owner, pin)
	s.mu.Unlock()
	// pinsMu keeps other changes out until this one is applied, so doc stays current.
	if err := s.savePins(doc); err != nil {
		return err
	}
	s.mu.Lock()
	for _, hex := range change {
		if pin {
			s.addPinLocked(hex, owner)
		} else {
			s.dropPinLocked(hex, owner)
		}
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

// pinsDocLocked returns the pins with owner's pins on hexes added (pin) or removed, as
// pins.json holds them.
func (s *Store) pinsDocLocked(hexes []string, owner string, pin bool) pinsDoc {
	doc := pinsDoc{Pins: make(map[string][]string, len(s.pins)+len(hexes))}
	for h, owners := range s.pins {
		doc.Pins["sha256:"+h] = slices.Sorted(maps.Keys(owners))
	}
	for _, hex := range hexes {
		owners := doc.Pins["sha256:"+hex]
		if pin {
			owners = append(owners, owner)
			slices.Sort(owners)
		} else {
			owners = slices.DeleteFunc(owners, func(o string) bool { return o == owner })
		}
		if len(owners) > 0 {
			doc.Pins["sha256:"+hex] = owners
		} else {
			delete(doc.Pins, "sha256:"+hex)
		}
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
