"""Summarises scripts/bench-load's raw rows: medians per scenario, ratios to the ceiling,
a Markdown table (bench/results.md) and a latency/throughput chart (bench/latency.svg)."""

import statistics
import sys
from collections import defaultdict

raw, out, date, machine, load = sys.argv[1:6]
# With scripts/bench-load --earlier, the name of the earlier build's binary.
earlier = sys.argv[6] if len(sys.argv) > 6 else ""
rows = defaultdict(list)
for line in open(raw):
    scenario, label, rps, p50, p99, p999, rss, errors, cpu = line.rstrip("\n").split("\t")
    rows[(scenario, label)].append(
        (float(rps), float(p50), float(p99), float(p999), int(rss) / 1024, int(errors), float(cpu))
    )

def median(key, i):
    return statistics.median(r[i] for r in rows[key])

ceiling_for = {"hot": ("hot", "ceiling"), "hot-wrk-t2": ("hot-wrk-t2", "ceiling"), "limiter": ("limiter", "ceiling"),
               "limiter-redis": ("limiter", "ceiling"), "limiter-redis-cluster": ("limiter", "ceiling"),
               "bad-input": ("hot", "ceiling"), "hot-access-logs": ("hot", "ceiling"),
               "uncached-n50k-100k": ("hot", "ceiling")}
lines = [
    f"Measured {date} on {machine}; load {load} on 127.0.0.1 (wrk shares the cores with the server).",
    "Medians of the rounds; ratios are against the ceiling run in the same rounds.",
    *([f"Server `earlier`: an earlier build ({earlier}), run in the same rounds as the service (before/after)."] if earlier else []),
    "",
    "| scenario | server | req/s | p50 µs | p99 µs | p99.9 µs | peak RSS MiB | CPU µs/req | req/s ÷ ceiling | p99 ÷ ceiling | CPU/req ÷ ceiling |",
    "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
]
order = ["hot", "hot-wrk-t2", "hot-access-logs", "limiter", "limiter-redis", "limiter-redis-cluster", "bad-input", "uncached-n50k-100k"]
bars = []
for scenario in order:
    for label in ("ceiling", "service", "earlier"):
        key = (scenario, label)
        if key not in rows:
            continue
        rps, p50, p99, p999, rss = (median(key, i) for i in range(5))
        cpu = median(key, 6)
        ceiling = ceiling_for[scenario]
        ratio = p99_ratio = cpu_ratio = ""
        if label != "ceiling" and ceiling in rows:
            ratio = f"{rps / median(ceiling, 0):.2f}"
            p99_ratio = f"{p99 / median(ceiling, 2):.2f}"
            cpu_ratio = f"{cpu / median(ceiling, 6):.2f}"
        lines.append(
            f"| {scenario} | {label} | {rps:,.0f} | {p50:.0f} | {p99:.0f} | {p999:.0f} | {rss:.1f} | {cpu:.1f} "
            f"| {ratio} | {p99_ratio} | {cpu_ratio} |"
        )
        bars.append((f"{scenario} ({label})", rps, p99))
for label in ("service", "earlier"):
    in_process = ("limiter", label)
    for scenario in ("limiter-redis", "limiter-redis-cluster"):
        if (scenario, label) in rows and in_process in rows:
            lines.append("")
            lines.append(
                f"{label.capitalize()} CPU per request, {scenario} ÷ limiter (in process): "
                f"{median((scenario, label), 6) / median(in_process, 6):.2f} "
                "(medians of the rounds; Redis's own CPU is not in it)"
            )
open(f"{out}/results.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))

# A horizontal bar chart: throughput bars (longer = more requests/s), the service's ratio to
# the ceiling of its scenario and p99 as labels. White background: docs pages may be dark.
bars_ratio = []
for name, rps, p99 in bars:
    scenario, label = name.rstrip(")").split(" (")
    ceiling = ceiling_for.get(scenario)
    ratio = rps / median(ceiling, 0) if label != "ceiling" and ceiling in rows else None
    bars_ratio.append((name, rps, p99, ratio))
width, bar_h, gap, left = 1060 if earlier else 820, 22, 8, 250
height = 96 + len(bars) * (bar_h + gap)
top = max(b[1] for b in bars) or 1
svg = [
    f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
    '<rect width="100%" height="100%" fill="white"/>',
    f'<text x="10" y="20" font-size="14" font-weight="bold">fibonacci-api load benchmark ({date}): requests/s per scenario (longer is better)</text>',
    f'<text x="10" y="38" fill="#555">{machine}; {load}; medians of the rounds</text>',
    '<rect x="10" y="48" width="14" height="10" fill="#9aa5b1"/><text x="30" y="57">ceiling (the same framework returning the bytes, nothing else)</text>',
    '<rect x="430" y="48" width="14" height="10" fill="#2f6fde"/><text x="450" y="57">the service (label: × the ceiling of its scenario, p99)</text>',
]
if earlier:
    svg.append(f'<rect x="800" y="48" width="14" height="10" fill="#a9c4f5"/><text x="820" y="57">earlier build ({earlier})</text>')
for i, (name, rps, p99, ratio) in enumerate(bars_ratio):
    y = 72 + i * (bar_h + gap)
    w = (width - left - 230) * rps / top
    colour = "#9aa5b1" if "(ceiling)" in name else "#a9c4f5" if "(earlier)" in name else "#2f6fde"
    share = f" · {ratio:.2f}× ceiling" if ratio is not None else ""
    svg.append(f'<text x="10" y="{y + 15}">{name}</text>')
    svg.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colour}"/>')
    svg.append(f'<text x="{left + w + 6:.1f}" y="{y + 15}">{rps:,.0f}/s{share} · p99 {p99:,.0f} µs</text>')
svg.append("</svg>")
open(f"{out}/latency.svg", "w").write("\n".join(svg) + "\n")
