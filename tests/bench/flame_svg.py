"""Collapsed stacks (``py-spy record -f raw``: "a;b;c COUNT" lines) to a flame graph SVG.

py-spy writes SVGs itself; this renders the raw samples recorded from a
running agent (``py-spy record -p PID -f raw``) the same way for the
before/after pairs in bench-results/flame/::

    .venv/bin/python tests/bench/flame_svg.py in.txt out.svg "title"
"""

from __future__ import annotations

import html
import sys
import zlib
from pathlib import Path

WIDTH, ROW, FONT = 1200, 16, 11


def _tree(lines: list[str]) -> dict:
    root: dict = {"n": 0, "kids": {}}
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        node = root
        node["n"] += n
        for frame in stack.split(";"):
            node = node["kids"].setdefault(frame, {"n": 0, "kids": {}})
            node["n"] += n
    return root


def render(lines: list[str], title: str) -> str:
    root = _tree(lines)
    total = max(root["n"], 1)
    rects: list[str] = []
    depth_max = 0

    def walk(node: dict, name: str, x: float, depth: int) -> None:
        nonlocal depth_max
        w = node["n"] / total * WIDTH
        if w < 0.3:
            return
        depth_max = max(depth_max, depth)
        hue = zlib.crc32(name.split(" (")[0].encode()) % 60
        label = html.escape(name)
        pct = 100.0 * node["n"] / total
        text = html.escape(name[: int(w / 6.5)]) if w > 30 else ""
        rects.append(f'<g><title>{label} ({node["n"]} samples, {pct:.1f}%)</title>'
                     f'<rect x="{x:.1f}" y="{{Y{depth}}}" width="{w:.1f}" height="{ROW - 1}" '
                     f'fill="hsl({hue + 10},80%,60%)"/>'
                     f'<text x="{x + 3:.1f}" y="{{T{depth}}}">{text}</text></g>')
        cx = x
        for kname, kid in sorted(node["kids"].items()):
            walk(kid, kname, cx, depth + 1)
            cx += kid["n"] / total * WIDTH

    x = 0.0
    for kname, kid in sorted(root["kids"].items()):
        walk(kid, kname, x, 0)
        x += kid["n"] / total * WIDTH
    height = (depth_max + 3) * ROW
    body = "\n".join(rects)
    for d in range(depth_max + 1):
        y = height - (d + 1) * ROW
        body = body.replace(f"{{Y{d}}}", str(y)).replace(f"{{T{d}}}", str(y + ROW - 4))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
            f'font-family="monospace" font-size="{FONT}">'
            f'<text x="4" y="{ROW}">{html.escape(title)} ({total} samples)</text>\n{body}\n</svg>\n')


if __name__ == "__main__":
    src, dst, title = sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else ""
    Path(dst).write_text(render(Path(src).read_text().splitlines(), title))
