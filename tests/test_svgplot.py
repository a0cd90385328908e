"""latentae.svgplot: ticks, scales, and that figures are well-formed SVG with the marks asked for."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pytest

from latentae.svgplot import Figure, Scale, box_stats, color, log2_ticks, log_ticks, nice_ticks, tick_label

NS = "{http://www.w3.org/2000/svg}"


def test_ticks():
    assert nice_ticks(0.0, 1.0) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert nice_ticks(7.3, 14.1) == pytest.approx([8, 10, 12, 14])
    assert nice_ticks(-0.11, 0.055) == pytest.approx([-0.1, -0.05, 0, 0.05])
    assert log_ticks(0.04, 30) == pytest.approx([0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20])
    assert log_ticks(1e-4, 1e3) == pytest.approx([1e-4, 1e-3, 1e-2, 0.1, 1, 10, 100, 1000])  # many decades: powers only
    assert log2_ticks(0.7, 17) == [1, 2, 4, 8, 16]
    assert [tick_label(v, [0, 0.25, 0.5]) for v in (0, 0.25, 0.5)] == ["0", "0.25", "0.50"]
    assert tick_label(0.5, [], log=True) == "0.5" and tick_label(16.0, [], log=True) == "16"


def test_box_stats_are_tukeys():
    q1, med, q3, lo, hi, mean = box_stats([1, 2, 3, 4, 100, math.nan])
    assert (q1, med, q3) == (2, 3, 4) and mean == 22
    assert (lo, hi) == (1, 4)  # 100 is beyond q3 + 1.5 IQR = 7: the whisker stops at 4
    assert box_stats([math.nan]) is None


def test_scales_map_data_to_pixels():
    s = Scale(0, 10, 100, 200)
    assert s(0) == 100 and s(5) == 150 and s(10) == 200
    lg = Scale(1, 100, 300, 100, log=True)  # y axes run upwards
    assert lg(1) == 300 and lg(10) == pytest.approx(200) and lg(100) == pytest.approx(100)


def _parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)  # must be well-formed XML
    assert root.tag == NS + "svg"
    return root


def test_scatter_errorbars_labels_and_escaping():
    fig = Figure(title="PSNR <vs> rate & more", xlabel="bpp", ylabel="PSNR", xlog=2, fig_id="rd")
    for i, (x, y, name) in enumerate([(1.0, 27.0, "sd<1>"), (4.0, 31.5, "flux & co")]):
        fig.errorbar(x, y, color=color(i), yerr=(y - 0.5, y + 0.5))
        fig.scatter([x], [y], color=color(i), labels=[name], titles=[f"{name}: {y}"])
    fig.scatter([math.nan, math.inf], [1.0, 2.0], color="#000")  # non-finite points are dropped
    svg = fig.render()
    root = _parse(svg)
    assert root.get("id") == "rd" and root.get("class") == "plot"
    circles = root.findall(f".//{NS}circle")
    assert [c.get("fill") for c in circles] == [color(0), color(1)]
    texts = [t.text for t in root.iter(NS + "text")]
    assert "sd<1>" in texts and "flux & co" in texts and "PSNR <vs> rate & more" in texts
    assert {"1", "2", "4"} <= set(texts)  # log2 rate axis
    assert [t.text for t in root.iter(NS + "title")] == ["sd<1>: 27.0", "flux & co: 31.5"]
    # The higher point is drawn higher (smaller y), the larger rate further right.
    (a, b) = [(float(c.get("cx")), float(c.get("cy"))) for c in circles]
    assert b[0] > a[0] and b[1] < a[1]


def test_lines_boxes_strips_and_legend():
    fig = Figure(title="spectrum", ylog=True, legend=True, xlim=(0, 1.45), fig_id="spec")
    fig.line([0.1, 0.2, 0.3, 0.4], [10, math.nan, 1, 0.1], color=color(0), label="a")  # NaN skipped
    fig.line([0.1, 0.4], [1, 1], color="#999", dash="5 4", label="ref")
    fig.vspan(0.5, 1.45)
    root = _parse(fig.render())
    lines = root.findall(f".//{NS}polyline")
    assert len(lines) == 2 and len(lines[0].get("points").split()) == 3
    assert lines[1].get("stroke-dasharray") == "5 4"
    assert [t.text for t in root.iter(NS + "text") if t.text in ("a", "ref")] == ["a", "ref"]

    cats = Figure(title="dist", xcategories=["x", "y"], fig_id="d")
    cats.box(0, [1, 2, 3, 4, 100], color=color(0))
    cats.strip(0, [1, 2, 3, 4, 100], color=color(0), titles=list("abcde"))
    cats.strip(1, list(range(5000)), color=color(1), max_points=200)
    root = _parse(cats.render())
    assert len(root.findall(f".//{NS}g[@class='box']")) == 1
    assert len(root.findall(f".//{NS}circle")) == 5 + 200
    assert {t.text for t in root.iter(NS + "text")} >= {"x", "y", "dist"}


def test_empty_and_degenerate_figures_render():
    _parse(Figure(title="nothing").render())
    one = Figure(title="one point")
    one.scatter([3.0], [3.0], color=color(0))
    _parse(one.render())
