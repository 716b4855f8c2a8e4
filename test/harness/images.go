package harness

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"runtime"
	"strconv"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// ImageSpec describes a random image to generate: Layers gzip-compressed tar layers, each
// holding one file of LayerSize random bytes (so compression does not shrink them), on top of
// Base, with Cmd as the command (default /bin/true).
type ImageSpec struct {
	Layers    int
	LayerSize int64
	Base      []v1.Layer // e.g. a layer with a shell, for images that run
	Cmd       []string
}

// Image is an image pushed to a registry, with the digests a pull of it has to fetch.
type Image struct {
	Repo     string // e.g. "test/app"
	Tag      string // empty for an image inside an index
	Platform v1.Platform
	Digest   v1.Hash // of the manifest
	Config   v1.Hash
	Layers   []v1.Hash         // compressed layer digests, base first
	Sizes    map[v1.Hash]int64 // size of the config and of each layer
}

// Name is the image's reference under the given registry name, e.g.
// Name("registry.test") = "registry.test/test/app:v1", by digest when it has no tag.
func (i *Image) Name(registry string) string {
	if i.Tag == "" {
		return registry + "/" + i.Repo + "@" + i.Digest.String()
	}
	return registry + "/" + i.Repo + ":" + i.Tag
}

// Blobs are the config and layer digests: what a pull fetches besides manifests.
func (i *Image) Blobs() []v1.Hash { return append([]v1.Hash{i.Config}, i.Layers...) }

// BlobBytes is the total size of Blobs.
func (i *Image) BlobBytes() int64 {
	var n int64
	for _, b := range i.Blobs() {
		n += i.Sizes[b]
	}
	return n
}

// Index is a multi-platform image index pushed to a registry.
type Index struct {
	Repo   string
	Tag    string
	Digest v1.Hash
	Images map[string]*Image // by platform, e.g. "linux/amd64"
}

// Name is the index's reference under the given registry name.
func (x *Index) Name(registry string) string { return registry + "/" + x.Repo + ":" + x.Tag }

// HostPlatform is the platform containerd on this machine pulls from an index.
func HostPlatform() v1.Platform { return v1.Platform{OS: "linux", Architecture: runtime.GOARCH} }

// PushImage generates a random OCI image for the host platform and pushes it to the registry
// at registryHost ("127.0.0.1:PORT") as repoTag ("test/app:v1"). Every call makes new blobs.
//
// auth, if given, authenticates the push (Registry.Auth).
func PushImage(ctx context.Context, registryHost, repoTag string, spec ImageSpec, auth ...authn.Authenticator) (*Image, error) {
	tag, err := parseTag(registryHost, repoTag)
	if err != nil {
		return nil, err
	}
	img, desc, err := randomImage(spec, HostPlatform())
	if err != nil {
		return nil, err
	}
	opts := remoteOptions(ctx)
	for _, a := range auth {
		opts = append(opts, remote.WithAuth(a))
	}
	if err := remote.Write(tag, img, opts...); err != nil {
		return nil, fmt.Errorf("push %s: %w", tag, err)
	}
	desc.Repo, desc.Tag = tag.RepositoryStr(), tag.TagStr()
	return desc, nil
}

// PushV1Image pushes img, built elsewhere (internal/imagebuild), as repoTag.
func PushV1Image(ctx context.Context, registryHost, repoTag string, img v1.Image) (*Image, error) {
	tag, err := parseTag(registryHost, repoTag)
	if err != nil {
		return nil, err
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("image config: %w", err)
	}
	desc, err := describe(img, v1.Platform{OS: cfg.OS, Architecture: cfg.Architecture, Variant: cfg.Variant})
	if err != nil {
		return nil, err
	}
	if err := remote.Write(tag, img, remoteOptions(ctx)...); err != nil {
		return nil, fmt.Errorf("push %s: %w", tag, err)
	}
	desc.Repo, desc.Tag = tag.RepositoryStr(), tag.TagStr()
	return desc, nil
}

