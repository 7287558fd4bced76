package k8scheck

import (
	"fmt"
	"sort"
	"strings"

	"helm.sh/helm/v4/pkg/action"
	"helm.sh/helm/v4/pkg/chart/common"
	"helm.sh/helm/v4/pkg/chart/common/util"
	"helm.sh/helm/v4/pkg/chart/v2/lint/support"
	"helm.sh/helm/v4/pkg/chart/v2/loader"
	"helm.sh/helm/v4/pkg/engine"
)

// helmTemplate renders a chart as `helm template NAME DIR -n NS -f values` does, with helm's own loader,
// value coalescing and engine; it returns the rendered manifests (NOTES.txt and empty files left out)
// in file-name order.
func helmTemplate(dir, name, namespace string, values map[string]any) ([]string, error) {
	ch, err := loader.Load(dir)
	if err != nil {
		return nil, fmt.Errorf("load chart %s: %w", dir, err)
	}
	rv, err := util.ToRenderValues(ch, values, common.ReleaseOptions{Name: name, Namespace: namespace, Revision: 1, IsInstall: true}, nil)
	if err != nil {
		return nil, fmt.Errorf("chart %s values: %w", dir, err)
	}
	files, err := engine.Render(ch, rv)
	if err != nil {
		return nil, fmt.Errorf("render chart %s: %w", dir, err)
	}
	var keys []string
	for k, v := range files {
		if strings.HasSuffix(k, "NOTES.txt") || strings.TrimSpace(v) == "" {
			continue
		}
		keys = append(keys, k)
	}
	sort.Strings(keys)
	out := make([]string, len(keys))
	for i, k := range keys {
		out[i] = files[k]
	}
	return out, nil
}

// helmLintStrict runs `helm lint --strict` on a chart: every warning is a failure.
func helmLintStrict(dir string, values map[string]any) []string {
	l := action.NewLint()
	l.Strict = true
	res := l.Run([]string{dir}, values)
	var probs []string
	for _, m := range res.Messages {
		if m.Severity > support.InfoSev {
			probs = append(probs, m.Error())
		}
	}
	for _, e := range res.Errors {
		probs = append(probs, e.Error())
	}
	return probs
}
