{{/*
The Prometheus rule groups: SLO recording rules and alerts. Rendered into the
PrometheusRule and, for release "fibonacci-api" in namespace "fibonacci-api"
with Redis configured, into deploy/prometheus/alerts.yaml
(`scripts/check-deploy gen-alerts`; the check fails if the two differ).

SLOs, on GET /fibonacci only (probes and scrapes would dilute them):
- availability: availabilityTarget of requests are not 5xx;
- latency: latencyTarget of requests finish within latencyThreshold seconds.

Alerts are the SRE workbook's multiwindow, multi-burn-rate set (ch. 5, table 5-8)
for a 30-day budget, each tier its own rule with a `window` label:
  window 1h: 14.4x over 1 h and 5 min  -> page   (2% of the budget in an hour)
  window 6h:  6x   over 6 h and 30 min -> page   (5% in six hours)
  window 3d:  1x   over 3 d and 6 h    -> ticket (10% in three days)
The short window makes an alert stop soon after the burning does. The 6 h page
also needs the last 5 minutes to still burn budget (above 1x): its 30 min window
alone would keep paging for up to 30 minutes after a recovery.

The error ratios count 5xx (with a zero fallback), never 1 - non-5xx/all: with
only 5xx answers there is no non-5xx series and that ratio would be empty, so a
total outage would page no one. "fibonacci-api.sli.*" below is the one
definition of each SLI; scripts/check-deploy checks that the dashboard and the
canary analysis use the same expressions.
*/}}

{{/* Error ratio of the selected requests over a window.
     dict "sel" matchers "by" grouping-labels "window" range */}}
{{- define "fibonacci-api.sli.errorRatio" -}}
{{- $agg := ternary "sum" (printf "sum by (%s)" .by) (eq .by "") -}}
(
  {{ $agg }} (rate(http_requests_total{{ printf "{%s, status=~\"5..\"}" .sel }}[{{ .window }}]))
  or
  0 * {{ $agg }} (rate(http_requests_total{{ printf "{%s}" .sel }}[{{ .window }}]))
)
/
{{ $agg }} (rate(http_requests_total{{ printf "{%s}" .sel }}[{{ .window }}]))
{{- end }}

{{/* The latency SLO threshold as an `le` matcher that matches both renderings of
     a bucket boundary: the exporter writes le="1", Prometheus 3 stores le="1.0".
     A raw (backtick) string, so the regex needs no PromQL escaping. */}}
{{- define "fibonacci-api.sli.leMatcher" -}}
{{- printf "le=~`%s(\\.0)?`" (regexQuoteMeta (toString .)) -}}
{{- end }}

{{/* Share of the selected requests slower than the threshold, over a window.
     dict "sel" matchers "by" grouping-labels "window" range "threshold" seconds */}}
{{- define "fibonacci-api.sli.slowRatio" -}}
{{- $agg := ternary "sum" (printf "sum by (%s)" .by) (eq .by "") -}}
1 - (
  (
    {{ $agg }} (rate(http_request_duration_seconds_bucket{{ printf "{%s, %s}" .sel (include "fibonacci-api.sli.leMatcher" .threshold) }}[{{ .window }}]))
    or
    0 * {{ $agg }} (rate(http_request_duration_seconds_count{{ printf "{%s}" .sel }}[{{ .window }}]))
  )
  /
  {{ $agg }} (rate(http_request_duration_seconds_count{{ printf "{%s}" .sel }}[{{ .window }}]))
)
{{- end }}

{{- define "fibonacci-api.ruleGroups" -}}
{{- $sel := include "fibonacci-api.ruleSelector" . }}
{{- $fib := printf "%s, route=\"/fibonacci\"" $sel }}
{{- $slo := .Values.prometheusRule.slo }}
{{- $runbook := .Values.prometheusRule.runbookBaseUrl }}
{{- $labels := merge (dict "environment" .Values.prometheusRule.environment) .Values.prometheusRule.alertLabels }}
- name: fibonacci-api.slo.rules
  rules:
    {{- range $w := list "5m" "30m" "1h" "6h" "3d" }}
    - record: fibonacci_api:request_errors:ratio_rate{{ $w }}
      expr: |
        {{- include "fibonacci-api.sli.errorRatio" (dict "sel" $fib "by" "namespace, job" "window" $w) | nindent 8 }}
    - record: fibonacci_api:request_slow:ratio_rate{{ $w }}
      expr: |
        {{- include "fibonacci-api.sli.slowRatio" (dict "sel" $fib "by" "namespace, job" "window" $w "threshold" $slo.latencyThreshold) | nindent 8 }}
    {{- end }}
