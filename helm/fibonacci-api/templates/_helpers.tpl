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
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
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

{{/* The service settings the ExternalSecret provides (externalSecret.data[].env), as a list. */}}
{{- define "fibonacci-api.externalSecretEnv" -}}
{{- $names := list }}
{{- if .Values.externalSecret.enabled }}
{{- range .Values.externalSecret.data }}{{ $names = append $names .env }}{{ end }}
{{- end }}
{{- toJson $names }}
{{- end }}

{{/*
The environment variables the chart sets in the API container, each with the
value that sets it: every config.* key (the ConfigMap), the listen addresses,
the downward-API and Redis variables of the pod spec, and the ExternalSecret's
settings. extraEnv may not set these (fibonacci-api.validate): an env entry
wins over envFrom and over earlier entries, so it would silently override what
the chart's checks and the Ingress paths were computed from. A JSON object.
*/}}
{{- define "fibonacci-api.managedEnv" -}}
{{- $redis := "redis.enabled, externalRedis or externalSecret.data" }}
{{- $m := dict "LISTEN_ADDR" "ports.http" "ADMIN_LISTEN_ADDR" "admin.enabled and ports.admin" "POD_NAME" "" "POD_NAMESPACE" "" "NODE_NAME" "" "OTEL_RESOURCE_ATTRIBUTES" "config.OTEL_RESOURCE_ATTRIBUTES" "REDIS_URL" $redis "REDIS_CLUSTER_NODES" $redis }}
{{- /* A config key left "" is not set (the ConfigMap omits it), so extraEnv may
       give it, e.g. from a Secret or with $(VAR) expansion. */}}
{{- range $k, $v := .Values.config }}{{ if ne (toString $v) "" }}{{ $_ := set $m $k (printf "config.%s" $k) }}{{ end }}{{ end }}
{{- if or .Values.mesh.istio.enabled .Values.mesh.linkerd.enabled }}
{{- $_ := set $m "POD_IPS" "" }}
{{- $_ := set $m "TRUSTED_PROXIES" "config.TRUSTED_PROXIES (the mesh's proxy is added to it)" }}
{{- end }}
{{- if and .Values.redis.enabled .Values.redis.auth.existingSecret }}
{{- $_ := set $m "REDIS_PASSWORD" "redis.auth.existingSecret" }}
{{- end }}
{{- range include "fibonacci-api.externalSecretEnv" . | fromJsonArray }}{{ $_ := set $m . "externalSecret.data alone (it provides it already)" }}{{ end }}
{{- toJson $m }}
{{- end }}

{{/* "true" when the pods get a Redis (in-cluster, external, or from the ExternalSecret). */}}
{{- define "fibonacci-api.redisConfigured" -}}
{{- $fromSecret := include "fibonacci-api.externalSecretEnv" . | fromJsonArray }}
{{- if or .Values.redis.enabled (include "fibonacci-api.externalRedis" .) (has "REDIS_URL" $fromSecret) (has "REDIS_CLUSTER_NODES" $fromSecret) }}true{{- end }}
{{- end }}

{{/* The Secret the ExternalSecret writes. */}}
{{- define "fibonacci-api.externalSecretName" -}}
{{- default (printf "%s-external" (include "fibonacci-api.fullname" .)) .Values.externalSecret.target.name }}
{{- end }}

{{/* The service account identity of this release's pods in the Istio mesh. */}}
{{- define "fibonacci-api.istioPrincipal" -}}
{{- printf "%s/ns/%s/sa/%s" .Values.mesh.istio.trustDomain .Release.Namespace (include "fibonacci-api.serviceAccountName" .) }}
{{- end }}

{{/*
Pod annotations and labels that put a pod into the service mesh (mesh.istio or
mesh.linkerd), for the API pods and the chart's other pods alike. The proxy runs
as a native sidecar (an init container that keeps running, Kubernetes >= 1.29):
it starts before the app and stops after it, so the app never starts without its
network, the drain after SIGTERM still has one, and Jobs (the load test) finish.
Argument: dict "root" . "kind" "annotations"|"labels".
*/}}
{{- define "fibonacci-api.meshPodMetadata" -}}
{{- $v := .root.Values.mesh }}
{{- if eq .kind "labels" }}
{{- if and $v.istio.enabled $v.istio.inject }}
sidecar.istio.io/inject: "true"
{{- end }}
{{- else }}
{{- if $v.istio.enabled }}
sidecar.istio.io/nativeSidecar: "true"
# Kubelet probes go to the sidecar's agent (port 15020), which calls the app
# locally: they work under STRICT mTLS and no AuthorizationPolicy applies.
sidecar.istio.io/rewriteAppHTTPProbers: "true"
{{- end }}
{{- if $v.linkerd.enabled }}
linkerd.io/inject: enabled
config.alpha.linkerd.io/proxy-enable-native-sidecar: "true"
{{- end }}
{{- end }}
{{- end }}

