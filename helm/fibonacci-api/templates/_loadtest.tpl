{{/*
The load test container (files/loadtest.py in the python image), shared by the
PostSync Job and the chaos experiments' load tasks.
Argument: dict "root" . "env" (dict of LOAD_* overrides).
*/}}
{{- define "fibonacci-api.loadTestContainer" -}}
{{- $ := .root }}
{{- $l := $.Values.loadTest }}
{{- $env := merge (dict) .env (dict
  "LOAD_BASE_URL" (printf "http://%s:%d" (include "fibonacci-api.fullname" $) (int $.Values.service.port))
  "LOAD_CONCURRENCY" $l.concurrency
  "LOAD_MAX_N" $.Values.config.MAX_N
  "LOAD_CLIENT_CIDR" $l.clientCidr
  "LOAD_LATENCY_THRESHOLD_SECONDS" $.Values.prometheusRule.slo.latencyThreshold
  "LOAD_LATENCY_TARGET" $.Values.prometheusRule.slo.latencyTarget
  "LOAD_MIN_REQUESTS" $l.minRequests
  "PYTHONDONTWRITEBYTECODE" "1"
  "PYTHONUNBUFFERED" "1") }}
name: loadtest
image: {{ printf "%s:%s" $l.image.repository $l.image.tag }}
imagePullPolicy: {{ $l.image.pullPolicy }}
command: ["python3", "/loadtest/loadtest.py"]
env:
  {{- range $k, $v := $env }}
  - name: {{ $k }}
    value: {{ toString $v | quote }}
  {{- end }}
  {{- if $.Values.externalSecret.enabled }}
  {{- range $.Values.externalSecret.data }}
  {{- if eq .env "AUTH_JWT_HS256_SECRET" }}
  # JWT auth is on: the load signs its tokens with the service's own key, for
  # its audience (and issuer), one subject per synthetic client.
  - name: LOAD_JWT_HS256_SECRET
    valueFrom:
      secretKeyRef:
        name: {{ include "fibonacci-api.externalSecretName" $ }}
        key: {{ default .env .secretKey }}
  - name: LOAD_JWT_AUDIENCE
    value: {{ $.Values.config.AUTH_JWT_AUDIENCE | quote }}
  - name: LOAD_JWT_ISSUER
    value: {{ $.Values.config.AUTH_JWT_ISSUER | quote }}
  {{- end }}
  {{- end }}
  {{- end }}
volumeMounts:
  - name: loadtest
    mountPath: /loadtest
    readOnly: true
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  privileged: false
  runAsNonRoot: true
  runAsUser: 65532
  runAsGroup: 65532
  seccompProfile:
    type: RuntimeDefault
  capabilities:
    drop: ["ALL"]
resources:
  {{- toYaml $l.resources | nindent 2 }}
{{- end }}

{{/* The volume holding the script. Argument: the root context. */}}
{{- define "fibonacci-api.loadTestVolume" -}}
name: loadtest
configMap:
  name: {{ include "fibonacci-api.fullname" . }}-loadtest
{{- end }}

{{/* The load test Job's pod template. Argument: dict "root" . "env" (dict). */}}
{{- define "fibonacci-api.loadTestPod" -}}
{{- $ := .root }}
metadata:
  labels:
    {{- include "fibonacci-api.labels" $ | nindent 4 }}
    # The API's NetworkPolicy admits this release's test pods.
    app.kubernetes.io/component: test
    {{- include "fibonacci-api.meshPodMetadata" (dict "root" $ "kind" "labels") | nindent 4 }}
  annotations:
    {{- include "fibonacci-api.meshPodMetadata" (dict "root" $ "kind" "annotations") | nindent 4 }}
spec:
  restartPolicy: Never
  # The release's account: its mesh identity is the one the Istio
  # AuthorizationPolicy admits besides the ingress gateway. No API token.
  serviceAccountName: {{ include "fibonacci-api.serviceAccountName" $ }}
  automountServiceAccountToken: false
  enableServiceLinks: false
  securityContext:
    runAsNonRoot: true
    runAsUser: 65532
    runAsGroup: 65532
    seccompProfile:
      type: RuntimeDefault
  containers:
    - {{- include "fibonacci-api.loadTestContainer" . | nindent 6 }}
  volumes:
    - {{- include "fibonacci-api.loadTestVolume" $ | nindent 6 }}
{{- end }}