- name: fibonacci-api.alerts
  rules:
    - alert: FibonacciApiDown
      # No instance scraped successfully: every target down, or no target at all
      # (Deployment gone, Service selector broken, ServiceMonitor not picked up).
      expr: |
        max by (namespace, job) (up{{ printf "{%s}" $sel }}) == 0
        or
        absent(up{{ printf "{%s}" $sel }})
      for: 5m
      labels:
        severity: critical
        {{- toYaml $labels | nindent 8 }}
      annotations:
        summary: No instance of the API is scraped
        description: >-
          Prometheus has not scraped any instance of {{ include "fibonacci-api.fullname" . }} in
          {{ .Release.Namespace }} successfully for 5 minutes: the service is down, or
          unreachable for monitoring, and no other alert about it can fire.
        runbook_url: {{ printf "%s#%s" $runbook "fibonacciapidown" }}
    {{- range $sli := list "availability" "latency" }}
    {{- $ratio := ternary "request_errors" "request_slow" (eq $sli "availability") }}
    {{- $target := ternary $slo.availabilityTarget $slo.latencyTarget (eq $sli "availability") }}
    {{- $name := ternary "FibonacciApiAvailabilityBurnRate" "FibonacciApiLatencyBurnRate" (eq $sli "availability") }}
    {{- $what := ternary "5xx responses" (printf "responses slower than %ss" (toString $slo.latencyThreshold)) (eq $sli "availability") }}
    {{- range $tier := list (dict "severity" "critical" "long" "1h" "short" "5m" "factor" "14.4" "for" "2m" "spent" "2%" "within" "1 hour" "action" "page")
                            (dict "severity" "critical" "long" "6h" "short" "30m" "factor" "6" "for" "5m" "spent" "5%" "within" "6 hours" "action" "page" "guard" "5m")
                            (dict "severity" "warning" "long" "3d" "short" "6h" "factor" "1" "for" "30m" "spent" "10%" "within" "3 days" "action" "ticket") }}
    - alert: {{ $name }}
      expr: |
        fibonacci_api:{{ $ratio }}:ratio_rate{{ $tier.long }}{{ printf "{%s}" $sel }} > ({{ $tier.factor }} * (1 - {{ $target }}))
        and
        fibonacci_api:{{ $ratio }}:ratio_rate{{ $tier.short }}{{ printf "{%s}" $sel }} > ({{ $tier.factor }} * (1 - {{ $target }}))
        {{- with $tier.guard }}
        and
        fibonacci_api:{{ $ratio }}:ratio_rate{{ . }}{{ printf "{%s}" $sel }} > (1 - {{ $target }})
        {{- end }}
      for: {{ $tier.for }}
      labels:
        severity: {{ $tier.severity }}
        slo: {{ $sli }}
        window: {{ $tier.long }}
        {{- toYaml $labels | nindent 8 }}
      annotations:
        summary: {{ printf "%s SLO error budget burning %sx too fast (%s)" $sli $tier.factor $tier.action | quote }}
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
        {{- toYaml $labels | nindent 8 }}
      annotations:
        summary: Pods cannot reach Redis
        description: >-
          {{ `{{ $value }}` }} pod(s) of {{ `{{ $labels.job }}` }} in {{ `{{ $labels.namespace }}` }}
          have not reached Redis for 5 minutes. Requests are still served (the
          cache tier is skipped and computed), but each pod now caches alone and
          rate limits are counted per pod instead of cluster-wide.
        runbook_url: {{ printf "%s#%s" $runbook "fibonacciapiredisdown" }}
    - alert: FibonacciApiRedisInvalidValues
      # A value in Redis failed verification against this process's check: only
      # this release writes those keys, so someone else writes to this Redis
      # (a shared instance, another release, a person), or it corrupts data.
      expr: |
        sum by (namespace, job) (increase(fibonacci_cache_requests_total{{ printf "{%s, tier=\"redis\", result=\"invalid\"}" $sel }}[15m])) > 0
      labels:
        severity: warning
        {{- toYaml $labels | nindent 8 }}
      annotations:
        summary: Redis returned values that fail verification
        description: >-
          {{ `{{ $value | humanize }}` }} values read from Redis by {{ `{{ $labels.job }}` }} in
          {{ `{{ $labels.namespace }}` }} over the last 15 minutes failed verification and were
          discarded (answers are still correct: they are computed instead). Something other
          than this release writes to its Redis keys.
        runbook_url: {{ printf "%s#%s" $runbook "fibonacciapiredisinvalidvalues" }}
    - alert: FibonacciApiRateLimitsNotShared
      # Limiter decisions made in a pod's own memory while Redis is configured. A Redis
      # that cannot be reached does this (FibonacciApiRedisDown too, which inhibits this
      # one in deploy/alertmanager); so does one that answers but refuses the limiter's
      # script, where redis_up stays 1: an ACL user without scripting (NOPERM), a Redis
      # at maxmemory with noeviction (OOM). A shard failing over again and again shows
      # here too. Without this rule those paged no one.
      expr: |
        sum by (namespace, job) (rate(rate_limit_local_decisions_total{{ printf "{%s}" $sel }}[5m])) > 0
      for: 10m
      labels:
        severity: warning
        {{- toYaml $labels | nindent 8 }}
      annotations:
        summary: Rate limits are counted per pod, not cluster-wide
        description: >-
          {{ `{{ $labels.job }}` }} in {{ `{{ $labels.namespace }}` }} has been deciding
          {{ `{{ $value | humanize }}` }} rate-limit checks per second in the pods' own memory
          instead of in Redis for 10 minutes: a client gets up to replicas × the limits.
          With FibonacciApiRedisDown firing, Redis is unreachable; without it, Redis answers
          but refuses the limiter's calls (the pods log event=redis_refused with the code).
        runbook_url: {{ printf "%s#%s" $runbook "fibonacciapiratelimitsnotshared" }}
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
        {{- toYaml $labels | nindent 8 }}
      annotations:
        summary: Many requests are rejected by the rate limiter
        description: >-
          {{ `{{ $labels.job }}` }} in {{ `{{ $labels.namespace }}` }} rejected
          {{ `{{ $value | humanize }}` }} requests per second with 429 over the last
          10 minutes, more than {{ mulf .Values.prometheusRule.rateLimitRejectionSpike.ratio 100 }}%
          of all GET /fibonacci requests. Either a client is abusive, or every client
          is counted as one (TRUSTED_PROXIES does not match the load balancer).
        runbook_url: {{ printf "%s#%s" $runbook "fibonacciapiratelimitrejectionspike" }}
    - alert: FibonacciApiConnectionsRefused
      # Pods already holding MAX_CONNECTIONS close new connections at accept: those
      # clients never become requests, so no SLO alert sees them. Only the
      # max_connections reason: per_address and rate refusals are the per-client
      # limits stopping abusive clients, which is their job. A healthy pod never
      # refuses at the cap, so any sustained refusal counts. The 5m window bridges
      # the gaps between refusals at each traffic peak. It stays true until 5
      # minutes after the last refusal, so with `for: 10m` the warning comes 10
      # minutes after refusals began if they went on, never pausing 5 minutes,
      # for at least 5 of them: a reconnect storm of a few minutes passes. A 10m
      # window would not let it: it stays non-zero for 10 minutes after the last
      # refusal, so a 2-minute burst would fire (alerts_test.yaml has both cases).
      expr: |
        sum by (namespace, job) (increase(http_connections_refused_total{{ printf "{%s, reason=\"max_connections\"}" $sel }}[5m])) > 0
      for: 10m
      labels:
        severity: warning
        {{- toYaml $labels | nindent 8 }}
      annotations:
        summary: Pods are full and refuse new connections
        description: >-
          {{ `{{ $labels.job }}` }} in {{ `{{ $labels.namespace }}` }} closed
          {{ `{{ $value | humanize }}` }} new connections unanswered over the last 5 minutes, and
          has been refusing them for 10 minutes, because pods already held MAX_CONNECTIONS
          ({{ int64 .Values.config.MAX_CONNECTIONS }} per pod). No request metric counts these
          clients. Every slot is taken: by real load (scale out, or raise MAX_CONNECTIONS
          with the memory limit) or by many addresses holding connections open (an attack).
        runbook_url: {{ printf "%s#%s" $runbook "fibonacciapiconnectionsrefused" }}
    - alert: FibonacciApiPodsNotReady
      # kube-state-metrics. The pod name pattern (<workload>-<hash>-<suffix>,
      # both in Kubernetes' vowel-free alphabet) matches the API's pods, not the
      # in-cluster Redis, the test pod or the load-test Job's pod
      # (<name>-loadtest-<suffix>). Finished pods (a Succeeded Job pod, an
      # evicted Failed one kept until garbage collection) never become ready:
      # they are not capacity to wait for.
      expr: |
        sum by (namespace) (
          kube_pod_status_ready{namespace="{{ .Release.Namespace }}", pod=~"{{ include "fibonacci-api.fullname" . }}-[bcdfghjklmnpqrstvwxz2456789]+-[bcdfghjklmnpqrstvwxz2456789]{5}", condition!="true"}
          unless on (namespace, pod)
          (kube_pod_status_phase{namespace="{{ .Release.Namespace }}", phase=~"Succeeded|Failed"} == 1)
        ) > 0
      for: {{ .Values.prometheusRule.podsNotReady.for }}
      labels:
        severity: warning
        {{- toYaml $labels | nindent 8 }}
      annotations:
        summary: API pods are not ready
        description: >-
          {{ `{{ $value }}` }} pod(s) of {{ include "fibonacci-api.fullname" . }} in
          {{ `{{ $labels.namespace }}` }} have not been ready for {{ .Values.prometheusRule.podsNotReady.for }}:
          capacity is reduced, and a rollout may be stuck.
        runbook_url: {{ printf "%s#%s" $runbook "fibonacciapipodsnotready" }}
{{- end }}
