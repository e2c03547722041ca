"""Learning curves: top-1 and top-5 validation accuracy against epoch, like the seed's results plot.

Drawn on a bare matplotlib Figure with the Agg canvas rather than pyplot, so
no global backend or figure state is touched (safe in any process or thread,
no display needed).
"""
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from utils.files import atomic_path

_PROTOCOL_NAMES = {1: "1 view (centre crop)", 10: "10 views (5 crops x flip)", 50: "50 views (5 scales x 5 crops x flip)"}


def protocol_name(protocol):
    return _PROTOCOL_NAMES.get(int(protocol), f"{protocol} views")


def plot_accuracy(rows, png_path, title="Validation accuracy"):
    """Write a PNG of top-1 (dashed) and top-5 (solid) accuracy per epoch, one colour per protocol
    and weights (raw, or the EMA's: labelled 'EMA').

    rows: iterables of dicts with keys epoch, protocol, top1, top5 (percent) and optionally
    weights ('raw' when absent), as in accuracy.csv. The file is replaced atomically, so a viewer never shows a
    half-written image.
    """
    fig = Figure(figsize=(7.5, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    crops = {r.get("crop") for r in rows}

    def series_of(r):
        return r.get("weights", "raw") != "raw", int(r["protocol"]), r.get("crop") or 0  # raw series first

    protocols = sorted({series_of(r) for r in rows})
    colours = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
    for colour, series in zip(colours, protocols):
        mine = sorted((r for r in rows if series_of(r) == series), key=lambda r: int(r["epoch"]))
        epochs = [int(r["epoch"]) for r in mine]
        name = protocol_name(series[1]) + (", EMA" if series[0] else "") + \
            (f", {series[2]} px" if len(crops) > 1 else "")  # each crop its own curve
        ax.plot(epochs, [float(r["top5"]) for r in mine], "-o", color=colour, markersize=3, label=f"Top 5, {name}")
        ax.plot(epochs, [float(r["top1"]) for r in mine], "--s", color=colour, markersize=3, label=f"Top 1, {name}")
    ax.set_xlabel("epoch (saved folder number)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    if protocols:
        ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    with atomic_path(png_path, durable=True) as tmp:
        # The temp name has no .png suffix, so the format must be explicit.
        fig.savefig(tmp, format="png")
    return png_path