{{/*
TRUSTED_PROXIES as the pods get it. Behind a mesh sidecar the service's TCP peer
is the proxy inside the pod, never the client: Istio's inbound cluster binds
127.0.0.6 (::6 on IPv6), Linkerd forwards from 127.0.0.1 (::1), and either may
come from the pod's own address (forwarding to the pod IP, Istio's probe
agent). Those are added, so that clients stay apart (the ingress gateway's or
controller's X-Forwarded-For is believed) and the per-address connection caps
do not put every client into one address's 64 connections. Only processes in
the pod can use these source addresses. $(POD_IPS) is expanded by the kubelet.
*/}}
{{- define "fibonacci-api.trustedProxies" -}}
{{- $list := list }}
{{- with .Values.config.TRUSTED_PROXIES }}{{ $list = append $list . }}{{ end }}
{{- if or .Values.mesh.istio.enabled .Values.mesh.linkerd.enabled }}
{{- $list = concat $list (list "127.0.0.0/8" "::1/128" "::6/128" "$(POD_IPS)") }}
{{- end }}
{{- join "," $list }}
{{- end }}

{{/* "true" when an external Redis (one node or a cluster) is configured. */}}
{{- define "fibonacci-api.externalRedis" -}}
{{- if or .Values.externalRedis.url .Values.externalRedis.clusterNodes .Values.externalRedis.existingSecret }}true{{- end }}
{{- end }}

{{/* The Secret holding REDIS_URL (or REDIS_CLUSTER_NODES) for an external Redis. */}}
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

{{/* Bytes in a Kubernetes memory quantity ("256Mi", "1G", "268435456"); -1 if unparsable. */}}
{{- define "fibonacci-api.bytes" -}}
{{- $q := toString . }}
{{- $num := regexFind "^[0-9]+" $q }}
{{- $unit := trimPrefix $num $q }}
{{- $units := dict "" 1 "k" 1000 "M" 1000000 "G" 1000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 }}
{{- if and $num (hasKey $units $unit) }}{{ mul (int64 $num) (get $units $unit) }}{{ else }}-1{{ end }}
{{- end }}

