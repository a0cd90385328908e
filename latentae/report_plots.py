"""The comparison report's plots, as inline SVG (``latentae.svgplot``), from its data dict.

* rate-distortion: latent bits per pixel against PSNR and against LPIPS (SSIM without
  LPIPS), one point per VAE at its mean with the 95% interval as whiskers;
* per-image distributions: per metric, a box + strip plot per VAE (every image a point,
  hover for its name), and the per-image differences to the baseline;
* latent spectra: the radially averaged, normalised power spectrum of each VAE's latents
  next to that of the images at the latent size (``latentae.health`` / ``diffusability``).

Each function takes the report's data (``Comparison.finish`` builds it: ``vaes``,
``metrics``, ``aggregate``, ``images``, ``latent_health``, ...) and returns SVG strings,
or nothing when there is nothing to draw.
"""

from __future__ import annotations

import math
from typing import Any

from latentae.svgplot import Figure, color


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _metric(data: dict[str, Any], key: str) -> dict[str, Any] | None:
    return next((m for m in data.get("metrics", []) if m["key"] == key), None)


def _lpips_key(data: dict[str, Any]) -> str | None:
    keys = [m["key"] for m in data.get("metrics", []) if m["key"].startswith("lpips")]
    return next((k for k in keys if "vgg" in k), keys[0] if keys else None)


def _direction(m: dict[str, Any]) -> str:
    return "higher is better" if m["higher_is_better"] else "lower is better"


def rate_distortion(data: dict[str, Any]) -> list[str]:
    """bpp vs PSNR and bpp vs LPIPS (or SSIM): one point per VAE with its 95% intervals."""
    vaes, agg = data.get("vaes", []), data.get("aggregate", {})
    bits = (data.get("options") or {}).get("latent_bits", 16)
    ys = [k for k in ("psnr", _lpips_key(data) or "ssim") if _metric(data, k)]
    out = []
    for key in ys:
        m = _metric(data, key)
        pts = []
        for i, v in enumerate(vaes):
            a = agg.get(v["name"], {})
            x, y = a.get("bpp", {}), a.get(key, {})
            if _finite(x.get("mean")) and _finite(y.get("mean")):
                pts.append((i, v, x, y))
        if not pts:
            continue
        rates = [p[2]["mean"] for p in pts]
        xlog = 2 if min(rates) > 0 and max(rates) / min(rates) >= 3 else False  # rates double: log2 axis
        fig = Figure(
            title=f"{m['label']} vs latent rate", xlabel=f"latent bits per pixel ({bits} bits per element)",
            ylabel=f"{m['label']} ({_direction(m)})", xlog=xlog, fig_id=f"rd-{key}", width=440, height=300,
            note="mean over images; whiskers: 95% interval",
        )
        for i, v, x, y in pts:
            c = color(i)
            fig.errorbar(x["mean"], y["mean"], color=c, yerr=y.get("ci95"), xerr=x.get("ci95"))
            fig.scatter([x["mean"]], [y["mean"]], color=c, r=5,
                        labels=[v["name"]],
                        titles=[f"{v['name']} (f{v['downsample_factor']}c{v['latent_channels']}): {y['mean']:.4g} {m['label']} at {x['mean']:.3g} bpp"])
        out.append(fig.render())
    return out


def _per_image(data: dict[str, Any], key: str) -> dict[str, list[tuple[str, float]]]:
    """``{vae: [(image key, value), ...]}`` over the report's per-image rows."""
    out: dict[str, list[tuple[str, float]]] = {v["name"]: [] for v in data.get("vaes", [])}
    for im in data.get("images", []):
        for name, ms in im.get("metrics", {}).items():
            val = ms.get(key)
            if name in out and _finite(val):
                out[name].append((im["key"], float(val)))
    return out


