{{/*
The Prometheus rule groups: SLO recording rules and alerts. Rendered into the
PrometheusRule and, for release "fibonacci-api" in namespace "fibonacci-api"
with Redis configured, into deploy/prometheus/alerts.yaml
(`scripts/check-deploy gen-alerts`; the check fails if the two differ).

SLOs, on GET /fibonacci only (probes and scrapes would dilute them):
- availability: availabilityTarget of requests are not 5xx;
- latency: latencyTarget of requests finish within latencyThreshold seconds.
Alerts are multi-window, multi-burn-rate (Google SRE workbook, ch. 5): a burn
rate of 14.4 over 1 h spends 2% of a 30-day error budget (page now); 6 over
6 h spends 5% (page, less urgent). The short window (1/12 of the long one)
makes the alert stop soon after the burning does.
*/}}
{{- define "fibonacci-api.ruleGroups" -}}
{{- $sel := include "fibonacci-api.ruleSelector" . }}
{{- $fib := printf "%s, route=\"/fibonacci\"" $sel }}
{{- $slo := .Values.prometheusRule.slo }}
{{- $runbook := .Values.prometheusRule.runbookBaseUrl }}
{{- $alertLabels := .Values.prometheusRule.alertLabels }}
- name: fibonacci-api.slo.rules
  rules:
    {{- range $w := list "5m" "30m" "1h" "6h" }}
    # 1 - good/all rather than errors/all: with no 5xx at all there is no 5xx
    # series to divide, and the ratio would be missing instead of 0.
    - record: fibonacci_api:request_errors:ratio_rate{{ $w }}
      expr: |
        1 - (
          sum by (namespace, job) (rate(http_requests_total{{ printf "{%s, status!~\"5..\"}" $fib }}[{{ $w }}]))
          /
          sum by (namespace, job) (rate(http_requests_total{{ printf "{%s}" $fib }}[{{ $w }}]))
        )
    - record: fibonacci_api:request_slow:ratio_rate{{ $w }}
      expr: |
        1 - (
          sum by (namespace, job) (rate(http_request_duration_seconds_bucket{{ printf "{%s, le=\"%s\"}" $fib $slo.latencyThreshold }}[{{ $w }}]))
          /
          sum by (namespace, job) (rate(http_request_duration_seconds_count{{ printf "{%s}" $fib }}[{{ $w }}]))
        )
    {{- end }}
- name: fibonacci-api.alerts
  rules:
    {{- range $sli := list "availability" "latency" }}
    {{- $ratio := ternary "request_errors" "request_slow" (eq $sli "availability") }}
    {{- $target := ternary $slo.availabilityTarget $slo.latencyTarget (eq $sli "availability") }}
    {{- $name := ternary "FibonacciApiAvailabilityBurnRate" "FibonacciApiLatencyBurnRate" (eq $sli "availability") }}
    {{- $what := ternary "5xx responses" (printf "responses slower than %ss" $slo.latencyThreshold) (eq $sli "availability") }}
    {{- range $tier := list (dict "severity" "critical" "long" "1h" "short" "5m" "factor" "14.4" "for" "2m" "spent" "2%" "within" "1 hour")
                            (dict "severity" "warning" "long" "6h" "short" "30m" "factor" "6" "for" "15m" "spent" "5%" "within" "6 hours") }}
    - alert: {{ $name }}
      expr: |
        fibonacci_api:{{ $ratio }}:ratio_rate{{ $tier.long }}{{ printf "{%s}" $sel }} > ({{ $tier.factor }} * (1 - {{ $target }}))
        and
        fibonacci_api:{{ $ratio }}:ratio_rate{{ $tier.short }}{{ printf "{%s}" $sel }} > ({{ $tier.factor }} * (1 - {{ $target }}))
      for: {{ $tier.for }}
      labels:
        severity: {{ $tier.severity }}
        slo: {{ $sli }}
        {{- with $alertLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        summary: {{ printf "%s SLO error budget burning %sx too fast" $sli $tier.factor | quote }}
        description: >-
          {{ `{{ $labels.job }}` }} in {{ `{{ $labels.namespace }}` }}: {{ `{{ $value | humanizePercentage }}` }}
          of GET /fibonacci requests over the last {{ $tier.long }} were {{ $what }},
          against an objective of {{ $target }}. At this rate {{ $tier.spent }} of the
          30-day error budget is gone within {{ $tier.within }}.
        runbook_url: {{ printf "%s#%s" $runbook (lower $name) }}
    {{- end }}
    {{- end }}
    {{- if include "fibonacci-api.redisConfigured" . }}
    - alert: FibonacciApiRedisDown
      expr: |
        count by (namespace, job) (redis_up{{ printf "{%s}" $sel }} == 0) > 0
      for: 5m
      labels:
        severity: warning
        {{- with $alertLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        summary: Pods cannot reach Redis
        description: >-
          {{ `{{ $value }}` }} pod(s) of {{ `{{ $labels.job }}` }} in {{ `{{ $labels.namespace }}` }}
          have not reached Redis for 5 minutes. Requests are still served (the
          cache tier is skipped and computed), but each pod now caches alone and
          rate limits are counted per pod instead of cluster-wide.
        runbook_url: {{ printf "%s#%s" $runbook "fibonacciapiredisdown" }}
    {{- end }}
    - alert: FibonacciApiRateLimitRejectionSpike
      expr: |
        sum by (namespace, job) (rate(rate_limit_rejections_total{{ printf "{%s}" $sel }}[10m]))
          > {{ .Values.prometheusRule.rateLimitRejectionSpike.perSecond }}
        and
        sum by (namespace, job) (rate(rate_limit_rejections_total{{ printf "{%s}" $sel }}[10m]))
          / sum by (namespace, job) (rate(http_requests_total{{ printf "{%s}" $fib }}[10m]))
          > {{ .Values.prometheusRule.rateLimitRejectionSpike.ratio }}
      for: 10m
      labels:
        severity: warning
        {{- with $alertLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        summary: Many requests are rejected by the rate limiter
        description: >-
          {{ `{{ $labels.job }}` }} in {{ `{{ $labels.namespace }}` }} rejected
          {{ `{{ $value | humanize }}` }} requests per second with 429 over the last
          10 minutes, more than {{ mulf .Values.prometheusRule.rateLimitRejectionSpike.ratio 100 }}%
          of all GET /fibonacci requests. Either a client is abusive, or every client
          is counted as one (TRUSTED_PROXIES does not match the load balancer).
        runbook_url: {{ printf "%s#%s" $runbook "fibonacciapiratelimitrejectionspike" }}
    - alert: FibonacciApiPodsNotReady
      # kube-state-metrics. The pod name pattern (<workload>-<hash>-<suffix>)
      # matches the API's pods but not the in-cluster Redis or the test pod.
      expr: |
        sum by (namespace) (kube_pod_status_ready{namespace="{{ .Release.Namespace }}", pod=~"{{ include "fibonacci-api.fullname" . }}-[a-z0-9]+-[a-z0-9]{5}", condition!="true"}) > 0
      for: {{ .Values.prometheusRule.podsNotReady.for }}
      labels:
        severity: warning
        {{- with $alertLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        summary: API pods are not ready
        description: >-
          {{ `{{ $value }}` }} pod(s) of {{ include "fibonacci-api.fullname" . }} in
          {{ `{{ $labels.namespace }}` }} have not been ready for {{ .Values.prometheusRule.podsNotReady.for }}:
          capacity is reduced, and a rollout may be stuck.
        runbook_url: {{ printf "%s#%s" $runbook "fibonacciapipodsnotready" }}
{{- end }}