{{/*
Fail rendering on combinations that would deploy something broken. Included
from the workload template so every render runs it.
*/}}
{{- define "fibonacci-api.validate" -}}
{{- if and .Values.redis.enabled (include "fibonacci-api.externalRedis" .) }}
{{- fail "redis.enabled (in-cluster Redis) and externalRedis.url/clusterNodes/existingSecret are exclusive: choose one" }}
{{- end }}
{{- if and .Values.externalRedis.url .Values.externalRedis.clusterNodes }}
{{- fail "externalRedis.url (one Redis node: REDIS_URL) and externalRedis.clusterNodes (a Redis Cluster: REDIS_CLUSTER_NODES) are exclusive: choose one" }}
{{- end }}
{{- if and .Values.externalRedis.clusterNodes .Values.externalRedis.existingSecret }}
{{- fail "externalRedis.clusterNodes and externalRedis.existingSecret are exclusive: the seed nodes go either in values or in your own Secret (with existingSecretIsCluster: true)" }}
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
{{- /* The service's memory at its bounds (docs/reliability.md "Memory stays flat"): 20 MiB + 1.5 x
       CACHE_MAX_BYTES + 155 B x RATE_LIMIT_MAX_KEYS + 96 KiB per connection it may
       hold (MAX_CONNECTIONS, and 64 more on the admin port). A limit below it is an
       OOM kill a few hours in, once the cache has filled, or at once when clients
       park every connection on an unfinished request head. The schema keeps these
       keys present (a null would drop them here but not in the binary). */}}
{{- $connections := add (int64 .Values.config.MAX_CONNECTIONS) (ternary 64 0 .Values.admin.enabled) }}
{{- $needed := add 20971520 (div (mul 3 (int64 .Values.config.CACHE_MAX_BYTES)) 2) (mul 155 (int64 .Values.config.RATE_LIMIT_MAX_KEYS)) (mul 98304 $connections) }}
{{- $limitQuantity := dig "limits" "memory" "" .Values.resources }}
{{- $limit := int64 (include "fibonacci-api.bytes" $limitQuantity) }}
{{- if and $limitQuantity (lt $limit 0) }}
{{- fail (printf "resources.limits.memory=%v: the chart cannot read this quantity to check it against what the service needs; write it as a whole number with one of the suffixes k, M, G, Ki, Mi, Gi (e.g. 384Mi)" $limitQuantity) }}
{{- end }}
{{- if and (ge $limit 0) (lt $limit $needed) }}
{{- fail (printf "resources.limits.memory=%s is below what the service needs with its cache, rate limiter and connections full: 20 MiB + 1.5 x CACHE_MAX_BYTES (%d) + 155 B x RATE_LIMIT_MAX_KEYS (%d) + 96 KiB x connections (MAX_CONNECTIONS %d%s) = %dMi; raise the limit or lower those settings" (toString .Values.resources.limits.memory) (int64 .Values.config.CACHE_MAX_BYTES) (int64 .Values.config.RATE_LIMIT_MAX_KEYS) (int64 .Values.config.MAX_CONNECTIONS) (ternary " + 64 on the admin port" "" .Values.admin.enabled) (div (add $needed 1048575) 1048576)) }}
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
{{- if not .Values.ingress.hosts }}
{{- fail "ingress.hosts is empty while ingress.enabled is true: the Ingress would have no rules and route nothing; list the host names to serve (- host: fibonacci.example.com), or set ingress.enabled=false" }}
{{- end }}
{{- $public := include "fibonacci-api.publicPaths" . | fromJsonArray }}
{{- $seen := dict }}
{{- range .Values.ingress.paths }}
{{- $path := .path }}
{{- $type := .pathType }}
{{- $prefix := eq .pathType "Prefix" }}
{{- /* Kubernetes' Prefix matching ignores a trailing slash: /docs/ is /docs. */}}
{{- $base := trimSuffix "/" $path }}
{{- range list "/metrics" "/livez" "/readyz" }}
{{- if or (eq $path .) (and $prefix (or (eq (trimAll "/" $path) "") (eq $base .) (hasPrefix (printf "%s/" $base) .))) }}
{{- fail (printf "ingress.paths: %s (%s) would route %s to the internet: list only the public API paths (%s)" $path $type (.) (join ", " $public)) }}
{{- end }}
{{- end }}
{{- /* A page of the service: Exact, a public path or a file of the docs page
       (/docs/VERSION/FILE); Prefix, a public path, whole leading segments of one
       (/docs, not /doc or /docs.json) or one directory of the docs page's files. Case-sensitive, as the service is. */}}
{{- $served := false }}
{{- if $prefix }}
{{- range $public }}{{ if or (eq . $base) (hasPrefix (printf "%s/" $base) .) }}{{ $served = true }}{{ end }}{{ end }}
{{- if regexMatch "^/docs/[A-Za-z0-9_-][A-Za-z0-9._-]*$" $base }}{{ $served = true }}{{ end }}
{{- else if or (has $path $public) (regexMatch "^/docs/([A-Za-z0-9_-][A-Za-z0-9._-]*/[A-Za-z0-9_-][A-Za-z0-9._-]*)?$" $path) }}
{{- $served = true }}
{{- end }}
{{- if not $served }}
{{- fail (printf "ingress.paths: %s (%s) routes to no page of the service: list its public paths (%s; paths are case-sensitive), Exact or as a Prefix of whole segments of one; Exact may also name a file under /docs/" $path $type (join ", " $public)) }}
{{- end }}
{{- $key := printf "%s %s" $type (ternary $base $path $prefix) }}
{{- if hasKey $seen $key }}
{{- $first := get $seen $key }}
{{- fail (printf "ingress.paths lists %s (%s) twice%s: remove the duplicate entry" $path $type (ternary (printf " (as %s and %s: a Prefix's trailing slash does not count)" $first $path) "" (ne $first $path))) }}
{{- end }}
{{- $_ := set $seen $key $path }}
{{- end }}
{{- if not (fromYamlArray (include "fibonacci-api.ingressPaths" .)) }}
{{- fail (printf "ingress.paths: nothing left to route (the /docs paths are left out while config.DOCS_ENABLED is false): list the API paths (%s)" (join ", " (without $public "/docs"))) }}
{{- end }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- if and .Values.autoscaling.enabled .Values.keda.enabled }}
{{- fail "autoscaling.enabled (the chart's HPA) and keda.enabled (a KEDA ScaledObject, which creates its own HPA) are exclusive: two HPAs on one Deployment fight over its replicas; turn one off" }}
{{- end }}
{{- if and .Values.keda.enabled (not .Values.serviceMonitor.enabled) }}
{{- fail "keda.enabled needs serviceMonitor.enabled: the ScaledObject's Prometheus trigger reads http_requests_total by the namespace and job labels the ServiceMonitor's scrape gives it" }}
{{- end }}
{{- if and .Values.keda.enabled (gt (int .Values.keda.minReplicas) (int .Values.keda.maxReplicas)) }}
{{- fail "keda.minReplicas must not exceed keda.maxReplicas" }}
{{- end }}
{{- $own := list "helm.sh/chart" "app.kubernetes.io/name" "app.kubernetes.io/instance" "app.kubernetes.io/version" "app.kubernetes.io/managed-by" "app.kubernetes.io/part-of" "app.kubernetes.io/component" }}
{{- range $k, $_ := .Values.commonLabels }}
{{- if has $k $own }}
{{- fail (printf "commonLabels.%s: the chart sets this label itself (selectors depend on it); use another key for cost allocation" $k) }}
{{- end }}
{{- end }}
{{- if .Values.externalSecret.enabled }}
{{- $env := include "fibonacci-api.externalSecretEnv" . | fromJsonArray }}
{{- if not $env }}
{{- fail "externalSecret.enabled with no externalSecret.data: list the settings (REDIS_URL, REDIS_CLUSTER_NODES, AUTH_JWT_HS256_SECRET) and where each lives in the store" }}
{{- end }}
{{- if ne (len $env) (len (uniq $env)) }}
{{- fail (printf "externalSecret.data names a setting twice: %s" (join ", " $env)) }}
{{- end }}
{{- if and (has "REDIS_URL" $env) (has "REDIS_CLUSTER_NODES" $env) }}
{{- fail "externalSecret.data: REDIS_URL and REDIS_CLUSTER_NODES are exclusive (one Redis, or one Redis Cluster)" }}
{{- end }}
{{- if and (or (has "REDIS_URL" $env) (has "REDIS_CLUSTER_NODES" $env)) (or .Values.redis.enabled (include "fibonacci-api.externalRedis" .)) }}
{{- fail "externalSecret.data provides the Redis address, and so do redis.enabled or externalRedis: these are exclusive, choose one" }}
{{- end }}
{{- if and (has "AUTH_JWT_HS256_SECRET" $env) (not (trim (toString (default "" .Values.config.AUTH_JWT_AUDIENCE)))) }}
{{- fail "externalSecret.data provides AUTH_JWT_HS256_SECRET (auth on) but config.AUTH_JWT_AUDIENCE is empty: set the audience tokens must carry (or * for any)" }}
{{- end }}
{{- end }}
{{- $managed := include "fibonacci-api.managedEnv" . | fromJson }}
{{- $jwtKeys := list "AUTH_JWT_HS256_SECRET" "AUTH_JWT_PUBLIC_KEY_FILE" "AUTH_JWT_JWKS_FILE" "AUTH_JWT_JWKS_URL" }}
{{- /* The service's settings: an extraEnv name that is one of them but for its case or
       surrounding spaces is one the service never reads (a JWT key so named leaves
       auth off, silently). */}}
{{- $known := dict }}
{{- range $k, $_ := .Values.config }}{{ $_ := set $known $k true }}{{ end }}
{{- range $k, $_ := $managed }}{{ $_ := set $known $k true }}{{ end }}
{{- range (concat $jwtKeys (list "REDIS_PASSWORD")) }}{{ $_ := set $known . true }}{{ end }}
{{- $listed := dict }}
{{- range .Values.extraEnv }}
{{- $canonical := upper (trim (toString .name)) }}
{{- if and (ne (toString .name) $canonical) (hasKey $known $canonical) }}
{{- fail (printf "extraEnv lists %q, a name the service does not read (its settings are upper case, without spaces): did you mean %s?" (toString .name) $canonical) }}
{{- end }}
{{- if hasKey $listed (toString .name) }}
{{- fail (printf "extraEnv lists %s twice: the pod would get only the last entry, which hides the other (server-side apply, ArgoCD's option, can refuse the duplicate key): keep one" .name) }}
{{- end }}
{{- $_ := set $listed (toString .name) true }}
{{- if and (has (toString .name) $jwtKeys) (or .value .valueFrom) (not (trim (toString (default "" $.Values.config.AUTH_JWT_AUDIENCE)))) }}
{{- fail (printf "extraEnv sets %s (auth on) but config.AUTH_JWT_AUDIENCE is empty: the service would refuse to start; set the audience tokens must carry (or * for any)" .name) }}
{{- end }}
{{- if eq (toString .name) "_RJEM_MALLOC_CONF" }}
{{- fail "extraEnv sets _RJEM_MALLOC_CONF, which overrides the allocator's compiled-in options (.cargo/config.toml): without its background release of freed memory the pods keep what a burst of connections took, past the memory model the chart's limit is checked against; remove it" }}
{{- end }}
{{- if hasKey $managed (toString .name) }}
{{- $where := get $managed .name }}
{{- fail (printf "extraEnv sets %s, which the chart sets itself (an extraEnv entry would override it behind the chart's checks and Ingress paths): %s" .name (ternary (printf "set it through %s" $where) "remove it (the chart sets it from the downward API)" (ne $where ""))) }}
{{- end }}
{{- end }}
{{- $mesh := .Values.mesh }}
{{- if and $mesh.istio.enabled $mesh.linkerd.enabled }}
{{- fail "mesh.istio.enabled and mesh.linkerd.enabled are exclusive: a pod gets one proxy" }}
{{- end }}
{{- if $mesh.istio.enabled }}
{{- if not $mesh.istio.ingressPrincipals }}
{{- fail "mesh.istio.ingressPrincipals is empty: the AuthorizationPolicy would admit no client to the API port (list the ingress gateway's identity, e.g. cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account)" }}
{{- end }}
{{- /* STRICT mTLS admits only the ingressPrincipals to the API port, the
       NetworkPolicy only ingressFrom: unless the principals' namespaces are
       among ingressFrom's peers, nothing can reach the API (e.g. ingressFrom
       naming ingress-nginx, which is not the Istio gateway). Peers that
       cannot be judged from values (other labels, ipBlocks) count as admitting. */}}
{{- if and .Values.networkPolicy.enabled .Values.networkPolicy.ingressFrom }}
{{- range $principal := $mesh.istio.ingressPrincipals }}
{{- $ns := regexReplaceAll "^.*/ns/([^/]+)/sa/.*$" $principal "${1}" }}
{{- $admitted := false }}
{{- range $.Values.networkPolicy.ingressFrom }}
{{- if .namespaceSelector }}
{{- $name := dig "matchLabels" "kubernetes.io/metadata.name" "" .namespaceSelector }}
{{- if or (not $name) (eq $name $ns) }}{{ $admitted = true }}{{ end }}
{{- else if .podSelector }}
{{- if eq $ns $.Release.Namespace }}{{ $admitted = true }}{{ end }}
{{- else }}{{ $admitted = true }}
{{- end }}
{{- end }}
{{- if not $admitted }}
{{- fail (printf "mesh.istio.ingressPrincipals names %s in namespace %s, which networkPolicy.ingressFrom does not admit: STRICT mTLS lets only that gateway in, the NetworkPolicy keeps it out, and nothing reaches the API. Admit the gateway's namespace in networkPolicy.ingressFrom" $principal $ns) }}
{{- end }}
{{- end }}
{{- end }}
{{- if ne .Values.service.type "ClusterIP" }}
{{- fail (printf "service.type=%s with mesh.istio: a load balancer straight to the pods speaks plaintext from outside the mesh, which STRICT mTLS refuses on the API port; expose the API through the Istio ingress gateway (ingress.className: istio) and keep service.type ClusterIP" .Values.service.type) }}
{{- end }}
{{- if and .Values.serviceMonitor.enabled (not .Values.admin.enabled) (not $mesh.istio.prometheusPrincipals) }}
{{- fail "mesh.istio with admin.enabled=false and no mesh.istio.prometheusPrincipals: under STRICT mTLS a Prometheus outside the mesh cannot scrape /metrics on the API port. Set admin.enabled=true (the admin port alone then accepts plaintext), or give Prometheus Istio certificates and list its identity in prometheusPrincipals" }}
{{- end }}
{{- end }}
{{- if and (or .Values.loadTest.enabled .Values.chaos.enabled) (not .Values.config.TRUSTED_PROXIES) (ne .Values.config.RATE_LIMITS "off") }}
{{- fail "loadTest/chaos: the load comes from one pod; with rate limits on, its requests spread over synthetic client addresses in X-Forwarded-For, which the service believes only from TRUSTED_PROXIES: set config.TRUSTED_PROXIES to a range that holds the pod network" }}
{{- end }}
{{- if and .Values.chaos.enabled (eq .Values.prometheusRule.environment "production") }}
{{- fail "chaos.enabled with prometheusRule.environment=production: the chaos experiments are for staging (set prometheusRule.environment to the environment this is)" }}
{{- end }}
{{- if .Values.chaos.enabled }}
{{- if and (or .Values.chaos.experiments.redisDelay.enabled .Values.chaos.experiments.redisPartition.enabled) (not .Values.redis.enabled) }}
{{- fail "chaos.experiments.redisDelay/redisPartition target the in-cluster Redis pods: they need redis.enabled (turn them off for an external Redis)" }}
{{- end }}
{{- if .Values.mesh.istio.enabled }}
{{- fail "chaos.enabled with mesh.istio.enabled: the load task pods Chaos Mesh creates can neither carry a native sidecar nor the release's identity, so STRICT mTLS would refuse their requests; run the experiments where the API is not under STRICT mTLS" }}
{{- end }}
{{- end }}
{{- if and .Values.alertmanagerConfig.enabled .Values.alertmanagerConfig.pagingEnvironments (not .Values.alertmanagerConfig.pagerduty.routingKeySecret.name) }}
{{- fail "alertmanagerConfig.pagingEnvironments pages through PagerDuty, but alertmanagerConfig.pagerduty.routingKeySecret.name is empty" }}
{{- end }}
{{- if and (ne .Values.service.type "ClusterIP") (not .Values.admin.enabled) }}
{{- fail (printf "service.type=%s puts the API port on a load balancer, and without admin.enabled that port also serves /metrics, /livez and /readyz: set admin.enabled=true (the admin port stays on the in-cluster Service)" .Values.service.type) }}
{{- end }}
{{- if and (ne .Values.service.type "ClusterIP") (eq .Values.service.externalTrafficPolicy "Cluster") (not .Values.config.TRUSTED_PROXIES) }}
{{- fail (printf "service.type=%s with service.externalTrafficPolicy=Cluster: kube-proxy SNATs every connection to a node's address, so all clients would share a few addresses' MAX_CONNECTIONS_PER_ADDRESS and rate limits. Use externalTrafficPolicy=Local (the client's address reaches the pod), or an L7 load balancer that sends X-Forwarded-For with its addresses in config.TRUSTED_PROXIES" .Values.service.type) }}
{{- end }}
{{- if and .Values.ingress.enabled (not .Values.config.TRUSTED_PROXIES) }}
{{- fail "ingress.enabled with config.TRUSTED_PROXIES empty: every request would arrive from the ingress controller's pods, so all clients would share one rate limit and one address's MAX_CONNECTIONS_PER_ADDRESS connections; set config.TRUSTED_PROXIES to the controller's pod CIDR (e.g. 10.0.0.0/8)" }}
{{- end }}
{{- end }}

{{/*
The service's public paths, the chart's one list of them (values-independent):
the paths of its OpenAPI document (GET /openapi.json) less the admin routes
/metrics, /livez and /readyz, plus its docs page /docs (whose files are under
/docs/). ingress.paths may only route these (fibonacci-api.validate);
scripts/check-deploy config fails when the binary's OpenAPI document differs.
A JSON list.
*/}}
{{- define "fibonacci-api.publicPaths" -}}
["/fibonacci", "/health", "/openapi.json", "/docs"]
{{- end }}

{{/*
The Ingress paths rendered: ingress.paths less the /docs paths while the docs page is
off (config.DOCS_ENABLED false), which would route to a 404. A YAML list.
*/}}
{{- define "fibonacci-api.ingressPaths" -}}
{{- $kept := list }}
{{- range .Values.ingress.paths }}
{{- if not (and (or (eq .path "/docs") (hasPrefix "/docs/" .path)) (eq (toString $.Values.config.DOCS_ENABLED) "false")) }}
{{- $kept = append $kept . }}
{{- end }}
{{- end }}
{{- toYaml $kept }}
{{- end }}
