package v1alpha1

import (
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
)

func TestNodeSelectorLabelSelector(t *testing.T) {
	gpu := labels.Set{"example.com/gpu": "a100", "kubernetes.io/arch": "amd64"}
	cpu := labels.Set{"kubernetes.io/arch": "amd64"}
	spot := labels.Set{"example.com/gpu": "a100", "kubernetes.io/arch": "amd64", "spot": "true"}
	for _, tt := range []struct {
		name string
		sel  *NodeSelector
		want map[string]bool // node name -> selected
	}{
		{"nil selects every node", nil, map[string]bool{"gpu": true, "cpu": true, "spot": true}},
		{"empty selects every node", &NodeSelector{}, map[string]bool{"gpu": true, "cpu": true, "spot": true}},
		{"labels and expressions", &NodeSelector{
			MatchLabels: map[string]LabelValue{"example.com/gpu": "a100"},
			MatchExpressions: []NodeSelectorRequirement{
				{Key: "kubernetes.io/arch", Operator: metav1.LabelSelectorOpIn, Values: []string{"amd64", "arm64"}},
				{Key: "spot", Operator: metav1.LabelSelectorOpDoesNotExist},
			},
		}, map[string]bool{"gpu": true, "cpu": false, "spot": false}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			sel, err := metav1.LabelSelectorAsSelector(tt.sel.LabelSelector())
			if err != nil {
				t.Fatal(err)
			}
			for name, set := range map[string]labels.Set{"gpu": gpu, "cpu": cpu, "spot": spot} {
				if got := sel.Matches(set); got != tt.want[name] {
					t.Errorf("node %s (%v): selected %v, want %v", name, set, got, tt.want[name])
				}
			}
		})
	}
}