def distributions(data: dict[str, Any]) -> list[str]:
    """Per ranked reconstruction metric, a box + strip plot per VAE; then for PSNR and
    LPIPS the per-image differences to the baseline (when there are two or more VAEs)."""
    vaes = data.get("vaes", [])
    names = [v["name"] for v in vaes]
    out = []
    width = max(240, 110 + 80 * len(names))
    for m in data.get("metrics", []):
        if not m.get("rank", True) or m.get("group", "reconstruction") != "reconstruction":
            continue
        vals = _per_image(data, m["key"])
        if not any(vals.values()):
            continue
        fig = Figure(title=m["label"], ylabel=_direction(m), xcategories=names, fig_id=f"dist-{m['key']}",
                     width=width, height=260)
        for i, n in enumerate(names):
            v = [x for _, x in vals[n]]
            fig.box(i, v, color=color(i))
            fig.strip(i, v, color=color(i), titles=[f"{k}: {x:.{m['digits']}f}" for k, x in vals[n]])
        out.append(fig.render())
    if len(names) < 2:
        return out
    base = names[0]
    for key in ("psnr", _lpips_key(data)):
        m = _metric(data, key) if key else None
        if m is None:
            continue
        vals = _per_image(data, key)
        ref = dict(vals[base])
        diffs = {n: [(k, x - ref[k]) for k, x in vals[n] if k in ref] for n in names[1:]}
        if not any(diffs.values()):
            continue
        fig = Figure(title=f"Δ {m['label']} per image", ylabel=f"VAE − {base} ({_direction(m)})",
                     xcategories=names[1:], fig_id=f"paired-{key}", width=max(240, 110 + 80 * (len(names) - 1)), height=260)
        fig.hline(0.0, color="#444", dash="3 3")
        for j, n in enumerate(names[1:]):
            v = [d for _, d in diffs[n]]
            fig.box(j, v, color=color(j + 1))
            fig.strip(j, v, color=color(j + 1), titles=[f"{k}: {d:+.{m['digits']}f}" for k, d in diffs[n]])
        out.append(fig.render())
    return out


def spectrum(data: dict[str, Any]) -> str | None:
    """Each VAE's mean latent spectrum (solid) and the images' at the latent size (dashed,
    one per downsampling factor), log power against frequency / latent Nyquist."""
    health = data.get("latent_health", {})
    vaes = [(i, v) for i, v in enumerate(data.get("vaes", [])) if (health.get(v["name"]) or {}).get("spectrum")]
    if not vaes:
        return None
    fig = Figure(title="Latent power spectrum (radially averaged, normalised)", xlabel="frequency / latent Nyquist",
                 ylabel="power (white noise = 1)", ylog=True, xlim=(0.0, 1.45), legend=True, fig_id="spectrum",
                 width=720, height=340, note="shaded: counted in the HF share (≥ ½ Nyquist); DC removed, channels pooled")
    fig.vspan(0.5, 1.45)
    fig.vline(0.5, text="½ Nyquist")
    fig.vline(1.0, text="Nyquist")
    fig.hline(1.0, color="#999", dash="1 3", label="white noise (flat)")
    seen: set[int] = set()
    for i, v in vaes:
        s = health[v["name"]]["spectrum"]
        fig.line(s["freq"], [p if p is not None else math.nan for p in s["latent"]], color=color(i),
                 label=f"{v['name']} f{v['downsample_factor']}c{v['latent_channels']}: HF {s['hf_share']:.3f}")
    for i, v in vaes:
        s = health[v["name"]]["spectrum"]
        f = v["downsample_factor"]
        if s.get("image") is None or f in seen:
            continue
        seen.add(f)
        grey = "#555" if len(seen) == 1 else "#999"
        fig.line(s["freq"], [p if p is not None else math.nan for p in s["image"]], color=grey, dash="5 4",
                 label=f"images at 1/{f}: HF {s['hf_share_image']:.3f}")
    return fig.render()


__all__ = ["distributions", "rate_distortion", "spectrum"]
