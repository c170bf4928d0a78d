{{/* Names and labels. */}}

{{- define "mxrelay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Object name prefix: the release name, plus the chart name unless it is already in it. */}}
{{- define "mxrelay.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "mxrelay.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select this release's objects; each template adds app.kubernetes.io/component. */}}
{{- define "mxrelay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mxrelay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mxrelay.labels" -}}
helm.sh/chart: {{ include "mxrelay.chart" . }}
{{ include "mxrelay.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "mxrelay.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "mxrelay.secretName" -}}
{{- .Values.secret.name | default (printf "%s-urls" (include "mxrelay.fullname" .)) }}
{{- end }}

{{/*
Replicas of the Deployment: replicaCount, but with the autoscaler on, the
live Deployment's count once it exists, so that an upgrade does not undo
what the HPA decided (Helm would otherwise reset spec.replicas). `helm
template` and --dry-run have no cluster to ask and show replicaCount.
*/}}
{{- define "mxrelay.replicas" -}}
{{- $replicas := int .Values.replicaCount }}
{{- if .Values.autoscaling.enabled }}
{{- $live := lookup "apps/v1" "Deployment" .Release.Namespace (include "mxrelay.fullname" .) }}
{{- if and $live $live.spec $live.spec.replicas }}
{{- $replicas = int $live.spec.replicas }}
{{- end }}
{{- end }}
{{- $replicas }}
{{- end }}

{{/* Without PROXY protocol the pods must see the client's address: Local. */}}
{{- define "mxrelay.externalTrafficPolicy" -}}
{{- if .Values.service.externalTrafficPolicy }}
{{- .Values.service.externalTrafficPolicy }}
{{- else if .Values.service.proxyProtocol }}
{{- "Cluster" }}
{{- else }}
{{- "Local" }}
{{- end }}
{{- end }}

{{/* Values that cannot work together fail the render with the fix. */}}
{{- define "mxrelay.validate" -}}
{{- if and .Values.service.proxyProtocol (empty .Values.service.proxyNetworks) }}
{{- fail "service.proxyProtocol needs service.proxyNetworks: the addresses the PROXY headers come from (mxrelay refuses smtp.proxy_protocol without smtp.proxy_networks)" }}
{{- end }}
{{- if and .Values.tls.enabled (empty .Values.tls.secretName) }}
{{- fail "tls.enabled needs tls.secretName: a kubernetes.io/tls Secret with tls.crt and tls.key" }}
{{- end }}
{{- if and .Values.tls.implicit.enabled (not .Values.tls.enabled) }}
{{- fail "tls.implicit.enabled needs tls.enabled and tls.secretName (the implicit-TLS listener needs a certificate)" }}
{{- end }}
{{- if le (int .Values.terminationGracePeriodSeconds) (add (int .Values.preStopSleepSeconds) 40 | int) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be above preStopSleepSeconds + 40 (%d): the drain lets sessions run 30 s and deliveries delivery.stop_grace (10 s)" (int .Values.terminationGracePeriodSeconds) (add (int .Values.preStopSleepSeconds) 40)) }}
{{- end }}
{{- if and .Values.secret.create (or (empty .Values.secret.domainsUrl) (empty .Values.secret.queueUrl)) }}
{{- fail "secret.create needs secret.domainsUrl and secret.queueUrl" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (lt (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas)) }}
{{- fail "autoscaling.maxReplicas must not be below autoscaling.minReplicas" }}
{{- end }}
{{- if not (has .Values.podAntiAffinity (list "soft" "hard" "none")) }}
{{- fail (printf "podAntiAffinity %q is unknown: use soft, hard or none" .Values.podAntiAffinity) }}
{{- end }}
{{- $config := .Values.config | default dict }}
{{- range $key := list "node_id" "migrate_on_start" }}
{{- if hasKey $config $key }}
{{- fail (printf "config.%s is set by the chart through the environment (per pod); remove it from config" $key) }}
{{- end }}
{{- end }}
{{- range $table := list "domains" "queue" }}
{{- if hasKey (get $config $table | default dict) "url" }}
{{- fail (printf "config.%s.url would put a password into the ConfigMap: put it into the Secret (secret.name / secret.create)" $table) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
mxrelay.toml: .Values.config with the keys the chart owns set over it,
written as TOML by the two templates below. (Helm's toToml writes every
YAML number as a float, 52428800.0, which mxrelay's integer keys refuse.)
*/}}
{{- define "mxrelay.config" -}}
{{- $config := deepCopy (.Values.config | default dict) }}
{{- $_ := set $config "myhostname" .Values.myhostname }}
{{- $smtp := get $config "smtp" | default dict }}
{{- $_ := set $smtp "listen" (printf "%s:%d" .Values.listenHost (int .Values.ports.smtp)) }}
{{- $_ := set $smtp "proxy_protocol" .Values.service.proxyProtocol }}
{{- if .Values.service.proxyProtocol }}
{{- $_ := set $smtp "proxy_networks" .Values.service.proxyNetworks }}
{{- end }}
{{- $_ := set $config "smtp" $smtp }}
{{- $_ := set $config "admin" (dict "listen" (printf "%s:%d" .Values.listenHost (int .Values.ports.admin))) }}
{{- if .Values.tls.enabled }}
{{- $tls := get $config "tls" | default dict }}
{{- $_ := set $tls "cert" "/etc/mxrelay/tls/tls.crt" }}
{{- $_ := set $tls "key" "/etc/mxrelay/tls/tls.key" }}
{{- if .Values.tls.implicit.enabled }}
{{- $_ := set $tls "implicit_listen" (printf "%s:%d" .Values.listenHost (int .Values.ports.smtps)) }}
{{- end }}
{{- $_ := set $config "tls" $tls }}
{{- end -}}
# mxrelay.toml, rendered by the mxrelay Helm chart from .Values.config.
# node_id, migrate_on_start, domains.url and queue.url come from the
# environment (MXRELAY_*), which overrides this file.
{{ include "mxrelay.toml.table" (dict "table" $config "path" list) }}
{{- end }}

{{/* One TOML table: its plain keys, then its sub-tables as [a.b] sections. */}}
{{- define "mxrelay.toml.table" -}}
{{- $path := .path }}
{{- range $key, $value := .table }}
{{- if not (or (kindIs "map" $value) (kindIs "invalid" $value)) }}
{{ include "mxrelay.toml.key" $key }} = {{ include "mxrelay.toml.value" $value }}
{{- end }}
{{- end }}
{{- range $key, $value := .table }}
{{- if kindIs "map" $value }}
{{- $sub := append $path (include "mxrelay.toml.key" $key) }}

[{{ join "." $sub }}]
{{- include "mxrelay.toml.table" (dict "table" $value "path" $sub) }}
{{- end }}
{{- end }}
{{- end }}

{{- define "mxrelay.toml.key" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{/* A string (JSON escapes are TOML escapes), boolean, number (whole numbers as integers) or array. */}}
{{- define "mxrelay.toml.value" -}}
{{- if kindIs "string" . }}
{{- toJson . }}
{{- else if kindIs "bool" . }}
{{- . }}
{{- else if kindIs "float64" . }}
{{- if eq (floor .) . }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else if or (kindIs "int" .) (kindIs "int64" .) }}
{{- . }}
{{- else if kindIs "slice" . }}
{{- $items := list }}
{{- range . }}
{{- $items = append $items (include "mxrelay.toml.value" .) }}
{{- end }}
{{- printf "[%s]" (join ", " $items) }}
{{- else }}
{{- fail (printf "config: %v (%s) cannot be written as a TOML value" . (kindOf .)) }}
{{- end }}
{{- end }}

{{/*
The environment both the relay and the migration Job need: a node_id per
pod (the pod name is unique and stays put for the pod's life, which is as
long as its queue leases need it) and the two URLs from the Secret.
*/}}
{{- define "mxrelay.env" -}}
- name: MXRELAY_NODE_ID
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: MXRELAY_DOMAINS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "mxrelay.secretName" . }}
      key: {{ .Values.secret.domainsUrlKey }}
- name: MXRELAY_QUEUE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "mxrelay.secretName" . }}
      key: {{ .Values.secret.queueUrlKey }}
{{- end }}
