{{/*
Names and labels shared by every template.
*/}}

{{/* Chart name, overridable, cut to the 63 characters a DNS label allows. */}}
{{- define "fibonacci-api.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: the release name, unless it does not already contain
the chart name. It names the Deployment, Service, HPA... and so it is also the
`job` label Prometheus gives the scraped series (ServiceMonitor: job = Service).
*/}}
{{- define "fibonacci-api.fullname" -}}
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

{{- define "fibonacci-api.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "fibonacci-api.labels" -}}
helm.sh/chart: {{ include "fibonacci-api.chart" . }}
app.kubernetes.io/name: {{ include "fibonacci-api.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ include "fibonacci-api.imageTag" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fibonacci-api
{{- end }}

{{/*
Selector of the API pods. The component label keeps the API's Service, PDB,
HPA and NetworkPolicy from selecting the in-cluster Redis pods, which share
name and instance. Selectors are immutable: never change this after a release.
*/}}
{{- define "fibonacci-api.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fibonacci-api.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: api
{{- end }}

{{- define "fibonacci-api.redis.fullname" -}}
{{- printf "%s-redis" (include "fibonacci-api.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fibonacci-api.redis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fibonacci-api.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: cache
{{- end }}

{{- define "fibonacci-api.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fibonacci-api.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "fibonacci-api.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{/* repository:tag, or repository@digest when a digest is pinned. */}}
{{- define "fibonacci-api.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (include "fibonacci-api.imageTag" .) }}
{{- end }}
{{- end }}

{{- define "fibonacci-api.redis.image" -}}
{{- if .Values.redis.image.digest }}
{{- printf "%s@%s" .Values.redis.image.repository .Values.redis.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.redis.image.repository .Values.redis.image.tag }}
{{- end }}
{{- end }}

{{/* "true" when the pods get a REDIS_URL (in-cluster or external). */}}
{{- define "fibonacci-api.redisConfigured" -}}
{{- if or .Values.redis.enabled .Values.externalRedis.url .Values.externalRedis.existingSecret }}true{{- end }}
{{- end }}

{{/* The Secret holding REDIS_URL for an external Redis. */}}
{{- define "fibonacci-api.externalRedisSecretName" -}}
{{- default (printf "%s-redis-url" (include "fibonacci-api.fullname" .)) .Values.externalRedis.existingSecret }}
{{- end }}

{{/* Port name the probes and Prometheus use: the admin listener when enabled. */}}
{{- define "fibonacci-api.opsPort" -}}
{{- if .Values.admin.enabled }}admin{{ else }}http{{ end }}
{{- end }}

{{/*
PromQL label matchers that scope every alert and recording rule to this
release: its namespace and its scrape job (the Service name). Without them two
releases in one cluster (staging and production) would fire each other's alerts.
*/}}
{{- define "fibonacci-api.ruleSelector" -}}
{{- if .Values.prometheusRule.selector }}
{{- .Values.prometheusRule.selector }}
{{- else }}
{{- printf "namespace=\"%s\", job=\"%s\"" .Release.Namespace (include "fibonacci-api.fullname" .) }}
{{- end }}
{{- end }}

{{/* Whole seconds in a Prometheus/Go duration such as "2m30s" (ms are dropped). */}}
{{- define "fibonacci-api.seconds" -}}
{{- $total := 0 }}
{{- range regexFindAll "[0-9]+(ms|h|m|s)" (toString .) -1 }}
{{- $n := int (regexFind "^[0-9]+" .) }}
{{- $unit := regexReplaceAll "^[0-9]+" . "" }}
{{- if eq $unit "h" }}{{ $total = add $total (mul $n 3600) }}
{{- else if eq $unit "m" }}{{ $total = add $total (mul $n 60) }}
{{- else if eq $unit "s" }}{{ $total = add $total $n }}
{{- end }}
{{- end }}
{{- $total }}
{{- end }}

{{/*
Fail rendering on combinations that would deploy something broken. Included
from the workload template so every render runs it.
*/}}
{{- define "fibonacci-api.validate" -}}
{{- if and .Values.redis.enabled (or .Values.externalRedis.url .Values.externalRedis.existingSecret) }}
{{- fail "redis.enabled (in-cluster Redis) and externalRedis.url/existingSecret are exclusive: choose one" }}
{{- end }}
{{- if and .Values.externalRedis.url .Values.externalRedis.existingSecret }}
{{- fail "externalRedis.url and externalRedis.existingSecret are exclusive: the URL goes either in values or in your own Secret" }}
{{- end }}
{{- /* The app keeps serving SHUTDOWN_DRAIN_SECONDS after SIGTERM, then drains
       in-flight requests for up to REQUEST_TIMEOUT_MS; the kubelet must not
       SIGKILL it before that, plus 10 s to flush traces (the OTLP exporter's
       default export timeout) and exit. */}}
{{- $drain := int .Values.config.SHUTDOWN_DRAIN_SECONDS }}
{{- $requestDeadline := div (add (int .Values.config.REQUEST_TIMEOUT_MS) 999) 1000 }}
{{- $preStop := int .Values.lifecycle.preStopSleepSeconds }}
{{- $needed := add $preStop $drain $requestDeadline 10 }}
{{- if lt (int .Values.terminationGracePeriodSeconds) (int $needed) }}
{{- fail (printf "terminationGracePeriodSeconds=%d is too short: preStop sleep %ds + SHUTDOWN_DRAIN_SECONDS %ds + request deadline %ds + 10s trace flush needs at least %d" (int .Values.terminationGracePeriodSeconds) $preStop $drain $requestDeadline $needed) }}
{{- end }}
{{- if and .Values.rollout.enabled .Values.rollout.analysis.enabled (not .Values.serviceMonitor.enabled) }}
{{- fail "rollout.analysis needs serviceMonitor.enabled: the analysis query selects canary pods by the rollouts_pod_template_hash label that the ServiceMonitor attaches" }}
{{- end }}
{{- if and .Values.rollout.enabled .Values.rollout.analysis.enabled }}
{{- $scrape := int (include "fibonacci-api.seconds" .Values.serviceMonitor.interval) }}
{{- $window := int (include "fibonacci-api.seconds" .Values.rollout.analysis.rateWindow) }}
{{- $delay := int (include "fibonacci-api.seconds" .Values.rollout.analysis.initialDelay) }}
{{- if lt $delay (add (mul 2 $scrape) $window) }}
{{- fail (printf "rollout.analysis.initialDelay=%s is too short: the canary needs two scrapes (2 x serviceMonitor.interval %s) and a full rateWindow (%s) before its error ratio is a number, %ds in all; a measurement before that is inconclusive and pauses every healthy rollout" .Values.rollout.analysis.initialDelay .Values.serviceMonitor.interval .Values.rollout.analysis.rateWindow (add (mul 2 $scrape) $window)) }}
{{- end }}
{{- end }}
{{- $np := .Values.networkPolicy }}
{{- if and $np.enabled .Values.serviceMonitor.enabled (not .Values.admin.enabled) $np.ingressFrom (not $np.metricsFrom) }}
{{- fail "networkPolicy.ingressFrom restricts the API port, which also serves /metrics while admin.enabled=false, and networkPolicy.metricsFrom is empty: the NetworkPolicy would block Prometheus' scrape, and with it every alert, the dashboard, the requests-per-second autoscaling and the canary analysis. Set networkPolicy.metricsFrom to your Prometheus (e.g. its namespace), or admin.enabled=true" }}
{{- end }}
{{- if .Values.ingress.enabled }}
{{- range .Values.ingress.paths }}
{{- $path := .path }}
{{- $prefix := eq .pathType "Prefix" }}
{{- range list "/metrics" "/livez" "/readyz" }}
{{- if or (eq $path .) (and $prefix (or (eq $path "/") (hasPrefix (printf "%s/" (trimSuffix "/" $path)) .))) }}
{{- fail (printf "ingress.paths: %s (%s) would route %s to the internet: list only the public API paths (/fibonacci, /health, /openapi.json, /docs)" $path $.Values.ingress.paths (.)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- end }}