// PushIndex generates one random OCI image per platform, bundles them in an OCI index with
// each manifest's platform set, and pushes it as repoTag.
func PushIndex(ctx context.Context, registryHost, repoTag string, spec ImageSpec, platforms ...v1.Platform) (*Index, error) {
	tag, err := parseTag(registryHost, repoTag)
	if err != nil {
		return nil, err
	}
	idx := mutate.IndexMediaType(empty.Index, types.OCIImageIndex)
	out := &Index{Repo: tag.RepositoryStr(), Tag: tag.TagStr(), Images: map[string]*Image{}}
	for _, p := range platforms {
		img, desc, err := randomImage(spec, p)
		if err != nil {
			return nil, err
		}
		desc.Repo = out.Repo
		out.Images[p.String()] = desc
		idx = mutate.AppendManifests(idx, mutate.IndexAddendum{
			Add:        img,
			Descriptor: v1.Descriptor{Platform: &p},
		})
	}
	if out.Digest, err = idx.Digest(); err != nil {
		return nil, fmt.Errorf("digest of index %s: %w", tag, err)
	}
	if err := remote.WriteIndex(tag, idx, remoteOptions(ctx)...); err != nil {
		return nil, fmt.Errorf("push index %s: %w", tag, err)
	}
	return out, nil
}

func parseTag(registryHost, repoTag string) (name.Tag, error) {
	tag, err := name.NewTag(registryHost+"/"+repoTag, name.Insecure, name.StrictValidation)
	if err != nil {
		return name.Tag{}, fmt.Errorf("image name %s/%s: %w", registryHost, repoTag, err)
	}
	if err := checkLoopback(tag.RegistryStr()); err != nil {
		return name.Tag{}, err
	}
	return tag, nil
}

// PushBlob pushes size pseudo-random bytes generated from seed (the same seed gives the same
// blob) to the registry at registryHost as a layer of repo, e.g. "bench/blob", and returns its
// digest.
func PushBlob(ctx context.Context, registryHost, repo string, size int64, seed uint64) (v1.Hash, error) {
	data := seededBytes(size, strconv.FormatUint(seed, 16))
	layer := static.NewLayer(data, types.OCIUncompressedLayer)
	d, err := layer.Digest()
	if err != nil {
		return v1.Hash{}, fmt.Errorf("digest of blob: %w", err)
	}
	r, err := name.NewRepository(registryHost+"/"+repo, name.Insecure)
	if err != nil {
		return v1.Hash{}, fmt.Errorf("repository %s: %w", repo, err)
	}
	if err := remote.WriteLayer(r, layer, remoteOptions(ctx)...); err != nil {
		return v1.Hash{}, fmt.Errorf("push %d-byte blob to %s: %w", size, r, err)
	}
	return d, nil
}

func remoteOptions(ctx context.Context) []remote.Option {
	return []remote.Option{remote.WithContext(ctx), remote.WithTransport(loopbackTransport())}
}

// randomImage builds an OCI image whose config names platform p and lists the layers'
// diff_ids, as containerd needs to unpack it.
func randomImage(spec ImageSpec, p v1.Platform) (v1.Image, *Image, error) {
	base := mutate.ConfigMediaType(mutate.MediaType(empty.Image, types.OCIManifestSchema1), types.OCIConfigJSON)
	adds := make([]mutate.Addendum, 0, len(spec.Base)+spec.Layers)
	for _, l := range spec.Base {
		adds = append(adds, mutate.Addendum{Layer: l, History: v1.History{CreatedBy: "shoal test harness: base"}})
	}
	for i := range spec.Layers {
		layer, err := random.Layer(spec.LayerSize, types.OCILayer)
		if err != nil {
			return nil, nil, fmt.Errorf("random layer: %w", err)
		}
		adds = append(adds, mutate.Addendum{
			Layer:   layer,
			History: v1.History{CreatedBy: fmt.Sprintf("shoal test harness: layer %d of %d", i+1, spec.Layers)},
		})
	}
	img, err := mutate.Append(base, adds...)
	if err != nil {
		return nil, nil, fmt.Errorf("assemble image: %w", err)
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return nil, nil, fmt.Errorf("image config: %w", err)
	}
	cfg = cfg.DeepCopy()
	cfg.OS, cfg.Architecture, cfg.Variant = p.OS, p.Architecture, p.Variant
	cfg.Config.Cmd = []string{"/bin/true"}
	if len(spec.Cmd) > 0 {
		cfg.Config.Cmd = spec.Cmd
	}
	if img, err = mutate.ConfigFile(img, cfg); err != nil {
		return nil, nil, fmt.Errorf("set image config: %w", err)
	}
	desc, err := describe(img, p)
	return img, desc, err
}

