"""The terminal tables of a comparison (``latentae.compare``): mean +- half-width of the 95% interval.

Two tables: reconstruction (PSNR, SSIM, ..., rFID) and diffusability (the latent's
high-frequency share next to the image's, and the equivariance PSNRs, with the
reconstruction PSNR repeated as their reference), then one latent-health line per VAE.
"""

from __future__ import annotations

from typing import Any


def _cell(s: dict[str, Any] | None, digits: int) -> str:
    if not s or s["mean"] is None:
        return "n/a"
    cell = f"{s['mean']:.{digits}f}"
    if s["ci95"][0] is not None:
        cell += f" ±{(s['ci95'][1] - s['ci95'][0]) / 2:.{digits}f}"
    return cell


def _render(head: list[str], lines: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [head] + lines) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in lines]


def format_table(summary: dict[str, Any]) -> str:
    """The aggregate tables and latent-health lines for the terminal."""
    metrics = summary["metrics"]
    rec = [m for m in metrics if m.get("group", "reconstruction") == "reconstruction" and m["key"] != "bpp"]
    dif = [m for m in metrics if m.get("group") == "diffusability"]
    head = ["VAE", "latent", "bpp (nominal)"] + [m["label"] for m in rec]
    if summary.get("rfid_key"):
        head.append(summary["rfid_label"])
    lines = []
    for v in summary["vaes"]:
        a = summary["aggregate"][v["name"]]
        row = [v["name"], f"f{v['downsample_factor']}c{v['latent_channels']}", f"{v['bpp_nominal']:.2f}"]
        row += [_cell(a.get(m["key"]), m["digits"]) for m in rec]
        if summary.get("rfid_key"):
            r = summary["rfid"].get(v["name"])
            row.append("n/a" if r is None else f"{r:.2f}")
        lines.append(row)
    out = _render(head, lines)
    if dif:
        # Equivariance PSNR includes the reconstruction error: the reconstruction PSNR is its reference.
        head = ["VAE", "latent"] + [m["label"] for m in dif] + ["recon PSNR dB"]
        lines = []
        for v in summary["vaes"]:
            a = summary["aggregate"][v["name"]]
            row = [v["name"], f"f{v['downsample_factor']}c{v['latent_channels']}"]
            lines.append(row + [_cell(a.get(m["key"]), m["digits"]) for m in dif] + [_cell(a.get("psnr"), 2)])
        out += ["", "Diffusability (HF share: lower = smoother latents; equivariance PSNR: higher = better, read next to recon PSNR)"]
        out += _render(head, lines)
    out.append("")
    for v in summary["vaes"]:
        h = summary["latent_health"].get(v["name"])
        if h:
            sug = h["suggested"]
            out.append(
                f"{v['name']}: {h['active_channels']}/{h['channels']} channels active; suggested scaling_factor "
                f"{sug['scaling_factor']:.4f}, shift_factor {sug['shift_factor']:.4f} (no-shift scaling {sug['scaling_factor_no_shift']:.4f})"
            )
    return "\n".join(out)


__all__ = ["format_table"]
