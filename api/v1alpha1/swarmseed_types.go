package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// MaxSeedBlobs bounds a SwarmSeed's blobs: an image manifest with more layers than this is
// seeded in several SwarmSeeds. Real images have tens of layers; Docker caps them at 127.
const MaxSeedBlobs = 256

// SeedBlob is one blob to bring into the swarm.
type SeedBlob struct {
	// Digest is the blob's sha256 digest.
	// +kubebuilder:validation:Pattern=`^sha256:[a-f0-9]{64}$`
	Digest string `json:"digest"`
	// Size is the blob's size in bytes, from the manifest that references it.
	// +kubebuilder:validation:Minimum=0
	Size int64 `json:"size"`
}

// SwarmSeedSpec is the blobs of one image manifest that the swarm should start fetching from
// upstream now, ahead of the kubelets that will ask for them.
type SwarmSeedSpec struct {
	// Repository is where the blobs live: registry.example/team/app.
	// +kubebuilder:validation:MaxLength=255
	// +kubebuilder:validation:XValidation:rule="self.matches('^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:[.][a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$')",message="repository must be registry/name without tag or digest, e.g. registry.example/team/app"
	Repository string `json:"repository"`

	// Manifest is the digest of the image manifest whose blobs these are.
	// +kubebuilder:validation:Pattern=`^sha256:[a-f0-9]{64}$`
	Manifest string `json:"manifest"`

	// Blobs are the blobs to fetch: the manifest's config and layers.
	// +kubebuilder:validation:MinItems=1
	// +kubebuilder:validation:MaxItems=256
	// +listType=map
	// +listMapKey=digest
	Blobs []SeedBlob `json:"blobs"`

	// PullSecretName names a Secret in Shoal's own namespace that holds a short-lived pull
	// token for the repository, written by the controller. Empty: anonymous, or the agents'
	// own registry credentials.
	// +optional
	// +kubebuilder:validation:MaxLength=253
	PullSecretName string `json:"pullSecretName,omitempty"`
}

// SwarmSeed asks the swarm to bring the blobs of one image manifest into the cluster now: every
// agent watches SwarmSeeds, and each fetches from upstream the segments it seeds. The
// controller writes one per distinct manifest that pods are about to pull, and deletes it once
// it has served its purpose; it has no status, so that the number of writes does not grow with
// the number of nodes.
//
// +kubebuilder:object:root=true
// +kubebuilder:resource:scope=Cluster,categories=shoal
// +kubebuilder:printcolumn:name="Repository",type=string,JSONPath=`.spec.repository`
// +kubebuilder:printcolumn:name="Manifest",type=string,JSONPath=`.spec.manifest`,priority=1
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type SwarmSeed struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec SwarmSeedSpec `json:"spec"`
}

// SwarmSeedList is a list of SwarmSeeds.
//
// +kubebuilder:object:root=true
type SwarmSeedList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []SwarmSeed `json:"items"`
}