func describe(img v1.Image, p v1.Platform) (*Image, error) {
	d := &Image{Platform: p, Sizes: map[v1.Hash]int64{}}
	var err error
	if d.Digest, err = img.Digest(); err != nil {
		return nil, fmt.Errorf("image digest: %w", err)
	}
	m, err := img.Manifest()
	if err != nil {
		return nil, fmt.Errorf("image manifest: %w", err)
	}
	d.Config = m.Config.Digest
	d.Sizes[m.Config.Digest] = m.Config.Size
	for _, l := range m.Layers {
		d.Layers = append(d.Layers, l.Digest)
		d.Sizes[l.Digest] = l.Size
	}
	return d, nil
}

// Media types of the artifacts PushArtifact makes: an OCI 1.1 artifact (artifactType set, the
// empty config), as ORAS and model registries push them, not an image.
const (
	ArtifactType          = "application/vnd.shoal.test.model.v1"
	ArtifactLayerType     = "application/vnd.shoal.test.model.weights.v1"
	emptyConfigMediaType  = "application/vnd.oci.empty.v1+json"
	emptyConfigJSONString = "{}"
)

// PushArtifact pushes an OCI artifact of one blob of size pseudo-random bytes from seed as
// repoTag: a manifest with artifactType ArtifactType, the empty config and one layer of media
// type ArtifactLayerType. Nothing in it is an image: a runtime cannot pull it.
func PushArtifact(ctx context.Context, registryHost, repoTag string, size int64, seed uint64) (*Image, error) {
	tag, err := parseTag(registryHost, repoTag)
	if err != nil {
		return nil, err
	}
	data := seededBytes(size, "artifact"+strconv.FormatUint(seed, 16))
	out := &Image{Repo: tag.RepositoryStr(), Tag: tag.TagStr(), Sizes: map[v1.Hash]int64{}}
	var descs []v1.Descriptor
	for _, blob := range []struct {
		data []byte
		mt   types.MediaType
	}{{[]byte(emptyConfigJSONString), emptyConfigMediaType}, {data, ArtifactLayerType}} {
		layer := static.NewLayer(blob.data, blob.mt)
		d, err := layer.Digest()
		if err != nil {
			return nil, fmt.Errorf("digest of artifact blob: %w", err)
		}
		if err := remote.WriteLayer(tag.Repository, layer, remoteOptions(ctx)...); err != nil {
			return nil, fmt.Errorf("push %d-byte artifact blob to %s: %w", len(blob.data), tag.Repository, err)
		}
		descs = append(descs, v1.Descriptor{MediaType: blob.mt, Size: int64(len(blob.data)), Digest: d})
		out.Sizes[d] = int64(len(blob.data))
	}
	m := v1.Manifest{SchemaVersion: 2, MediaType: types.OCIManifestSchema1, ArtifactType: ArtifactType,
		Config: descs[0], Layers: descs[1:]}
	body, err := json.Marshal(m)
	if err != nil {
		return nil, err
	}
	if err := remote.Put(tag, rawManifest{body: body, mt: types.OCIManifestSchema1}, remoteOptions(ctx)...); err != nil {
		return nil, fmt.Errorf("push artifact manifest %s: %w", tag, err)
	}
	if out.Digest, _, err = v1.SHA256(bytes.NewReader(body)); err != nil {
		return nil, err
	}
	out.Config, out.Layers = descs[0].Digest, []v1.Hash{descs[1].Digest}
	return out, nil
}

// rawManifest is a manifest pushed as these bytes.
type rawManifest struct {
	body []byte
	mt   types.MediaType
}

func (r rawManifest) RawManifest() ([]byte, error)        { return r.body, nil }
func (r rawManifest) MediaType() (types.MediaType, error) { return r.mt, nil }

// seededBytes is size pseudo-random bytes that key (its first 32 bytes) alone decides.
func seededBytes(size int64, key string) []byte {
	data := make([]byte, size)
	var k [32]byte
	copy(k[:], key)
	_, _ = rand.NewChaCha8(k).Read(data) // ChaCha8.Read never fails
	return data
}
