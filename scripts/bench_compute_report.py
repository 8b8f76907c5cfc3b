"""Summarises scripts/bench-compute's rows ("n impl compute_ms decimal_ms"): the best per
n and implementation, a Markdown table (bench/compute.md) and a chart of the time
relative to GMP per n (bench/compute.svg)."""

import sys
from collections import defaultdict
from pathlib import Path

raw, out, date, machine, rounds = sys.argv[1:6]
best = defaultdict(lambda: [float("inf"), float("inf")])
for line in Path(raw).read_text().splitlines():
    n, impl, compute, decimal = line.split()
    b = best[(int(n), impl)]
    b[0], b[1] = min(b[0], float(compute)), min(b[1], float(decimal))

ns = sorted({n for n, _ in best})


def us(ms: float) -> str:
    """Milliseconds as microseconds, one decimal below 100 µs."""
    return f"{ms * 1000:,.1f}" if ms < 0.1 else f"{ms * 1000:,.0f}"


lines = [
    f"Measured {date} on {machine}: best of 10 runs per round, {rounds} alternating rust/gmp rounds (`scripts/bench-compute {rounds}`).",
    "",
    "| n | digits | service compute µs | gmp compute µs | ratio | service to-decimal µs | gmp to-decimal µs | ratio | total ratio |",
    "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
]
bars = []
for n in ns:
    (rc, rd), (gc, gd) = best[(n, "rust")], best[(n, "gmp")]
    digits = round(
        n * 0.20898764
    )  # log10 of the golden ratio: F(n) has ~0.209 n digits
    lines.append(
        f"| {n:,} | ~{digits:,} | {us(rc)} | {us(gc)} | {rc / gc:.2f} | {us(rd)} | {us(gd)} | {rd / gd:.2f} | {(rc + rd) / (gc + gd):.2f} |"
    )
    bars.append((n, rc / gc, rd / gd, (rc, gc), (rd, gd)))
Path(f"{out}/compute.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))

# Grouped horizontal bars per n: time relative to GMP (1.0 = as fast as GMP).
width, bar_h, left, right = 820, 16, 110, 330
height = 80 + len(bars) * (2 * bar_h + 18)
top = max(max(b[1], b[2]) for b in bars) * 1.05
scale = (width - left - right) / top
svg = [
    f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
    '<rect width="100%" height="100%" fill="white"/>',
    f'<text x="10" y="20" font-size="14" font-weight="bold">F(n): this service\'s time ÷ GMP\'s ({date}; shorter is faster, 1.0 = as fast as GMP)</text>',
    f'<text x="10" y="38" fill="#555">{machine}</text>',
]
one = left + scale
svg.append(
    f'<line x1="{one:.1f}" y1="46" x2="{one:.1f}" y2="{height - 10}" stroke="#c00" stroke-dasharray="4 3"/>'
)
svg.append(f'<text x="{one + 3:.1f}" y="58" fill="#c00">GMP</text>')
for i, (n, compute, decimal, c_us, d_us) in enumerate(bars):
    y = 66 + i * (2 * bar_h + 18)
    svg.append(f'<text x="10" y="{y + bar_h + 4}">n = {n:,}</text>')
    for j, (name, ratio, ms, colour) in enumerate(
        (
            ("compute", compute, c_us, "#2f6fde"),
            ("to decimal", decimal, d_us, "#e08a1e"),
        )
    ):
        yy = y + j * bar_h
        w = ratio * scale
        svg.append(
            f'<rect x="{left}" y="{yy}" width="{w:.1f}" height="{bar_h - 2}" fill="{colour}"/>'
        )
        mine, gmp = ms
        svg.append(
            f'<text x="{left + w + 6:.1f}" y="{yy + 12}">{name} {ratio:.2f}× '
            f"({us(mine)} µs vs GMP {us(gmp)} µs)</text>"
        )
svg.append("</svg>")
Path(f"{out}/compute.svg").write_text("\n".join(svg) + "\n")
