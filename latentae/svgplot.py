"""A small SVG plotting module: scatter with error bars, lines, box + strip plots.

Self-contained pages cannot fetch a plotting library, and a comparison report needs only
a few plot types, so we draw them ourselves as plain ``<svg>`` markup (no JS, no fonts,
no network). One ``Figure`` is one plot: marks are added in data coordinates, the axes
are fitted to them (or to given limits), and ``render()`` returns the SVG string.

    fig = Figure(title="Rate-distortion", xlabel="bpp", ylabel="PSNR dB", xlog=True)
    fig.errorbar(1.0, 27.1, yerr=(26.8, 27.4), color=color(0))
    fig.scatter([1.0], [27.1], color=color(0), labels=["sd"])
    svg = fig.render()

Categorical plots put category ``i`` at x = i (``xcategories=[...]`` names them). Points
can carry hover tooltips (``titles``: an SVG ``<title>``, shown natively by browsers).
Output is deterministic (jitter is a fixed low-discrepancy sequence), so reports diff.
"""

from __future__ import annotations

import html
import math
from typing import Sequence

import numpy as np

# Okabe & Ito's colour-blind-safe palette (yellow left out: unreadable on white), then greys.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#7F7F7F")
FONT = "system-ui,-apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif"
TEXT = "#222"
GRID = "#e6e6e6"
AXIS = "#888"


def color(i: int) -> str:
    """The i-th series colour (cycles)."""
    return PALETTE[i % len(PALETTE)]


def _esc(s: str) -> str:
    return html.escape(str(s), quote=True)


def _num(v: float) -> str:
    return f"{v:.2f}".rstrip("0").rstrip(".") if math.isfinite(v) else "0"


