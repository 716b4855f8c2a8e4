package harness

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"path"
	"runtime"
	"strconv"
	"sync"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/shoal-dev/shoal/internal/imagebuild"
)

// RealisticImageSpec describes an image whose layers cost what real ones do to move and to
// unpack: gzip-compressed tars of many files of text, machine-code-like bytes and already
// compressed data, in a mix of layer sizes like an application image's (one large layer, a
// second one, several small ones).
type RealisticImageSpec struct {
	// Size is the image's compressed size (the sum of its layers), approximately.
	Size int64
	// Seed makes the content: the same seed gives the same image, another seed a new one.
	Seed uint64
}

// realisticLayerShares are the layers' shares of the image's compressed size, base first: a
// large base, a large dependency layer, then the small application layers real images end
// with.
var realisticLayerShares = []float64{0.45, 0.30, 0.10, 0.06, 0.04, 0.03, 0.015, 0.005}

// Shares of a layer's files by kind of content; the rest (5 %) is already compressed data
// (images, archives), which does not compress. Together they compress to about 45 %, as
// distribution and application layers do.
const (
	textShare = 0.55 // English-like text
	codeShare = 0.40 // machine-code-like bytes
)

// RealisticImage builds the image of spec for the host's platform. Building one of 256 MiB
// takes some seconds: it writes and compresses about twice that.
func RealisticImage(spec RealisticImageSpec) (v1.Image, error) {
	if spec.Size < 1<<20 {
		return nil, fmt.Errorf("realistic image of %d bytes: want at least 1 MiB", spec.Size)
	}
	rng := func(stream int) *rand.Rand {
		var key [32]byte
		copy(key[:], fmt.Sprintf("shoal realistic image %x/%d", spec.Seed, stream))
		return rand.New(rand.NewChaCha8(key))
	}
	words := vocabulary(rng(-1), 8192)
	// Each layer from its own generator, so that they are built at once on every core and the
	// seed alone still decides each one.
	layers := make([]v1.Layer, len(realisticLayerShares))
	errs := make([]error, len(layers))
	var wg sync.WaitGroup
	sem := make(chan struct{}, runtime.GOMAXPROCS(0))
	for i, share := range realisticLayerShares {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			target := max(int64(float64(spec.Size)*share), 64<<10)
			data, err := realisticLayer(rng(i), words, i, target)
			if err == nil {
				layers[i], err = tarball.LayerFromOpener(func() (io.ReadCloser, error) {
					return io.NopCloser(bytes.NewReader(data)), nil
				})
			}
			if err != nil {
				errs[i] = fmt.Errorf("layer %d: %w", i, err)
			}
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return imagebuild.Image(HostPlatform().Architecture, layers, func(c *v1.Config) {
		c.Cmd = []string{"/bin/true"}
	})
}

// realisticLayer returns a gzip-compressed tar of generated files, stopping once the
// compressed output reaches target bytes.
func realisticLayer(rng *rand.Rand, words [][]byte, index int, target int64) ([]byte, error) {
	var out bytes.Buffer
	zw, err := gzip.NewWriterLevel(&out, gzip.DefaultCompression)
	if err != nil {
		return nil, err
	}
	tw := tar.NewWriter(zw)
	mtime := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	var file []byte
	for n := 0; int64(out.Len()) < target; n++ {
		// Files of 1 KiB to 2 MiB, log-uniform, as in the directories of a distribution, and
		// no larger than what is left to write (about twice the compressed bytes left).
		size := min(int(1024*pow2(rng.Float64()*11)), max(2*int(target-int64(out.Len())), 1024))
		file = file[:0]
		switch k := rng.Float64(); {
		case k < textShare:
			file = appendText(file, rng, words, size)
		case k < textShare+codeShare:
			file = appendCode(file, rng, size)
		default:
			file = appendRandom(file, rng, size)
		}
		name := path.Join("usr/share/shoal-bench", strconv.Itoa(index), strconv.Itoa(n%64), strconv.Itoa(n))
		hdr := &tar.Header{Name: name, Mode: 0o644, Size: int64(len(file)), ModTime: mtime, Typeflag: tar.TypeReg, Format: tar.FormatPAX}
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, err
		}
		if _, err := tw.Write(file); err != nil {
			return nil, err
		}
		if err := zw.Flush(); err != nil { // so that out.Len() follows the input
			return nil, err
		}
	}
	if err := errors.Join(tw.Close(), zw.Close()); err != nil {
		return nil, err
	}
	return out.Bytes(), nil
}

func pow2(x float64) float64 {
	r := 1.0
	for ; x >= 1; x-- {
		r *= 2
	}
	return r * (1 + x) // within a factor of two of 2^x: the shape is what matters
}

// vocabulary returns n made-up words of 2 to 11 letters.
func vocabulary(rng *rand.Rand, n int) [][]byte {
	words := make([][]byte, n)
	for i := range words {
		w := make([]byte, 2+rng.IntN(10))
		for j := range w {
			w[j] = 'a' + byte(rng.IntN(26))
		}
		words[i] = w
	}
	return words
}

// appendText appends about size bytes of words drawn with a Zipf law, in lines.
func appendText(b []byte, rng *rand.Rand, words [][]byte, size int) []byte {
	zipf := rand.NewZipf(rng, 1.1, 1, uint64(len(words)-1))
	for line := 0; len(b) < size; {
		b = append(b, words[zipf.Uint64()]...)
		if line++; line%12 == 0 {
			b = append(b, '.', '\n')
		} else {
			b = append(b, ' ')
		}
	}
	return b[:size]
}

// appendCode appends size bytes that compress about as machine code does: instructions from a
// small set with varied operands.
func appendCode(b []byte, rng *rand.Rand, size int) []byte {
	for len(b) < size {
		op := byte(rng.IntN(48))
		switch rng.IntN(4) {
		case 0: // a register-to-register instruction
			b = append(b, 0x48, 0x80|op, 0xc0|byte(rng.IntN(64)))
		case 1: // a small immediate
			b = append(b, 0x83, op, byte(rng.IntN(16)))
		case 2: // a call or jump with a nearby displacement
			d := uint32(rng.IntN(1 << 14))
			b = append(b, 0xe8, byte(d), byte(d>>8), 0, 0)
		default: // an address: a random low byte
			b = append(b, 0x8b, op, byte(rng.Uint32()), 0x10, 0x40, 0)
		}
	}
	return b[:size]
}

func appendRandom(b []byte, rng *rand.Rand, size int) []byte {
	for len(b) < size {
		v := rng.Uint64()
		b = append(b, byte(v), byte(v>>8), byte(v>>16), byte(v>>24), byte(v>>32), byte(v>>40), byte(v>>48), byte(v>>56))
	}
	return b[:size]
}
