"""The comparison report: one self-contained HTML page, plus the small images it embeds.

Nothing is fetched over the network when the page opens: every image is a base64 data
URI (thumbnails and error maps JPEG by default, zoomed crops and latents PNG), the plots
are inline SVG drawn in Python (``latentae.report_plots``), and the CSS / JS are inline.
The page carries the comparison as a JSON blob
(``<script type="application/json" id="report-data">``) and its script builds the
tables and the gallery from it; clicking a column header sorts the table (and the
per-image table's order drives the gallery's, so "sort by PSNR of vae B, ascending"
puts the worst reconstructions first).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# ----------------------------------------------------------------------------- images


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` in [-1, 1] -> ``[H, W, 3]`` uint8 (what a saved PNG holds)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 0).cpu().numpy()


def png_data_uri(arr: np.ndarray) -> str:
    """uint8 ``[H, W]`` or ``[H, W, 3]`` -> ``data:image/png;base64,...``."""
    return image_data_uri(arr, "png")


def image_data_uri(arr: np.ndarray, fmt: str = "png", quality: int = 90, chroma_subsampling: bool = False) -> str:
    """uint8 ``[H, W]`` or ``[H, W, 3]`` -> a ``data:image/...;base64`` URI.

    ``jpeg`` is saved without chroma subsampling (4:4:4) unless asked: a VAE's colour
    artefacts are what the page is for, and 4:2:0 would smear them (and add its own).
    ``webp`` lossy always subsamples chroma; ``png`` is lossless (a 256 px photo
    thumbnail ~150 kB vs ~30 kB as JPEG q90).
    """
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    if fmt == "png":
        img.save(buf, format="PNG", optimize=False, compress_level=6)
    elif fmt == "jpeg":
        img.save(buf, format="JPEG", quality=quality, subsampling=2 if chroma_subsampling else 0)
    elif fmt == "webp":
        img.save(buf, format="WEBP", quality=quality, method=4)
    else:
        raise ValueError(f"image format must be png, jpeg or webp, got {fmt!r}")
    return f"data:image/{fmt};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def thumbnail(arr: np.ndarray, max_side: int) -> np.ndarray:
    """Downscale (never upscale) so the longer side is at most ``max_side`` (Lanczos)."""
    h, w = arr.shape[:2]
    s = max_side / max(h, w)
    if s >= 1:
        return arr
    img = Image.fromarray(arr).resize((max(1, round(w * s)), max(1, round(h * s))), Image.LANCZOS)
    return np.asarray(img)


# Anchor colours of a perceptually ordered dark->bright map (black, purple, red, orange, pale yellow).
_HEAT = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64
)


def heatmap(err: np.ndarray, vmax: float) -> np.ndarray:
    """Non-negative ``[H, W]`` error -> ``[H, W, 3]`` uint8; 0 is black, >= ``vmax`` pale yellow."""
    t = np.clip(err / max(vmax, 1e-12), 0, 1) * (len(_HEAT) - 1)
    xs = np.arange(len(_HEAT))
    rgb = np.stack([np.interp(t, xs, _HEAT[:, c]) for c in range(3)], -1)
    return rgb.round().astype(np.uint8)


def latent_grid(z: torch.Tensor, max_channels: int = 16) -> np.ndarray:
    """Latents ``[C, h, w]`` -> a grayscale grid of the first ``max_channels`` channels.

    Each channel is stretched over its own 1st..99th percentile (so a quiet channel is
    still visible: compare structure, not brightness, across channels); 1-pixel gaps.
    """
    z = z.detach().float().cpu()[:max_channels]
    c, h, w = z.shape
    cols = math.ceil(math.sqrt(c))
    rows = math.ceil(c / cols)
    grid = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1), 40, dtype=np.uint8)
    for i in range(c):
        ch = z[i]
        lo, hi = torch.quantile(ch.flatten(), torch.tensor([0.01, 0.99])).tolist()
        v = ((ch - lo) / max(hi - lo, 1e-8)).clamp(0, 1) * 255
        r, q = divmod(i, cols)
        grid[r * (h + 1) : r * (h + 1) + h, q * (w + 1) : q * (w + 1) + w] = v.round().byte().numpy()
    return grid


def worst_window(err: torch.Tensor, size: int) -> tuple[int, int, int]:
    """Top-left ``(y, x)`` and side of the ``size``-pixel square with the largest mean error."""
    h, w = err.shape
    s = max(1, min(size, h, w))
    stride = max(1, s // 4)
    pooled = F.avg_pool2d(err[None, None].float(), s, stride=stride)[0, 0]
    idx = int(pooled.argmax())
    y, x = divmod(idx, pooled.shape[1])
    return y * stride, x * stride, s


def gallery_entry(
    x: torch.Tensor,
    recons: dict[str, torch.Tensor],
    latents: dict[str, torch.Tensor],
    *,
    thumb_size: int = 256,
    zoom_size: int = 64,
    fmt: str = "jpeg",
    quality: int = 90,
) -> dict[str, Any]:
    """One gallery card's pictures: the original ``[3, H, W]`` and every reconstruction
    (thumbnails in ``fmt``), their error heat maps on one shared scale, the zoomed crop
    where the summed error is largest (lossless PNG: native pixels, to judge artefacts),
    and each VAE's latent channels ``[C, h, w]`` (PNG). Heat maps are a colour scale, not
    a photo, and noisy (they were half of a JPEG report's bytes at q90): lossy formats
    store them at quality <= 75 with chroma subsampling (1.1 instead of 2.9 MB for 24
    images and 2 VAEs)."""
    errs = {n: (r - x).abs().mean(0) for n, r in recons.items()}  # [H, W] in [-1, 1] units
    total = torch.stack(list(errs.values())).sum(0)
    y0, x0, s = worst_window(total, zoom_size)
    # One colour scale per image (shared by its VAEs): the 99.5th percentile of the worst map.
    vmax = max(float(torch.quantile(e.flatten()[:: max(1, e.numel() // 1_000_000)], 0.995)) for e in errs.values())
    vmax = max(vmax, 2.0 / 255)
    orig = to_uint8(x)
    thumb = lambda a: image_data_uri(thumbnail(a, thumb_size), fmt, quality)  # noqa: E731
    out: dict[str, Any] = {
        "original": thumb(orig),
        "original_crop": png_data_uri(orig[y0 : y0 + s, x0 : x0 + s]),
        "crop_box": [y0, x0, s],
        "heat_vmax": vmax,
        "vaes": {},
    }
    for n, r in recons.items():
        rec = to_uint8(r)
        out["vaes"][n] = {
            "recon": thumb(rec),
            "crop": png_data_uri(rec[y0 : y0 + s, x0 : x0 + s]),
            "heat": image_data_uri(thumbnail(heatmap(errs[n].numpy(), vmax), thumb_size), fmt, min(quality, 75), True),
            "latent": png_data_uri(latent_grid(latents[n])),
        }
    return out


# ----------------------------------------------------------------------------- HTML

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d1d1f;background:#fafafa}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px}
.meta{color:#666;font-size:12px}
.notice{background:#fff4d6;border-left:4px solid #e0a800;padding:6px 10px;margin:4px 0;font-size:13px;white-space:pre-wrap}
table{border-collapse:collapse;background:#fff;font-variant-numeric:tabular-nums;margin:6px 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right;white-space:nowrap}
th{background:#f0f0f3;cursor:pointer;user-select:none;position:sticky;top:0}
th.sorted-asc::after{content:" \\25B2"} th.sorted-desc::after{content:" \\25BC"}
td.name,th.name{text-align:left}
td.best{font-weight:700;color:#0a6} td.better{background:#e3f6e8} td.worse{background:#fde4e4}
.ci{color:#888;font-size:11px}
.scroll{max-height:420px;overflow:auto;display:inline-block}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;margin:14px 0;padding:10px}
.card h3{margin:0 0 6px;font-size:14px}
.row{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
figure{margin:0;text-align:center;font-size:11px;color:#444}
figure img{display:block;border:1px solid #ccc;max-width:100%}
img.px{image-rendering:pixelated}
.na{color:#aaa}
a{color:#0366d6}
.plots{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start;margin:6px 0}
svg.plot{border:1px solid #ddd;border-radius:4px;background:#fff;max-width:100%;height:auto}
.explain{max-width:980px;font-size:13px;color:#333}
"""

_JS = r"""
(function(){
const D = JSON.parse(document.getElementById('report-data').textContent);
const fmt = (v, d) => (v === null || v === undefined || Number.isNaN(v)) ? 'n/a'
  : (Math.abs(v) >= 1e307 ? (v > 0 ? '\u221e' : '-\u221e') : (Math.abs(v) >= 1000 ? v.toFixed(0) : v.toFixed(d)));
const el = (tag, attrs, ...kids) => { const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const k of kids) e.append(k); return e; };

// Sortable tables: click a header; numbers compare numerically, n/a always last.
// Returns sortBy(col, asc) so the page can also be opened pre-sorted: report.html#sort=COL or #sort=-COL
// (per-image table column index, '-' = descending).
function sortable(table, onSort) {
  const ths = table.querySelectorAll('thead th');
  const sortBy = (col, asc) => {
    ths.forEach(t => t.classList.remove('sorted-asc', 'sorted-desc'));
    ths[col].classList.add(asc ? 'sorted-asc' : 'sorted-desc');
    const body = table.tBodies[0];
    const rows = Array.from(body.rows);
    const key = r => { const c = r.cells[col]; const s = c.dataset.sort;
      if (s === undefined) return c.textContent; return s === '' ? null : Number(s); };
    rows.sort((a, b) => { const x = key(a), y = key(b);
      if (x === null && y === null) return 0; if (x === null) return 1; if (y === null) return -1;
      const r = (typeof x === 'number' && typeof y === 'number') ? x - y : String(x).localeCompare(String(y));
      return asc ? r : -r; });
    rows.forEach(r => body.append(r));
    if (onSort) onSort(rows);
  };
  ths.forEach((th, col) => th.addEventListener('click', () => sortBy(col, !th.classList.contains('sorted-asc'))));
  return sortBy;
}
function numCell(v, digits, best, extra) {
  const td = el('td', {'data-sort': (v === null || v === undefined || !Number.isFinite(v)) ? '' : String(v)});
  td.append(fmt(v, digits)); if (extra) td.append(extra); if (best) td.classList.add('best'); return td;
}

// ---- aggregate tables: reconstruction, then diffusability (with the reconstruction PSNR as its reference)
const metrics = D.metrics;
const groupOf = m => m.group || 'reconstruction';
const bestOf = (m, vals) => { vals = vals.filter(Number.isFinite); if (!vals.length) return null;
  return m.higher_is_better ? Math.max(...vals) : Math.min(...vals); };
function aggregateTable(ms, id, withRest) {
  const t = el('table', {id: id});
  const headRow = el('tr', {}, el('th', {class: 'name'}, 'VAE'), el('th', {}, 'latent'));
  ms.forEach(m => headRow.append(el('th', {title: m.help || ''}, m.label + (m.higher_is_better ? ' \u2191' : ' \u2193'))));
  if (withRest && D.rfid_key) headRow.append(el('th', {title: D.rfid_note}, D.rfid_label + ' \u2193'));
  if (withRest) headRow.append(el('th', {}, 'enc s/img'), el('th', {}, 'dec s/img'));
  t.append(el('thead', {}, headRow));
  const body = el('tbody');
  D.vaes.forEach(v => {
    const a = D.aggregate[v.name];
    const tr = el('tr', {'data-vae': v.name}, el('td', {class: 'name'}, v.name),
      el('td', {'data-sort': String(v.latent_channels)}, 'f' + v.downsample_factor + 'c' + v.latent_channels));
    ms.forEach(m => { const s = a[m.key] || {}; const best = bestOf(m, D.vaes.map(w => (D.aggregate[w.name][m.key] || {}).mean));
      const ci = (s.ci95 && s.ci95[0] !== null) ? el('span', {class: 'ci'}, ' \u00b1' + fmt((s.ci95[1] - s.ci95[0]) / 2, m.digits)) : null;
      tr.append(numCell(s.mean, m.digits, m.rank && s.mean !== null && s.mean === best && D.vaes.length > 1, ci)); });
    if (withRest && D.rfid_key) tr.append(numCell(D.rfid[v.name], 2));
    if (withRest) tr.append(numCell((a.encode_s || {}).mean, 3), numCell((a.decode_s || {}).mean, 3));
    body.append(tr);
  });
  t.append(body); sortable(t);
  return t;
}
document.getElementById('aggregate-slot').append(aggregateTable(metrics.filter(m => groupOf(m) === 'reconstruction'), 'aggregate', true));
const difMetrics = metrics.filter(m => groupOf(m) === 'diffusability');
if (difMetrics.length) {
  const ref = Object.assign({}, metrics.find(m => m.key === 'psnr'), {label: 'recon PSNR dB', rank: false});
  document.getElementById('diffusability-slot').append(aggregateTable(difMetrics.concat([ref]), 'diffusability', false));
}

// ---- paired differences to the baseline (same images: the fair test of "B beats A")
const P = D.paired_vs_baseline || {};
const others = D.vaes.filter(v => P[v.name]);
if (others.length) {
  const pt = el('table', {id: 'paired'});
  const ph = el('tr', {}, el('th', {class: 'name'}, 'VAE − ' + P.baseline));
  // Differences of the figures a VAE is judged by (and the rate); the image's own HF share is not one.
  const pm = metrics.filter(m => m.rank || groupOf(m) === 'reconstruction');
  pm.forEach(m => ph.append(el('th', {}, 'Δ ' + m.label)));
  pt.append(el('thead', {}, ph));
  const pb = el('tbody');
  others.forEach(v => {
    const tr = el('tr', {'data-paired': v.name}, el('td', {class: 'name'}, v.name));
    pm.forEach(m => { const s = P[v.name][m.key] || {};
      const ci = (s.ci95 && s.ci95[0] !== null) ? s.ci95 : null;
      const sig = ci && (ci[0] > 0 || ci[1] < 0);
      const td = numCell(s.mean, m.digits, false, ci ? el('span', {class: 'ci'}, ' [' + fmt(ci[0], m.digits) + ', ' + fmt(ci[1], m.digits) + ']') : null);
      if (sig && m.rank) td.classList.add(((s.mean > 0) === m.higher_is_better) ? 'better' : 'worse');
      tr.append(td); });
    pb.append(tr);
  });
  pt.append(pb); sortable(pt);
  document.getElementById('paired-slot').append(pt);
}

// ---- latent health
const hs = document.getElementById('health-slot');
D.vaes.forEach(v => {
  const h = D.latent_health[v.name]; if (!h) return;
  const sug = h.suggested;
  hs.append(el('h3', {}, v.name + ': ' + h.active_channels + ' of ' + h.channels + ' channels active (KL per element > ' + h.active_kl_threshold + ' nats)'));
  if (h.spectrum) hs.append(el('div', {class: 'meta'}, 'latent HF share ' + fmt(h.spectrum.hf_share, 3) + ' (posterior mean: '
    + fmt(h.spectrum.hf_share_posterior_mean, 3) + '), images at the latent size ' + fmt(h.spectrum.hf_share_image, 3)
    + '; per channel in the table (share of that channel\u2019s own energy).'));
  hs.append(el('div', {class: 'meta'}, 'suggested scaling_factor ' + fmt(sug.scaling_factor, 4) + ', shift_factor ' + fmt(sug.shift_factor, 4)
    + ' (SD3/FLUX style); scaling without shift ' + fmt(sug.scaling_factor_no_shift, 4) + ' (SD/SDXL style). Configured: scaling '
    + fmt(v.scaling_factor, 4) + ', shift ' + (v.shift_factor === null ? 'none' : fmt(v.shift_factor, 4))
    + (h.configured ? ' \u2192 normalised latents have mean ' + fmt(h.configured.normalised_mean, 3) + ', std ' + fmt(h.configured.normalised_std, 3) : '')));
  const t = el('table', {class: 'health', 'data-vae': v.name});
  const hfc = (h.spectrum || {}).hf_share_per_channel || [];
  t.append(el('thead', {}, el('tr', {}, ...['channel', 'mean', 'std', 'posterior std', 'KL/element', 'KL/image', 'HF share', 'active'].map(s => el('th', {}, s)))));
  const b = el('tbody');
  for (let c = 0; c < h.channels; c++) {
    b.append(el('tr', {}, numCell(c, 0), numCell(h.mean[c], 4), numCell(h.std[c], 4), numCell(h.posterior_std_mean[c], 4),
      numCell(h.kl_per_element[c], 4), numCell(h.kl_per_image[c], 1), numCell(hfc[c], 3), el('td', {'data-sort': h.active[c] ? '1' : '0'}, h.active[c] ? 'yes' : 'NO')));
  }
  t.append(b); sortable(t); hs.append(t);
});

// ---- per-image table (drives the gallery order)
const it = el('table', {id: 'per-image'});
const ih = el('tr', {}, el('th', {class: 'name'}, 'image'), el('th', {}, 'size'));
const cols = [];
metrics.forEach(m => D.vaes.forEach(v => { cols.push([m, v.name]); ih.append(el('th', {}, m.label + ' \u00b7 ' + v.name)); }));
it.append(el('thead', {}, ih));
const ib = el('tbody');
D.images.forEach((im, i) => {
  const link = im.gallery ? el('a', {href: '#img-' + i}, im.key) : im.key;
  const tr = el('tr', {'data-image': String(i)}, el('td', {class: 'name'}, link), el('td', {'data-sort': String(im.width * im.height)}, im.width + '\u00d7' + im.height));
  cols.forEach(([m, vn]) => tr.append(numCell((im.metrics[vn] || {})[m.key], m.digits)));
  ib.append(tr);
});
it.append(ib);
const gallery = document.getElementById('gallery-slot');
const sortImages = sortable(it, rows => rows.forEach(r => { const c = document.getElementById('img-' + r.dataset.image); if (c) gallery.append(c); }));
document.getElementById('per-image-slot').append(it);

// ---- gallery
const fig = (src, cap, cls, width) => { const img = el('img', {src: src, alt: cap}); if (cls) img.className = cls;
  if (width) img.style.width = width + 'px'; return el('figure', {}, img, el('figcaption', {}, cap)); };
D.images.forEach((im, i) => {
  if (!im.gallery) return;
  const g = im.gallery;
  const card = el('div', {class: 'card', id: 'img-' + i});
  card.append(el('h3', {}, im.key + ' (' + im.width + '\u00d7' + im.height + ')'));
  const full = el('div', {class: 'row'}, fig(g.original, 'original'));
  D.vaes.forEach(v => { const a = g.vaes[v.name]; if (!a) return; const m = im.metrics[v.name] || {};
    full.append(fig(a.recon, v.name + ' \u2014 PSNR ' + fmt(m.psnr, 2) + ' dB, SSIM ' + fmt(m.ssim, 4))); });
  card.append(full);
  const heat = el('div', {class: 'row'});
  D.vaes.forEach(v => { const a = g.vaes[v.name]; if (a) heat.append(fig(a.heat, v.name + ': |error|, black 0 \u2192 yellow \u2265 ' + fmt(g.heat_vmax, 3))); });
  card.append(heat);
  const cb = g.crop_box;
  const zoom = el('div', {class: 'row'}, fig(g.original_crop, 'original, ' + cb[2] + ' px at (' + cb[1] + ', ' + cb[0] + ')', 'px', 192));
  D.vaes.forEach(v => { const a = g.vaes[v.name]; if (a) zoom.append(fig(a.crop, v.name + ' (largest error)', 'px', 192)); });
  card.append(zoom);
  const lat = el('div', {class: 'row'});
  D.vaes.forEach(v => { const a = g.vaes[v.name]; if (a) lat.append(fig(a.latent, v.name + ' latents (' + v.latent_channels + ' ch' + (v.latent_channels > 16 ? ', first 16' : '') + ')', 'px', 192)); });
  card.append(lat);
  gallery.append(card);
});
const m = /sort=(-?)(\d+)/.exec(location.hash);
if (m && Number(m[2]) < it.tHead.rows[0].cells.length) sortImages(Number(m[2]), m[1] !== '-');
const nImg = document.querySelectorAll('#gallery-slot img').length;
// Where each plot landed on the page (CSS pixels): a headless browser check can find it in a screenshot.
const plotsDrawn = document.querySelectorAll('svg.plot');
plotsDrawn.forEach(p => { const r = p.getBoundingClientRect();
  p.setAttribute('data-box', [r.left + window.scrollX, r.top + window.scrollY, r.width, r.height].map(Math.round).join(',')); });
const nPlots = plotsDrawn.length;
document.getElementById('js-status').textContent = 'rendered ' + D.images.length + ' images, ' + nImg + ' pictures, ' + nPlots + ' plots';
})();
"""


def _json_for_script(data: Any) -> str:
    # Inside <script>, "</" could close the tag early; "<\/" is the same JSON string.
    return json.dumps(data, allow_nan=False, separators=(",", ":")).replace("</", "<\\/")


def _clean(x: Any) -> Any:
    """JSON has no NaN/inf: NaN -> null, +-inf -> a huge sentinel JS formats as infinity."""
    if isinstance(x, float):
        if math.isnan(x):
            return None
        if math.isinf(x):
            return 1e308 if x > 0 else -1e308
        return x
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _plots(svgs: list[str]) -> str:
    return '<div class="plots">' + "".join(svgs) + "</div>" if svgs else '<div class="meta">nothing to plot</div>'


def render_html(data: dict[str, Any]) -> str:
    """The page for a comparison ``data`` dict (``latentae.compare.run_compare`` builds it)."""
    from latentae import report_plots as plots

    title = html.escape(data.get("title", "VAE comparison"))
    spectrum = plots.spectrum(data)
    notices = "".join(f'<div class="notice">{html.escape(n)}</div>' for n in data.get("notices", []))
    payload = _json_for_script(_clean(data))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{_CSS}</style></head>
<body>
<h1>{title}</h1>
<div class="meta">{html.escape(data.get("subtitle", ""))}</div>
<div class="meta" id="js-status">JavaScript did not run: the tables and pictures below are built by the page's script.</div>
<noscript><div class="notice">This report needs JavaScript to draw its tables and images.</div></noscript>
{notices}
<h2>Aggregate (mean over images, &plusmn; half-width of the {html.escape(data.get("interval_short", "95% interval"))})</h2>
<div id="aggregate-slot"></div>
<div class="meta">{html.escape(data.get("interval", ""))}</div>
<h2 id="rate-distortion">Rate&ndash;distortion</h2>
<div class="meta">Quality against the latent rate (latent elements &times; bits per element / pixels): a 16-channel
latent costs 4&times; the bits of a 4-channel one at the same downsampling. Up-left is better for PSNR, down-left for LPIPS.</div>
{_plots(plots.rate_distortion(data))}
<h2>Paired difference to the baseline (per image, then averaged; 95% interval in brackets)</h2>
<div class="meta">Green / red: the interval excludes 0, so the difference is unlikely to be noise on these images.</div>
<div id="paired-slot"></div>
<h2 id="distributions">Per-image distributions</h2>
<div class="meta">Every image is a point (hover for its name); boxes: quartiles and median, whiskers to 1.5 IQR,
diamond: mean. The &Delta; plots show each image's difference to the baseline: points above/below the dashed 0 line are images it wins/loses.</div>
{_plots(plots.distributions(data))}
<h2 id="diffusability">Diffusability</h2>
<div class="explain">{html.escape(data.get("diffusability_note", ""))}</div>
<div id="diffusability-slot"></div>
{_plots([spectrum] if spectrum else [])}
<h2>Latent health</h2>
<div id="health-slot"></div>
<h2>Per image (click a header to sort; the gallery follows the order)</h2>
<div class="scroll" id="per-image-slot"></div>
<h2>Gallery</h2>
<div class="meta">Reconstructions from the posterior mean, clamped to [-1, 1]. Error maps: mean absolute error over RGB
(in [-1, 1] units) on one scale per image. Zoomed crops: the window with the largest error summed over all VAEs, at
native resolution. Latent channels: each stretched over its own 1st-99th percentile.</div>
<div id="gallery-slot"></div>
<script type="application/json" id="report-data">{payload}</script>
<script>{_JS}</script>
</body></html>
"""


def write_report(data: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(render_html(data), encoding="utf-8")
    tmp.replace(path)  # never leave a half-written page behind
    return path


__all__ = ["gallery_entry", "heatmap", "image_data_uri", "latent_grid", "png_data_uri", "render_html", "thumbnail", "to_uint8", "worst_window", "write_report"]