def text_width(s: str, size: float) -> float:
    """Rough rendered width of ``s`` at font ``size`` (layout only; no font metrics here)."""
    return 0.58 * size * len(s)


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k steps) inside [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    raw = (hi - lo) / max(1, target)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, v = [], first
    while v <= hi + 1e-9 * step:
        ticks.append(0.0 if abs(v) < step * 1e-9 else v)
        v += step
    return ticks


def log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks per decade inside [lo, hi] (only powers of ten over many decades)."""
    if lo <= 0 or hi <= lo:
        return []
    e0, e1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    decades = math.log10(hi / lo)
    mults = (1,) if decades > 3 else (1, 2, 5) if decades > 0.7 else (1, 1.5, 2, 3, 4, 5, 6, 7, 8, 9)
    out = [m * 10.0**e for e in range(e0, e1 + 1) for m in mults]
    return [v for v in out if lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9)]


def log2_ticks(lo: float, hi: float) -> list[float]:
    """Powers of two inside [lo, hi] (rates: each tick doubles), or 1-2-5 ticks if fewer than 2 fit."""
    if lo <= 0 or hi <= lo:
        return []
    out = [2.0**e for e in range(math.floor(math.log2(lo)), math.ceil(math.log2(hi)) + 1)]
    out = [v for v in out if lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9)]
    return out if len(out) >= 2 else log_ticks(lo, hi)


def tick_label(v: float, ticks: Sequence[float], log: bool = False) -> str:
    """Enough decimals to tell neighbouring ticks apart, no more (log axes: shortest form)."""
    if log:
        return f"{v:g}"
    if v == 0:
        return "0"
    if abs(v) >= 1e5 or abs(v) < 1e-3:
        return f"{v:.0e}".replace("e+0", "e").replace("e-0", "e-")
    diffs = [abs(b - a) for a, b in zip(ticks, ticks[1:]) if b != a]
    step = min(diffs) if diffs else abs(v)
    dec = max(0, -math.floor(math.log10(step) + 1e-9))
    if any(abs(t * 10**dec - round(t * 10**dec)) > 1e-6 for t in ticks):
        dec += 1
    return f"{v:.{dec}f}"


class Scale:
    """Data -> pixel map of one axis: linear, or logarithmic (``log`` = 10 or True: 1-2-5
    ticks per decade; ``log`` = 2: ticks at powers of two)."""

    def __init__(self, lo: float, hi: float, p0: float, p1: float, log: bool | int = False):
        self.lo, self.hi, self.p0, self.p1, self.log = lo, hi, p0, p1, log

    def _t(self, v: float) -> float:
        return math.log10(v) if self.log else v

    def __call__(self, v: float) -> float:
        a, b = self._t(self.lo), self._t(self.hi)
        if self.log and v <= 0:
            v = self.lo
        return self.p0 + (self._t(v) - a) / (b - a) * (self.p1 - self.p0)

    def ticks(self) -> list[float]:
        if not self.log:
            return nice_ticks(self.lo, self.hi)
        return log2_ticks(self.lo, self.hi) if self.log == 2 else log_ticks(self.lo, self.hi)

    def label(self, v: float, ticks: Sequence[float]) -> str:
        return tick_label(v, ticks, bool(self.log))


def _limits(values: list[float], log: bool, pad: float = 0.06) -> tuple[float, float]:
    v = [x for x in values if x is not None and math.isfinite(x) and (x > 0 or not log)]
    if not v:
        return (0.1, 10.0) if log else (0.0, 1.0)
    lo, hi = min(v), max(v)
    if log:
        a, b = math.log10(lo), math.log10(hi)
        if b - a < 1e-9:
            a, b = a - 0.3, b + 0.3
        d = (b - a) * pad
        return 10 ** (a - d), 10 ** (b + d)
    if hi - lo < 1e-12:
        d = abs(lo) * 0.05 or 0.5
        return lo - d, hi + d
    d = (hi - lo) * pad
    return lo - d, hi + d


class Figure:
    """One plot. Add marks in data coordinates, then ``render()`` the ``<svg>``."""

    def __init__(
        self,
        *,
        title: str = "",
        xlabel: str = "",
        ylabel: str = "",
        width: int = 440,
        height: int = 300,
        xlog: bool | int = False,
        ylog: bool | int = False,
        xlim: tuple[float, float] | None = None,
        ylim: tuple[float, float] | None = None,
        xcategories: Sequence[str] | None = None,
        legend: bool = False,
        fig_id: str | None = None,
        note: str = "",
    ):
        self.title, self.xlabel, self.ylabel, self.note = title, xlabel, ylabel, note
        # Never narrower than the title needs.
        self.width, self.height = max(width, round(text_width(title, 13) + 24)), height
        self.xlog, self.ylog = (False if xcategories else xlog), ylog
        self.xlim, self.ylim = xlim, ylim
        self.xcategories = list(xcategories) if xcategories else None
        self.legend = legend
        self.fig_id = fig_id
        self._marks: list[tuple] = []
        self._xs: list[float] = []
        self._ys: list[float] = []
        self._legend: list[tuple[str, str, str]] = []  # (label, colour, kind: "point", "line" or a dash pattern)

    # -- marks (data coordinates)

    def _extent(self, xs, ys):
        self._xs.extend(float(x) for x in xs if x is not None)
        self._ys.extend(float(y) for y in ys if y is not None)

    def _key(self, label, colour, kind):
        if label and all(label != k[0] for k in self._legend):
            self._legend.append((label, colour, kind))

    def line(self, xs, ys, *, color: str, width: float = 2.0, dash: str | None = None, label: str | None = None):
        """A polyline through the finite points (non-finite ones are skipped, not gaps)."""
        pts = [(float(x), float(y)) for x, y in zip(xs, ys) if _finite(x) and _finite(y) and (y > 0 or not self.ylog)]
        if len(pts) < 1:
            return
        self._extent([p[0] for p in pts], [p[1] for p in pts])
        self._marks.append(("line", pts, color, width, dash))
        self._key(label, color, dash or "line")

    def scatter(self, xs, ys, *, color: str, r: float = 4.5, label: str | None = None, labels: Sequence[str] | None = None,
                titles: Sequence[str] | None = None, opacity: float = 1.0, hollow: bool = False):
        """Points; ``labels`` are written next to the points, ``titles`` are hover tooltips."""
        pts = [(i, float(x), float(y)) for i, (x, y) in enumerate(zip(xs, ys)) if _finite(x) and _finite(y)]
        self._extent([p[1] for p in pts], [p[2] for p in pts])
        for i, x, y in pts:
            self._marks.append(("point", x, y, color, r, opacity, hollow,
                                labels[i] if labels else None, titles[i] if titles else None))
        self._key(label, color, "point")

    def errorbar(self, x: float, y: float, *, color: str, xerr: tuple | None = None, yerr: tuple | None = None):
        """Interval whiskers (absolute ends, e.g. a 95% interval) around (x, y)."""
        if not (_finite(x) and _finite(y)):
            return
        if yerr is not None and _finite(yerr[0]) and _finite(yerr[1]):
            self._extent([x, x], list(yerr))
            self._marks.append(("vbar", x, yerr[0], yerr[1], color))
        if xerr is not None and _finite(xerr[0]) and _finite(xerr[1]) and xerr[1] > xerr[0]:
            self._extent(list(xerr), [y, y])
            self._marks.append(("hbar", y, xerr[0], xerr[1], color))

    def box(self, i: float, values: Sequence[float], *, color: str, width: float = 0.5):
        """Tukey box at category ``i``: quartiles, median, whiskers to the furthest point
        within 1.5 IQR, and the mean as a diamond."""
        st = box_stats(values)
        if st is None:
            return
        self._extent([i - width / 2, i + width / 2], [st[3], st[4]])
        self._marks.append(("box", float(i), *st, color, width))

    def strip(self, i: float, values: Sequence[float], *, color: str, titles: Sequence[str] | None = None,
              width: float = 0.6, max_points: int = 800, r: float = 2.6):
        """Every value as a jittered point at category ``i`` (evenly thinned beyond ``max_points``)."""
        idx = [k for k, x in enumerate(values) if _finite(x)]
        if len(idx) > max_points:
            idx = [idx[round(j * (len(idx) - 1) / (max_points - 1))] for j in range(max_points)]
        xs = [i + ((k * 0.6180339887) % 1.0 - 0.5) * width for k in range(len(idx))]
        ys = [values[k] for k in idx]
        tt = [titles[k] for k in idx] if titles else None
        self.scatter(xs, ys, color=color, r=r, titles=tt, opacity=0.55)

    def hline(self, y: float, *, color: str = AXIS, dash: str | None = "4 3", width: float = 1.0, label: str | None = None):
        self._ys.append(float(y))
        self._marks.append(("hline", float(y), color, dash, width))
        self._key(label, color, dash or "line")

    def vline(self, x: float, *, color: str = AXIS, dash: str | None = "4 3", width: float = 1.0, text: str = ""):
        self._xs.append(float(x))
        self._marks.append(("vline", float(x), color, dash, width, text))

    def vspan(self, x0: float, x1: float, *, fill: str = "#f3f3f6"):
        self._marks.insert(0, ("vspan", float(x0), float(x1), fill))

    # -- rendering

    def _scales(self) -> tuple[Scale, Scale, float, float, float, float]:
        left = 14 + (16 if self.ylabel else 0)
        top = 24 if self.title else 10
        bottom = 30 + (16 if self.xlabel else 0) + (14 if self.note else 0)
        legend_w = 0.0
        if self.legend and self._legend:
            legend_w = 30 + max(text_width(k[0], 11) for k in self._legend)
        if self.xcategories:
            xlo, xhi = -0.6, len(self.xcategories) - 0.4
        else:
            xlo, xhi = self.xlim or _limits(self._xs, self.xlog)
        ylo, yhi = self.ylim or _limits(self._ys, self.ylog)
        ys = Scale(ylo, yhi, 0, 1, self.ylog)
        labels = [ys.label(t, ys.ticks()) for t in ys.ticks()]
        left += max([text_width(s, 11) for s in labels] + [10]) + 6
        x0, x1 = left, self.width - 14 - legend_w
        y0, y1 = self.height - bottom, top
        return Scale(xlo, xhi, x0, x1, self.xlog), Scale(ylo, yhi, y0, y1, self.ylog), x0, x1, y0, y1

    def render(self) -> str:
        sx, sy, x0, x1, y0, y1 = self._scales()
        cid = f"clip-{self.fig_id or 'plot'}"  # give each figure of a page its own fig_id
        o: list[str] = []
        attrs = f' id="{_esc(self.fig_id)}"' if self.fig_id else ""
        o.append(
            f'<svg xmlns="http://www.w3.org/2000/svg" class="plot"{attrs} width="{self.width}" height="{self.height}" '
            f'viewBox="0 0 {self.width} {self.height}" role="img" aria-label="{_esc(self.title)}" '
            f'font-family="{FONT}" font-size="11" fill="{TEXT}">'
        )
        o.append(f'<rect x="0" y="0" width="{self.width}" height="{self.height}" fill="#fff"/>')
        o.append(f'<defs><clipPath id="{_esc(cid)}"><rect x="{_num(x0)}" y="{_num(y1)}" width="{_num(x1 - x0)}" '
                 f'height="{_num(y0 - y1)}"/></clipPath></defs>')
        if self.title:
            o.append(f'<text x="{_num(self.width / 2)}" y="15" text-anchor="middle" font-size="13" font-weight="600">{_esc(self.title)}</text>')
        # grid + ticks
        yt = sy.ticks()
        for t in yt:
            p = sy(t)
            o.append(f'<line x1="{_num(x0)}" x2="{_num(x1)}" y1="{_num(p)}" y2="{_num(p)}" stroke="{GRID}"/>')
            o.append(f'<text x="{_num(x0 - 5)}" y="{_num(p + 3.5)}" text-anchor="end">{_esc(sy.label(t, yt))}</text>')
        if self.xcategories:
            for i, name in enumerate(self.xcategories):
                p = sx(i)
                o.append(f'<text x="{_num(p)}" y="{_num(y0 + 15)}" text-anchor="middle">{_esc(name)}</text>')
        else:
            xt = sx.ticks()
            for t in xt:
                p = sx(t)
                o.append(f'<line x1="{_num(p)}" x2="{_num(p)}" y1="{_num(y0)}" y2="{_num(y1)}" stroke="{GRID}"/>')
                o.append(f'<text x="{_num(p)}" y="{_num(y0 + 15)}" text-anchor="middle">{_esc(sx.label(t, xt))}</text>')
        o.append(f'<g clip-path="url(#{_esc(cid)})">')
        for m in self._marks:
            o.append(self._mark(m, sx, sy, x0, x1, y0, y1))
        o.append("</g>")
        o.append(f'<rect x="{_num(x0)}" y="{_num(y1)}" width="{_num(x1 - x0)}" height="{_num(y0 - y1)}" fill="none" stroke="{AXIS}"/>')
        # point labels are drawn unclipped, on top
        for m in self._marks:
            if m[0] == "point" and m[7]:
                _, x, y, c, r = m[:5]
                px, py = sx(x), sy(y)
                anchor, dx = ("end", -r - 3) if px > (x0 + x1) / 2 else ("start", r + 3)
                o.append(f'<text x="{_num(px + dx)}" y="{_num(py - 4)}" text-anchor="{anchor}" font-weight="600" '
                         f'fill="{c}" stroke="#fff" stroke-width="3" paint-order="stroke">{_esc(m[7])}</text>')
        if self.xlabel:
            o.append(f'<text x="{_num((x0 + x1) / 2)}" y="{_num(y0 + 31)}" text-anchor="middle" font-size="12">{_esc(self.xlabel)}</text>')
        if self.ylabel:
            cy = (y0 + y1) / 2
            o.append(f'<text x="13" y="{_num(cy)}" text-anchor="middle" font-size="12" transform="rotate(-90 13 {_num(cy)})">{_esc(self.ylabel)}</text>')
        if self.note:
            o.append(f'<text x="{_num(x0)}" y="{self.height - 4}" font-size="10" fill="#666">{_esc(self.note)}</text>')
        if self.legend and self._legend:
            lx, ly = x1 + 12, y1 + 4
            for k, (label, c, kind) in enumerate(self._legend):
                yy = ly + 16 * k + 6
                if kind == "point":
                    o.append(f'<circle cx="{_num(lx + 8)}" cy="{_num(yy)}" r="4" fill="{c}"/>')
                else:
                    dash = f' stroke-dasharray="{kind}"' if kind != "line" else ""
                    o.append(f'<line x1="{_num(lx)}" x2="{_num(lx + 18)}" y1="{_num(yy)}" y2="{_num(yy)}" stroke="{c}" stroke-width="2"{dash}/>')
                o.append(f'<text x="{_num(lx + 24)}" y="{_num(yy + 4)}">{_esc(label)}</text>')
        o.append("</svg>")
        return "".join(o)

    def _mark(self, m: tuple, sx: Scale, sy: Scale, x0, x1, y0, y1) -> str:
        kind = m[0]
        if kind == "line":
            _, pts, c, w, dash = m
            d = " ".join(f"{_num(sx(x))},{_num(sy(y))}" for x, y in pts)
            da = f' stroke-dasharray="{dash}"' if dash else ""
            return f'<polyline class="series" points="{d}" fill="none" stroke="{c}" stroke-width="{w}"{da} stroke-linejoin="round"/>'
        if kind == "point":
            _, x, y, c, r, op, hollow, _, title = m
            fill = f'fill="#fff" stroke="{c}" stroke-width="1.5"' if hollow else f'fill="{c}"'
            opa = f' fill-opacity="{op}"' if op < 1 else ""
            t = f"<title>{_esc(title)}</title>" if title else ""
            return f'<circle cx="{_num(sx(x))}" cy="{_num(sy(y))}" r="{r}" {fill}{opa}>{t}</circle>'
        if kind == "vbar":
            _, x, a, b, c = m
            px, pa, pb = sx(x), sy(a), sy(b)
            return (f'<path d="M{_num(px)},{_num(pa)}V{_num(pb)}M{_num(px - 5)},{_num(pa)}H{_num(px + 5)}'
                    f'M{_num(px - 5)},{_num(pb)}H{_num(px + 5)}" stroke="{c}" stroke-width="1.6" fill="none"/>')
        if kind == "hbar":
            _, y, a, b, c = m
            py, pa, pb = sy(y), sx(a), sx(b)
            return (f'<path d="M{_num(pa)},{_num(py)}H{_num(pb)}M{_num(pa)},{_num(py - 5)}V{_num(py + 5)}'
                    f'M{_num(pb)},{_num(py - 5)}V{_num(py + 5)}" stroke="{c}" stroke-width="1.6" fill="none"/>')
        if kind == "box":
            _, i, q1, med, q3, lo, hi, mean, c, w = m  # box_stats order
            a, b = sx(i - w / 2), sx(i + w / 2)
            px = sx(i)
            pm = sy(mean)
            return (
                f'<g class="box"><path d="M{_num(px)},{_num(sy(lo))}V{_num(sy(q1))}M{_num(px)},{_num(sy(q3))}V{_num(sy(hi))}'
                f'M{_num(px - (b - a) / 4)},{_num(sy(lo))}H{_num(px + (b - a) / 4)}M{_num(px - (b - a) / 4)},{_num(sy(hi))}'
                f'H{_num(px + (b - a) / 4)}" stroke="{c}" stroke-width="1.4" fill="none"/>'
                f'<rect x="{_num(a)}" y="{_num(sy(q3))}" width="{_num(b - a)}" height="{_num(max(0.5, sy(q1) - sy(q3)))}" '
                f'fill="{c}" fill-opacity="0.12" stroke="{c}" stroke-width="1.4"/>'
                f'<line x1="{_num(a)}" x2="{_num(b)}" y1="{_num(sy(med))}" y2="{_num(sy(med))}" stroke="{c}" stroke-width="2.5"/>'
                f'<path d="M{_num(px)},{_num(pm - 5)}L{_num(px + 5)},{_num(pm)}L{_num(px)},{_num(pm + 5)}L{_num(px - 5)},{_num(pm)}Z" '
                f'fill="#fff" stroke="{c}" stroke-width="1.5"><title>mean {mean:.4g}</title></path></g>'
            )
        if kind == "hline":
            _, y, c, dash, w = m
            da = f' stroke-dasharray="{dash}"' if dash else ""
            return f'<line x1="{_num(x0)}" x2="{_num(x1)}" y1="{_num(sy(y))}" y2="{_num(sy(y))}" stroke="{c}" stroke-width="{w}"{da}/>'
        if kind == "vline":
            _, x, c, dash, w, text = m
            da = f' stroke-dasharray="{dash}"' if dash else ""
            px = sx(x)
            t = f'<text x="{_num(px + 4)}" y="{_num(y1 + 12)}" font-size="10" fill="#555">{_esc(text)}</text>' if text else ""
            return f'<line x1="{_num(px)}" x2="{_num(px)}" y1="{_num(y0)}" y2="{_num(y1)}" stroke="{c}" stroke-width="{w}"{da}/>{t}'
        if kind == "vspan":
            _, a, b, fill = m
            return f'<rect x="{_num(sx(a))}" y="{_num(y1)}" width="{_num(max(0.0, sx(b) - sx(a)))}" height="{_num(y0 - y1)}" fill="{fill}"/>'
        raise ValueError(f"unknown mark {kind!r}")


def box_stats(values: Sequence[float]) -> tuple[float, float, float, float, float, float] | None:
    """Tukey's box of the finite values: (q1, median, q3, lower whisker, upper whisker, mean);
    whiskers end at the furthest value within 1.5 IQR of the box. None if no finite value."""
    v = np.asarray([x for x in values if _finite(x)], dtype=np.float64)
    if v.size == 0:
        return None
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    iqr = q3 - q1
    lo, hi = v[v >= q1 - 1.5 * iqr].min(), v[v <= q3 + 1.5 * iqr].max()
    return float(q1), float(med), float(q3), float(lo), float(hi), float(v.mean())


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float, np.floating, np.integer)) and math.isfinite(float(v))


__all__ = ["PALETTE", "Figure", "Scale", "box_stats", "color", "log2_ticks", "log_ticks", "nice_ticks", "text_width", "tick_label"]
