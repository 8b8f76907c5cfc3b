{{/*
The API pod template, shared by the Deployment and the Argo Rollout.
Argument: the root context.
*/}}
{{- define "fibonacci-api.podTemplate" -}}
metadata:
  labels:
    {{- include "fibonacci-api.labels" . | nindent 4 }}
    app.kubernetes.io/component: api
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- include "fibonacci-api.meshPodMetadata" (dict "root" . "kind" "labels") | nindent 4 }}
  annotations:
    {{- include "fibonacci-api.meshPodMetadata" (dict "root" . "kind" "annotations") | nindent 4 }}
    # A changed setting changes this hash, which rolls the pods: env vars are
    # read once at start.
    checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
    {{- if or .Values.externalRedis.url .Values.externalRedis.clusterNodes }}
    checksum/secret: {{ include (print $.Template.BasePath "/secret.yaml") . | sha256sum }}
    {{- end }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "fibonacci-api.serviceAccountName" . }}
  automountServiceAccountToken: {{ .Values.automountServiceAccountToken }}
  # Service links would put one env var per Service in the namespace into the
  # process: noise, and a name clash risk with the configuration contract.
  enableServiceLinks: false
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  {{- $hashKey := ternary "rollouts-pod-template-hash" "pod-template-hash" .Values.rollout.enabled }}
  {{- if or .Values.topologySpread.zone.enabled .Values.topologySpread.node.enabled .Values.extraTopologySpreadConstraints }}
  topologySpreadConstraints:
    {{- range $key, $topologyKey := dict "zone" "topology.kubernetes.io/zone" "node" "kubernetes.io/hostname" }}
    {{- $c := get $.Values.topologySpread $key }}
    {{- if $c.enabled }}
    - topologyKey: {{ $topologyKey }}
      maxSkew: {{ $c.maxSkew }}
      whenUnsatisfiable: {{ $c.whenUnsatisfiable }}
      # Tainted nodes the pods cannot use do not count as empty domains.
      nodeTaintsPolicy: Honor
      labelSelector:
        matchLabels:
          {{- include "fibonacci-api.selectorLabels" $ | nindent 10 }}
      matchLabelKeys:
        - {{ $hashKey }}
    {{- end }}
    {{- end }}
    {{- with .Values.extraTopologySpreadConstraints }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .Chart.Name }}
      image: {{ include "fibonacci-api.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      ports:
        - name: http
          containerPort: {{ .Values.ports.http }}
          protocol: TCP
        {{- if .Values.admin.enabled }}
        - name: admin
          containerPort: {{ .Values.ports.admin }}
          protocol: TCP
        {{- end }}
      envFrom:
        - configMapRef:
            name: {{ include "fibonacci-api.fullname" . }}
      env:
        - name: POD_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        - name: POD_NAMESPACE
          valueFrom:
            fieldRef:
              fieldPath: metadata.namespace
        - name: NODE_NAME
          valueFrom:
            fieldRef:
              fieldPath: spec.nodeName
        {{- if or .Values.mesh.istio.enabled .Values.mesh.linkerd.enabled }}
        # The mesh proxy in this pod is the TCP peer of every request: trusted
        # as a proxy (fibonacci-api.trustedProxies), with the pod's addresses.
        - name: POD_IPS
          valueFrom:
            fieldRef:
              fieldPath: status.podIPs
        - name: TRUSTED_PROXIES
          value: {{ include "fibonacci-api.trustedProxies" . | quote }}
        {{- end }}
        # Traces carry the pod they came from ($(VAR) expands the vars above).
        - name: OTEL_RESOURCE_ATTRIBUTES
          value: {{ printf "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE),k8s.node.name=$(NODE_NAME),service.version=%s%s" (include "fibonacci-api.imageTag" .) (ternary (printf ",%s" .Values.config.OTEL_RESOURCE_ATTRIBUTES) "" (ne .Values.config.OTEL_RESOURCE_ATTRIBUTES "")) | quote }}
        {{- if .Values.redis.enabled }}
        {{- if .Values.redis.auth.existingSecret }}
        - name: REDIS_PASSWORD
          valueFrom:
            secretKeyRef:
              name: {{ .Values.redis.auth.existingSecret }}
              key: {{ .Values.redis.auth.existingSecretKey }}
        - name: REDIS_URL
          value: {{ printf "redis://:$(REDIS_PASSWORD)@%s:6379/0" (include "fibonacci-api.redis.fullname" .) | quote }}
        {{- else }}
        - name: REDIS_URL
          value: {{ printf "redis://%s:6379/0" (include "fibonacci-api.redis.fullname" .) | quote }}
        {{- end }}
        {{- else if include "fibonacci-api.externalRedis" . }}
        - name: {{ if or .Values.externalRedis.clusterNodes .Values.externalRedis.existingSecretIsCluster }}REDIS_CLUSTER_NODES{{ else }}REDIS_URL{{ end }}
          valueFrom:
            secretKeyRef:
              name: {{ include "fibonacci-api.externalRedisSecretName" . }}
              key: {{ .Values.externalRedis.existingSecretKey }}
        {{- end }}
        {{- if .Values.externalSecret.enabled }}
        # From the ExternalSecret's Secret. A changed value reaches the pods at
        # their next restart (kubectl rollout restart, or a reloader).
        {{- range .Values.externalSecret.data }}
        - name: {{ .env }}
          valueFrom:
            secretKeyRef:
              name: {{ include "fibonacci-api.externalSecretName" $ }}
              key: {{ default .env .secretKey }}
        {{- end }}
        {{- end }}
        {{- with .Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      startupProbe:
        httpGet:
          path: /livez
          port: {{ include "fibonacci-api.opsPort" . }}
        periodSeconds: {{ .Values.probes.startup.periodSeconds }}
        timeoutSeconds: {{ .Values.probes.startup.timeoutSeconds }}
        failureThreshold: {{ .Values.probes.startup.failureThreshold }}
      livenessProbe:
        httpGet:
          path: /livez
          port: {{ include "fibonacci-api.opsPort" . }}
        periodSeconds: {{ .Values.probes.liveness.periodSeconds }}
        timeoutSeconds: {{ .Values.probes.liveness.timeoutSeconds }}
        failureThreshold: {{ .Values.probes.liveness.failureThreshold }}
      readinessProbe:
        httpGet:
          path: /readyz
          port: {{ include "fibonacci-api.opsPort" . }}
        periodSeconds: {{ .Values.probes.readiness.periodSeconds }}
        timeoutSeconds: {{ .Values.probes.readiness.timeoutSeconds }}
        failureThreshold: {{ .Values.probes.readiness.failureThreshold }}
        successThreshold: {{ .Values.probes.readiness.successThreshold }}
      {{- if gt (int .Values.lifecycle.preStopSleepSeconds) 0 }}
      lifecycle:
        preStop:
          sleep:
            seconds: {{ .Values.lifecycle.preStopSleepSeconds }}
      {{- end }}
      resources:
        {{- toYaml .Values.resources | nindent 8 }}
{{- end }}
