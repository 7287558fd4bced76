package agent

import (
	"strings"
	"testing"
)

func TestLocalEnviron(t *testing.T) {
	got := strings.Join(LocalEnviron([]string{"PATH=/bin", "POD_NAMESPACE=shop"}), " ")
	if !strings.Contains(got, "POD_NAMESPACE=shop") || strings.Contains(got, "POD_NAMESPACE=default") {
		t.Errorf("a set value was replaced: %s", got)
	}
	if !strings.Contains(got, "POD_NAME=") {
		t.Errorf("POD_NAME not defaulted: %s", got)
	}
	kept := LocalEnviron([]string{"POD_NAME=me", "INSTANCE_IP=10.1.2.3"})
	if strings.Join(kept, " ") != "POD_NAME=me INSTANCE_IP=10.1.2.3 POD_NAMESPACE=default" {
		t.Errorf("LocalEnviron = %v", kept)
	}
}
