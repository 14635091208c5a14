"""``hicache replay --plot``: hit ratio per tier and transfer bandwidth over the replay."""

from __future__ import annotations

from pathlib import Path

from hicache.errors import InvalidArgumentError
from hicache.replay.runner import ReplayReport

__all__ = ["plot_report"]


def plot_report(report: ReplayReport, path: str | Path) -> Path:
    """Draws the report's timeline into an image file (PNG, SVG, PDF: by ``path``'s suffix).

    Top panel: block hit ratio per window of requests, L1 (device) and L2 (host, loaded back)
    stacked, and their sum. Bottom panel: achieved bandwidth of the window's backups
    (device -> host) and load-backs (host -> device), GB/s, where the window moved any bytes.

    Args:
        report: a replay report with a ``timeline`` (``ReplayConfig.timeline_points > 0``).
        path: the image file to write.

    Returns:
        The path written.

    Raises:
        InvalidArgumentError: the report has no timeline, or matplotlib is not installed (the
            message names the extra to install).
    """
    if not report.timeline:
        raise InvalidArgumentError("plot_report: the report has no timeline (timeline_points=0)")
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise InvalidArgumentError(
            'plot_report: matplotlib is not installed: pip install "hicache[plot]"'
        ) from e
    points = report.timeline
    x = [p["requests"] for p in points]
    l1 = [p["l1_hit_blocks"] / p["blocks"] if p["blocks"] else 0.0 for p in points]
    l2 = [p["l2_hit_blocks"] / p["blocks"] if p["blocks"] else 0.0 for p in points]
    fig, (hits, bandwidth) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    hits.stackplot(x, l1, l2, labels=["L1 (device)", "L2 (host, loaded back)"], alpha=0.8)
    hits.plot(x, [a + b for a, b in zip(l1, l2, strict=True)], color="black", lw=0.8, label="total")
    hits.set_ylabel("block hit ratio per window")
    hits.set_ylim(0, 1)
    hits.legend(loc="upper left")
    hits.set_title(
        f"hicache replay: {report.trace}: {report.requests:,} requests, "
        f"block hit ratio {report.block_hit_ratio:.3f} (io backend {report.io_backend or 'none'})"
    )
    for name, label in (("backup", "backup (device -> host)"), ("load_back", "load-back")):
        series = [
            (p["requests"], p[f"{name}_bytes"] / p[f"{name}_seconds"] / 1e9)
            for p in points
            if p.get(f"{name}_seconds", 0) > 0
        ]
        if series:
            bandwidth.plot(*zip(*series, strict=True), marker=".", lw=0.8, label=label)
    bandwidth.set_ylabel("transfer GB/s per window")
    bandwidth.set_xlabel("requests replayed")
    if bandwidth.lines:
        bandwidth.legend(loc="upper left")
    else:
        bandwidth.text(
            0.5, 0.5, "no host tier: no transfers", ha="center", transform=bandwidth.transAxes
        )
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
