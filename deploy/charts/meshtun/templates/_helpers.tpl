{{- define "meshtun.name" -}}{{ .Values.resourceName | default "meshtun-controlplane" }}{{- end }}

{{- define "meshtun.image" -}}
{{- if contains "/" .Values.image -}}
{{ .Values.image }}
{{- else -}}
{{ .Values.hub }}/{{ .Values.image }}:{{ .Values.tag }}{{ with .Values.variant }}-{{ . }}{{ end }}
{{- end -}}
{{- end }}

{{- define "meshtun.labels" -}}
app: meshtun-controlplane
app.kubernetes.io/name: meshtun-controlplane
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: meshtun
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end }}

{{- define "meshtun.selector" -}}
app: meshtun-controlplane
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}
