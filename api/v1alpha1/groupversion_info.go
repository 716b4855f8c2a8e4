// Package v1alpha1 is Shoal's Kubernetes API, group shoal.dev: what users ask for (Prewarm), what
// each node should hold and holds (NodeCache), what the swarm should fetch ahead of pods
// (SwarmSeed), and which agents swarm together (SwarmMember).
//
// +kubebuilder:object:generate=true
// +groupName=shoal.dev
package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

var (
	// GroupVersion is the group and version of every type in this package.
	GroupVersion = schema.GroupVersion{Group: "shoal.dev", Version: "v1alpha1"}

	// SchemeBuilder registers this package's types with a runtime.Scheme. It needs nothing but
	// apimachinery, so that the package stays cheap to import.
	SchemeBuilder = runtime.NewSchemeBuilder(addKnownTypes)

	// AddToScheme adds this package's types to a runtime.Scheme.
	AddToScheme = SchemeBuilder.AddToScheme
)

func addKnownTypes(s *runtime.Scheme) error {
	s.AddKnownTypes(GroupVersion,
		&Prewarm{}, &PrewarmList{},
		&NodeCache{}, &NodeCacheList{},
		&SwarmSeed{}, &SwarmSeedList{},
		&SwarmMember{}, &SwarmMemberList{},
	)
	metav1.AddToGroupVersion(s, GroupVersion)
	return nil
}
