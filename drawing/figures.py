"""Pictures of graphs, runs and searches (PNG + SVG), drawn with matplotlib.

- ``draw_graph``: a knowledge transfer graph as the KTG paper draws it: nodes on a circle
  (node 0, the target, at the top), one arrow per edge s -> t labelled with its gate, the
  label edge as a self-loop, Cutoff edges left out, frozen nodes grey with a ``*``. A graph
  of more than ``LARGE`` nodes is drawn as its gate matrix instead (rows = receiving node t,
  columns = sending node s, a cell coloured by its gate, Cutoff blank).
- ``draw_learning_curves``: a run's ``metrics.jsonl``: train loss, validation and test
  accuracy per node, the gated loss (and gate weight, when recorded) of every edge. Above
  ``LARGE`` nodes: the target's line, every model's other nodes as a mean line in a min-max
  band, the edges by kind (label / cross edges per gate) likewise.
- ``draw_search``: a search folder: every trial's target validation accuracy per epoch,
  ASHA's rungs, the best trial highlighted; and the best graph beside it.

Only ``matplotlib.figure.Figure`` with the Agg canvas is used (never pyplot), so drawing
needs no display and leaves a notebook's backend alone. SVGs keep their text as ``<text>``.
The command line is ``drawing.draw`` (``ktg-draw``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from actors.graph_file import load_graph_file
from actors.metrics import EDGE_LOSS, GATE_WEIGHT, parse_edge_key
from actors.trial_row import TrialRow, read_trials

if TYPE_CHECKING:
    from actors.graph import GraphSpec

PRETTY_MODELS = {
    "resnet20": "ResNet20",
    "resnet32": "ResNet32",
    "resnet110": "ResNet110",
    "wrn28_2": "WRN28-2",
    "convnet": "ConvNet",
}
GATE_COLORS = {
    "Through": "#1f5fa8",
    "Linear": "#2a9d3a",
    "NegativeLinear": "#e07b00",
    "Correct": "#8e44ad",
}
NODE_COLORS = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
               "#7f7f7f", "#bcbd22"]
DPI = 130
LARGE = 8
"""Graphs of more than LARGE nodes are drawn as their gate matrix, and their learning curves
summarised (the target's line, a mean and min-max band for the other nodes, edges by kind)."""


def pretty_model(name: str) -> str:
    return PRETTY_MODELS.get(name, name)


def node_label(graph: "GraphSpec", i: int) -> str:
    """``0: ResNet32``; a frozen node gets the paper's ``*`` (``2: ResNet110*``)."""
    return f"{i}: {pretty_model(graph.nodes[i].model)}{'*' if graph.is_frozen(i) else ''}"


# --- saving -------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI)


def _save(fig, stem: Path, formats: tuple[str, ...] = ("png", "svg"), dpi: int = DPI) -> list[Path]:
    import matplotlib

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "ktg"}):
        for fmt in formats:
            path = stem.parent / f"{stem.name}.{fmt}"
            fig.savefig(path, format=fmt, dpi=dpi, bbox_inches="tight", pad_inches=0.15,
                        facecolor="white", metadata={"Date": None} if fmt == "svg" else None)
            paths.append(path)
    return paths


# --- graphs -------------------------------------------------------------------------------------


def kind_short(name: str) -> str:
    """An edge kind's label on drawn edges (its ``EdgeKind.short``; its name if it has none)."""
    from actors.kinds import kind_of

    kind = kind_of(name)
    return kind.short or kind.name


def edge_text(graph: "GraphSpec", t: int, s: int) -> str:
    """What an edge's label says: its gate, and its kinds when the graph has any but the default."""
    gate = graph.gates[t][s]
    if graph.kinds is None:
        return gate
    return f"{gate}: " + "+".join(kind_short(k) for k in graph.edge_kinds(t, s))


def _layout(m: int, half_width: float) -> tuple[float, list[tuple[float, float]], list[float]]:
    """Radius and node centres: node 0 at the top, the others clockwise; neighbours on the
    circle stay far enough apart for an arrow and its label between them."""
    radius = 1.0 if m <= 2 else max(1.0, (2 * half_width + 0.6) / (2 * math.sin(math.pi / m)))
    angles = [math.pi / 2 - 2 * math.pi * i / m for i in range(m)]
    return radius, [(radius * math.cos(a), radius * math.sin(a)) for a in angles], angles


def _upright(deg: float) -> float:
    deg = (deg + 180) % 360 - 180
    if deg > 90:
        deg -= 180
    elif deg <= -90:
        deg += 180
    return deg


def _loop_path(center, angle, a, b, loop_r):
    """A circular self-loop outside an ellipse (half axes a, b) at ``center``, bulging in
    direction ``angle``; returns (Path, outermost point)."""
    from matplotlib.path import Path as MPath

    cx, cy = center
    ux, uy = math.cos(angle), math.sin(angle)
    # distance from the centre to the ellipse border in direction u
    edge = 1.0 / math.sqrt((ux / a) ** 2 + (uy / b) ** 2)
    lx, ly = cx + (edge + 0.45 * loop_r) * ux, cy + (edge + 0.45 * loop_r) * uy

    def outside(phi):
        x, y = lx + loop_r * math.cos(phi), ly + loop_r * math.sin(phi)
        return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 > 1.0

    step = math.radians(2)
    lo = hi = angle
    while outside(lo - step) and hi - lo < 2 * math.pi - 2 * step:
        lo -= step
    while outside(hi + step) and hi - lo < 2 * math.pi - 2 * step:
        hi += step
    n = max(8, int((hi - lo) / step))
    # counter-clockwise from lo to hi: leaves the node on one side, comes back on the other
    pts = [(lx + loop_r * math.cos(lo + (hi - lo) * k / n), ly + loop_r * math.sin(lo + (hi - lo) * k / n))
           for k in range(n + 1)]
    path = MPath(pts, [MPath.MOVETO] + [MPath.LINETO] * n)
    return path, (lx + loop_r * ux, ly + loop_r * uy)


def _graph_figure(graph: "GraphSpec", title: Optional[str] = None):
    if graph.num_nodes > LARGE:
        return _matrix_figure(graph, title)
    m = graph.num_nodes
    labels = [node_label(graph, i) for i in range(m)]
    a = max(0.30, 0.032 * max(len(s) for s in labels) + 0.1)  # ellipse half width (data units)
    radius, pos, angles = _layout(m, a)
    b = 0.15
    # room for the loops and their labels around the nodes
    x0, x1 = min(p[0] for p in pos) - a - 0.75, max(p[0] for p in pos) + a + 0.75
    y0, y1 = min(p[1] for p in pos) - b - 0.5, max(p[1] for p in pos) + b + 0.5
    scale = 1.55  # inches per data unit: text keeps its size for any node count
    bottom, top = 0.85, 0.45  # inches: legend + caption, title
    width, height = (x1 - x0) * scale, (y1 - y0) * scale
    fig = _figure(width, height + bottom + top)
    total = height + bottom + top
    ax = fig.add_axes((0, bottom / total, 1, height / total))
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_aspect("equal")
    ax.axis("off")
    ellipses = _draw_nodes(ax, graph, labels, pos, a, b)
    used_gates = _draw_edges(ax, graph, pos, angles, ellipses, a, b)
    if title is None:
        what = graph.loss if graph.kinds is None else "edge kinds"
        title = f"{graph.name}  (T={graph.temperature:g}, {what}, reduction={graph.reduction})"
    ax.set_title(title, fontsize=12, pad=4)
    _graph_legend(fig, graph, used_gates, bottom / total)
    return fig


def _draw_nodes(ax, graph: "GraphSpec", labels: list[str], pos, a: float, b: float) -> list:
    """The nodes as ellipses (half axes a, b) with their labels: the target red-rimmed, a
    frozen node grey and dashed; returns the ellipses (the arrows end at their rims)."""
    from matplotlib.patches import Ellipse

    ellipses = []
    for i, (x, y) in enumerate(pos):
        frozen = graph.is_frozen(i)
        if i == 0:
            face, edge, lw, ls = "#fde9c8", "#c0392b", 2.6, "-"
        elif frozen:
            face, edge, lw, ls = "#cfcfcf", "#555555", 1.5, "--"
        else:
            face, edge, lw, ls = "#e3eefa", "#2c3e50", 1.5, "-"
        e = Ellipse((x, y), 2 * a, 2 * b, facecolor=face, edgecolor=edge, linewidth=lw, linestyle=ls, zorder=3)
        ax.add_patch(e)
        ellipses.append(e)
        ax.text(x, y, labels[i], ha="center", va="center", fontsize=10.5, zorder=4,
                fontweight="bold" if i == 0 else "normal", color="#222222")
    return ellipses


def _draw_edges(ax, graph: "GraphSpec", pos, angles, ellipses, a: float, b: float) -> set[str]:
    """Every edge that is not Cutoff, coloured by its gate and labelled; returns the gates drawn."""
    from actors.gates import is_cutoff

    used_gates = set()
    for t in range(graph.num_nodes):
        for s in range(graph.num_nodes):
            gate = graph.gates[t][s]
            if is_cutoff(gate):
                continue
            used_gates.add(gate)
            color = GATE_COLORS.get(gate, "#444444")
            if s == t:
                _draw_label_edge(ax, graph, t, pos[t], angles[t], a, b, color)
            else:
                _draw_cross_edge(ax, graph, t, s, pos, ellipses, color)
    return used_gates


def _draw_label_edge(ax, graph: "GraphSpec", t: int, center, angle: float, a: float, b: float, color: str) -> None:
    """Node t's label edge: a loop on the outside of the node, its label beyond it."""
    from matplotlib.patches import FancyArrowPatch

    path, (ox, oy) = _loop_path(center, angle, a, b, 0.13)
    ax.add_patch(FancyArrowPatch(path=path, arrowstyle="-|>", mutation_scale=13, color=color, linewidth=1.5, zorder=2))
    ux, uy = math.cos(angle), math.sin(angle)
    ha = "left" if ux > 0.35 else ("right" if ux < -0.35 else "center")
    va = "bottom" if uy > 0.35 else ("top" if uy < -0.35 else "center")
    ax.text(ox + 0.03 * ux, oy + 0.03 * uy, edge_text(graph, t, t), ha=ha, va=va, fontsize=9, color=color, zorder=5)


def _draw_cross_edge(ax, graph: "GraphSpec", t: int, s: int, pos, ellipses, color: str) -> None:
    """Edge s -> t: a curved arrow between the two nodes' rims, labelled on the curve."""
    from matplotlib.patches import FancyArrowPatch

    rad = 0.18
    (x1, y1), (x2, y2) = pos[s], pos[t]
    ax.add_patch(FancyArrowPatch((x1, y1), (x2, y2), arrowstyle="-|>", mutation_scale=15,
                                 connectionstyle=f"arc3,rad={rad}", patchA=ellipses[s], patchB=ellipses[t],
                                 shrinkA=1, shrinkB=2, color=color, linewidth=1.5, zorder=2))
    # the label sits on the curve, nearer the arrowhead than the tail (so the labels of
    # crossing edges spread out): arc3's quadratic Bezier with control point
    # mid + rad * (dy, -dx), at parameter u
    dx, dy = x2 - x1, y2 - y1
    cx, cy = (x1 + x2) / 2 + rad * dy, (y1 + y2) / 2 - rad * dx
    u = 0.62
    mx = (1 - u) ** 2 * x1 + 2 * u * (1 - u) * cx + u ** 2 * x2
    my = (1 - u) ** 2 * y1 + 2 * u * (1 - u) * cy + u ** 2 * y2
    ax.text(mx, my, edge_text(graph, t, s), ha="center", va="center", fontsize=9, color=color, zorder=5,
            rotation=_upright(math.degrees(math.atan2(dy, dx))), rotation_mode="anchor",
            bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none", alpha=0.9))


def _graph_legend(fig, graph: "GraphSpec", used_gates: set[str], top: float) -> None:
    """The legend (target, frozen teachers, the gates drawn) under the graph, whose axes
    start at ``top`` (a fraction of the figure's height), and the caption below it."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(facecolor="#fde9c8", edgecolor="#c0392b", linewidth=2.2, label="node 0: target")]
    if any(graph.is_frozen(i) for i in range(graph.num_nodes)):
        handles.append(Patch(facecolor="#cfcfcf", edgecolor="#555555", linestyle="--",
                             label="*: frozen teacher (pretrained, never updated)"))
    for gate in [g for g in GATE_COLORS if g in used_gates] + sorted(used_gates - set(GATE_COLORS)):
        handles.append(Line2D([], [], color=GATE_COLORS.get(gate, "#444444"), linewidth=2, label=gate))
    fig.legend(handles=handles, loc="upper center", ncol=min(3, len(handles)), fontsize=9, frameon=False,
               bbox_to_anchor=(0.5, top))
    caption = ("arrow s \u2192 t: node t learns from node s through the gate written on it;  "
               "loop: the label edge;  no arrow: no edge")
    if graph.kinds is not None:
        caption = ("arrow s \u2192 t: gate: kinds (kl outputs, rd/ra RKD distance/angle, mhgd attention graph; "
                   "loop: ce labels, self self-distillation)")
    fig.text(0.5, 0.005, caption, ha="center", va="bottom", fontsize=8.5, color="#444444")


def _matrix_figure(graph: "GraphSpec", title: Optional[str] = None):
    """A graph of more than ``LARGE`` nodes as its gate matrix: cell (t, s) coloured by the
    gate of edge s -> t (row = receiver, column = sender, as ``graph.gates``), Cutoff blank,
    the label edges (diagonal) outlined, node 0's row and column framed in red."""
    m = graph.num_nodes
    labels = [node_label(graph, i) for i in range(m)]
    side = min(0.42 * m, 9.0)  # inches: the matrix
    cell = side / m
    step = max(1, math.ceil(m / 32))  # a tick label for every node up to 32 nodes, every step-th beyond
    fs = max(5.5, min(10.0, 0.42 * cell * step * 72))  # points: no taller than the space a label has
    label_w = max(len(labels[i]) for i in range(0, m, step)) * fs * 0.6 / 72 + 0.2  # inches
    n_handles = len({g for row in graph.gates for g in row}) + 2 + any(graph.is_frozen(i) for i in range(m))
    left, right = label_w + 0.45, 0.35
    top = label_w + 0.45 + 0.5  # tick labels, axis label, title (bbox_inches="tight" crops what is left over)
    bottom = 0.45 + 0.25 * math.ceil(n_handles / 4)  # legend + caption
    width, height = left + side + right, top + side + bottom
    fig = _figure(width, height)
    ax = fig.add_axes((left / width, bottom / height, side / width, side / height))
    rgb, used_gates, cutoff = _gate_cells(graph)
    ax.imshow(rgb, interpolation="nearest", origin="upper", extent=(-0.5, m - 0.5, m - 0.5, -0.5))
    _matrix_axes(ax, graph, labels, cell, step, fs)
    if title is None:
        title = f"{graph.name}  (T={graph.temperature:g}, {graph.loss}, reduction={graph.reduction})"
    ax.set_title(title, fontsize=12, pad=8)  # above the top axis's tick labels and label
    _matrix_legend(fig, graph, used_gates, cutoff, (left + side / 2) / width, (bottom - 0.05) / height, 0.04 / height)
    return fig


def _gate_cells(graph: "GraphSpec") -> tuple[list[list[tuple[float, float, float]]], set[str], bool]:
    """The matrix's cell colours (row t, column s: the gate of edge s -> t; Cutoff white),
    the gates present, and whether any edge is Cutoff."""
    from matplotlib.colors import to_rgb

    from actors.gates import is_cutoff

    used_gates: set[str] = set()
    cutoff = False
    rgb = []
    for t in range(graph.num_nodes):
        row = []
        for s in range(graph.num_nodes):
            gate = graph.gates[t][s]
            if is_cutoff(gate):
                cutoff = True
                row.append((1.0, 1.0, 1.0))
            else:
                used_gates.add(gate)
                row.append(to_rgb(GATE_COLORS.get(gate, "#444444")))
        rgb.append(row)
    return rgb, used_gates, cutoff


def _matrix_axes(ax, graph: "GraphSpec", labels: list[str], cell: float, step: int, fs: float) -> None:
    """The matrix's grid, every ``step``-th node's label on both axes (the target's red,
    frozen ones grey), the axis labels, the label edges outlined and node 0's row and
    column framed in red. ``cell``: a cell's side in inches; ``fs``: the labels' font size."""
    from matplotlib.patches import Rectangle

    m = graph.num_nodes
    ax.set_xlim(-0.5, m - 0.5)
    ax.set_ylim(m - 0.5, -0.5)
    grid_lw = max(0.3, min(1.0, 0.05 * cell * 72))
    ax.set_xticks([i - 0.5 for i in range(1, m)], minor=True)
    ax.set_yticks([i - 0.5 for i in range(1, m)], minor=True)
    ax.grid(which="minor", color="#d0d0d0", linewidth=grid_lw)
    ax.grid(which="major", visible=False)
    ax.tick_params(which="minor", length=0)
    ticks = list(range(0, m, step))
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=fs)
    ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=fs)
    ax.xaxis.tick_top()
    ax.xaxis.set_label_position("top")
    ax.tick_params(which="major", length=2.5, pad=2)
    for tick_labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        for text, i in zip(tick_labels, ticks):
            if i == 0:
                text.set_color("#c0392b")
                text.set_fontweight("bold")
            elif graph.is_frozen(i):
                text.set_color("#666666")
    ax.set_xlabel("sending node s", fontsize=10.5, labelpad=6)
    ax.set_ylabel("receiving node t", fontsize=10.5, labelpad=6)
    for i in range(m):  # the label edges
        ax.add_patch(Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#111111",
                               linewidth=max(0.6, min(1.4, 0.08 * cell * 72)), zorder=3))
    red = dict(fill=False, edgecolor="#c0392b", linewidth=2.2, zorder=4, clip_on=False)
    ax.add_patch(Rectangle((-0.5, -0.5), m, 1, **red))  # node 0's row: what the target learns from
    ax.add_patch(Rectangle((-0.5, -0.5), 1, m, **red))  # node 0's column: what it teaches


def _matrix_legend(fig, graph: "GraphSpec", used_gates: set[str], cutoff: bool, x: float, top: float,
                   caption_y: float) -> None:
    """The matrix's legend (the gates present, Cutoff, label edge, target, frozen) centred
    at ``x`` below ``top``, and its caption at ``caption_y`` (fractions of the figure)."""
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=GATE_COLORS.get(g, "#444444"), label=g)
               for g in [g for g in GATE_COLORS if g in used_gates] + sorted(used_gates - set(GATE_COLORS))]
    if cutoff:
        handles.append(Patch(facecolor="white", edgecolor="#999999", label="blank: Cutoff (no edge)"))
    handles.append(Patch(facecolor="none", edgecolor="#111111", label="outlined: label edge (diagonal)"))
    handles.append(Patch(facecolor="none", edgecolor="#c0392b", linewidth=2.2, label="node 0: target"))
    if any(graph.is_frozen(i) for i in range(graph.num_nodes)):
        handles.append(Patch(facecolor="none", edgecolor="none", label="*: frozen teacher"))
    fig.legend(handles=handles, loc="upper center", ncol=min(4, len(handles)), fontsize=9, frameon=False,
               bbox_to_anchor=(x, top))
    fig.text(x, caption_y,
             "rows: receiving node t, columns: sending node s;  cell (t, s): the gate of edge s \u2192 t (gates[t][s])",
             ha="center", va="bottom", fontsize=8.5, color="#444444")


def draw_graph(graph: "GraphSpec", stem: Path, title: Optional[str] = None) -> list[Path]:
    """Write ``<stem>.png`` and ``<stem>.svg`` of the graph; return both paths."""
    return _save(_graph_figure(graph, title), Path(stem))


def graph_image(graph: "GraphSpec", path: Path) -> Path:
    """Write only the PNG of the graph to ``path`` (e.g. to log it as an image)."""
    path = Path(path)
    stem = path.parent / (path.name[:-4] if path.name.lower().endswith(".png") else path.name)
    return _save(_graph_figure(graph), stem, formats=("png",))[0]


# --- runs ---------------------------------------------------------------------------------------


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (a line cut short by a crash skipped); for a resumed
    run whose epochs were recorded twice, the last record of each (node, epoch) wins.
    Sorted by (node, epoch)."""
    from actors.metrics import read_metrics_file

    rows = {(r["node"], r["epoch"]): r for r in read_metrics_file(path)[0]}
    return [rows[k] for k in sorted(rows)]


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(int(r["epoch"]))
            ys.append(float(v))
    return xs, ys


def _node_name(rows: list[dict[str, Any]], node: int) -> str:
    last = rows[-1]
    return f"n{node} {last.get('model', '?')}{'*' if last.get('frozen') else ''}"


def _int_epochs(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.grid(True, alpha=0.3)


def _edge_panel(ax, by_node, kind, title, ylabel, ms: float = 2.5) -> bool:
    """One curve per recorded edge value of ``kind`` (``actors.metrics.EDGE_LOSS`` or
    ``GATE_WEIGHT``), each node's label edge first."""
    styles = ["-", "--", ":", "-."]
    lines = 0
    for t, rows in sorted(by_node.items()):
        keys = {k: e for r in rows for k in r if (e := parse_edge_key(k)) is not None and e.kind == kind}
        for j, (key, e) in enumerate(sorted(keys.items(), key=lambda ke: (ke[1].source != t, ke[1].source))):
            xs, ys = _series(rows, key)
            if not xs:
                continue
            ax.plot(xs, ys, styles[j % len(styles)], marker="o", markersize=ms, linewidth=1.4,
                    color=NODE_COLORS[e.target % len(NODE_COLORS)], label=f"{e.source}\u2192{e.target} {e.gate}")
            lines += 1
    ax.set_title(title, fontsize=11)
    ax.set_ylabel(ylabel)
    _int_epochs(ax)
    if lines:
        ax.legend(fontsize=7.5, ncol=1 if lines <= 8 else 2, loc="center left", bbox_to_anchor=(1.01, 0.5),
                  frameon=False)
    else:
        ax.text(0.5, 0.5, "no edge recorded", transform=ax.transAxes, ha="center", va="center", color="#777777")
    return lines > 0


def _node_panels(axes, by_node, ms: float) -> None:
    """Train loss, validation and test accuracy: one line per node (node 0 thicker)."""
    names = {n: _node_name(nr, n) for n, nr in by_node.items()}

    ax = axes[0]
    for n, nr in sorted(by_node.items()):
        xs, ys = _series(nr, "train_loss")
        if xs:
            ax.plot(xs, ys, "-o", markersize=ms, color=NODE_COLORS[n % len(NODE_COLORS)], label=names[n])
    ax.set_title("train loss (sum of the gated edge losses)", fontsize=11)
    ax.set_ylabel("loss")
    _int_epochs(ax)
    frozen = [names[n] for n, nr in by_node.items() if nr[-1].get("frozen")]
    if frozen:
        ax.text(0.99, 0.98, "frozen, not trained: " + ", ".join(frozen), transform=ax.transAxes,
                ha="right", va="top", fontsize=8, color="#555555")
    if ax.lines:
        ax.legend(fontsize=8.5, frameon=False)

    for ax, key, what in ((axes[1], "val_acc", "validation"), (axes[2], "test_acc", "test")):
        for n, nr in sorted(by_node.items()):
            xs, ys = _series(nr, key)
            if xs:
                ax.plot(xs, ys, "-o", markersize=ms, color=NODE_COLORS[n % len(NODE_COLORS)], label=names[n],
                        linewidth=2.2 if n == 0 else 1.4)
        xs, ys = _series(by_node[min(by_node)], f"ensemble_{key}")
        if xs:
            ax.plot(xs, ys, "--", color="black", linewidth=1.4, label="ensemble (mean softmax)")
        ax.set_title(f"{what} accuracy per node", fontsize=11)
        ax.set_ylabel("accuracy (%)")
        _int_epochs(ax)
        if ax.lines:
            ax.legend(fontsize=8.5, frameon=False, loc="lower right")
        else:
            ax.text(0.5, 0.5, f"no {what} split in this run", transform=ax.transAxes, ha="center", va="center",
                    color="#777777")


def _ranges(idx: list[int]) -> str:
    """``[1, 2, 3, 5]`` -> ``1\u20133, 5``."""
    parts: list[str] = []
    idx = sorted(idx)
    i = 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        parts.append(str(idx[i]) if i == j else f"{idx[i]}\u2013{idx[j]}")
        i = j + 1
    return ", ".join(parts)


def _band(ax, values: dict[int, list[float]], color: str, label: str, ms: float, linestyle: str = "-"):
    """The mean per epoch of ``values`` (epoch -> the values of a group of nodes or edges) as
    a line, their min-max as a shaded band; returns the legend handle, or None when empty."""
    epochs = sorted(e for e, v in values.items() if v)
    if not epochs:
        return None
    mean = [sum(values[e]) / len(values[e]) for e in epochs]
    band = ax.fill_between(epochs, [min(values[e]) for e in epochs], [max(values[e]) for e in epochs],
                           color=color, alpha=0.18, linewidth=0)
    (line,) = ax.plot(epochs, mean, linestyle, marker="o", markersize=ms, linewidth=1.6, color=color)
    return (band, line), label


def _group_values(rows_of: dict[int, list[dict[str, Any]]], key_of) -> dict[int, list[float]]:
    """epoch -> the finite values of ``key_of(node)`` over the nodes of ``rows_of``."""
    values: dict[int, list[float]] = {}
    for n, rows in rows_of.items():
        for key in key_of(n, rows):
            for x, y in zip(*_series(rows, key)):
                values.setdefault(x, []).append(y)
    return values


def _node_groups(by_node: dict[int, list[dict[str, Any]]]) -> list[tuple[str, list[int]]]:
    """The nodes other than the target grouped by model (frozen ones apart): (name, nodes)."""
    groups: dict[tuple[str, bool], list[int]] = {}
    for n, rows in sorted(by_node.items()):
        if n != 0:
            groups.setdefault((str(rows[-1].get("model", "?")), bool(rows[-1].get("frozen"))), []).append(n)
    return [(f"nodes {_ranges(nodes)} {model}{'*' if frozen else ''}", nodes) for (model, frozen), nodes in groups.items()]


def _summary_node_panels(axes, by_node, ms: float) -> None:
    """Train loss, validation and test accuracy of a graph of more than ``LARGE`` nodes: the
    target as a bold line, every other model's nodes as their mean and min-max band."""
    target = by_node.get(0)
    groups = _node_groups(by_node)
    colors = NODE_COLORS[1:]

    def panel(ax, key):
        handles = []
        if target:
            xs, ys = _series(target, key)
            if xs:
                (line,) = ax.plot(xs, ys, "-o", markersize=ms, color=NODE_COLORS[0], linewidth=2.6, zorder=5)
                handles.append((line, f"{_node_name(target, 0)} (target)"))
        for k, (name, nodes) in enumerate(groups):
            h = _band(ax, _group_values({n: by_node[n] for n in nodes}, lambda n, rows: [key]),
                      colors[k % len(colors)], f"{name}: mean, min\u2013max ({len(nodes)})", ms)
            if h:
                handles.append(h)
        return handles

    ax = axes[0]
    handles = panel(ax, "train_loss")
    ax.set_title("train loss (sum of the gated edge losses)", fontsize=11)
    ax.set_ylabel("loss")
    _int_epochs(ax)
    frozen = [n for n, nr in by_node.items() if nr[-1].get("frozen")]
    if frozen:
        ax.text(0.99, 0.98, f"frozen, not trained: nodes {_ranges(frozen)}", transform=ax.transAxes,
                ha="right", va="top", fontsize=8, color="#555555")
    if handles:
        ax.legend(*zip(*handles), fontsize=8.5, framealpha=0.85)

    for ax, key, what in ((axes[1], "val_acc", "validation"), (axes[2], "test_acc", "test")):
        handles = panel(ax, key)
        xs, ys = _series(by_node[min(by_node)], f"ensemble_{key}")
        if xs:
            (line,) = ax.plot(xs, ys, "--", color="black", linewidth=1.4)
            handles.append((line, "ensemble (mean softmax)"))
        ax.set_title(f"{what} accuracy: the target, the other nodes' mean and range", fontsize=11)
        ax.set_ylabel("accuracy (%)")
        _int_epochs(ax)
        if handles:
            ax.legend(*zip(*handles), fontsize=8.5, framealpha=0.85, loc="lower right")
        else:
            ax.text(0.5, 0.5, f"no {what} split in this run", transform=ax.transAxes, ha="center", va="center",
                    color="#777777")


def _summary_edge_panel(ax, by_node, kind, title, ylabel, ms: float) -> bool:
    """The edges of a graph of more than ``LARGE`` nodes by kind: label edges and cross edges
    (s != t) per gate, each as the mean and min-max band over the edges; and the target's own
    edges (its label edge, the mean of its cross edges per gate) as red lines."""
    edges: dict[int, dict[str, Any]] = {
        t: {k: e for r in rows for k in r if (e := parse_edge_key(k)) is not None and e.kind == kind}
        for t, rows in by_node.items()}
    gates = sorted({(e.source != e.target, e.gate) for keys in edges.values() for e in keys.values()},
                   key=lambda cg: (cg[0], list(GATE_COLORS).index(cg[1]) if cg[1] in GATE_COLORS else 99, cg[1]))
    colors = NODE_COLORS[1:]
    handles = []
    everything: list[float] = []
    for k, (cross, gate) in enumerate(gates):
        def keys_of(t, rows, cross=cross, gate=gate):
            return [key for key, e in edges[t].items() if (e.source != e.target) == cross and e.gate == gate]

        count = sum(len(keys_of(t, None)) for t in edges)
        what = f"{count} edges s\u2192t, s\u2260t" if cross else f"{count} label edges t\u2192t"
        values = _group_values(by_node, keys_of)
        everything += [v for vs in values.values() for v in vs]
        h = _band(ax, values, colors[k % len(colors)], f"{gate}, {what}: mean, min\u2013max", ms, "--" if cross else "-")
        if h:
            handles.append(h)
    for cross, gate in gates:  # the target's own edges
        keys = [key for key, e in edges.get(0, {}).items() if (e.source != e.target) == cross and e.gate == gate]
        values = _group_values({0: by_node[0]}, lambda t, rows, keys=keys: keys) if keys else {}
        epochs = sorted(values)
        if not epochs:
            continue
        (line,) = ax.plot(epochs, [sum(values[e]) / len(values[e]) for e in epochs], "--" if cross else "-",
                          marker="o", markersize=ms, linewidth=2.2, color=NODE_COLORS[0], zorder=5)
        what = f"{gate}, the target's {len(keys)} edges s\u21920: mean" if cross else f"{gate}, the target's label edge 0\u21920"
        handles.append((line, what))
    if kind == EDGE_LOSS and everything and min(everything) > 0 and max(everything) >= 20 * min(everything):
        ax.set_yscale("log")  # label edges' cross-entropy dwarfs many small KL terms
        ylabel += " (log scale)"
    ax.set_title(title, fontsize=11)
    ax.set_ylabel(ylabel)
    _int_epochs(ax)
    if handles:
        ax.legend(*zip(*handles), fontsize=8, framealpha=0.85)
    else:
        ax.text(0.5, 0.5, "no edge recorded", transform=ax.transAxes, ha="center", va="center", color="#777777")
    return bool(handles)


def draw_learning_curves(run_dir: Path, stem: Path, title: Optional[str] = None) -> list[Path]:
    """Panels from ``<run_dir>/metrics.jsonl``: train loss, validation and test accuracy per
    node (ensemble test accuracy dashed), the gated loss of every edge and, when recorded,
    every edge's mean gate weight. Writes ``<stem>.png`` and ``<stem>.svg``."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    if not rows:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} holds no epoch yet")
    by_node: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_node.setdefault(int(r["node"]), []).append(r)
    has_gates = any((e := parse_edge_key(k)) is not None and e.kind == GATE_WEIGHT for r in rows for k in r)
    ms = 3 if len({r["epoch"] for r in rows}) <= 40 else 0  # markers only where they can be told apart
    n_panels = 5 if has_gates else 4
    fig = _figure(13.5, 4.0 * math.ceil(n_panels / 2) + 0.6)
    axes = fig.subplots(math.ceil(n_panels / 2), 2, squeeze=False).ravel()
    if len(by_node) > LARGE:
        _summary_node_panels(axes, by_node, ms)
        _summary_edge_panel(axes[3], by_node, EDGE_LOSS, "gated loss of the edges s\u2192t by kind (mean per epoch)",
                            "gated loss", ms)
        if has_gates:
            _summary_edge_panel(axes[4], by_node, GATE_WEIGHT, "mean gate weight of the edges s\u2192t by kind",
                                "gate weight", ms)
    else:
        _node_panels(axes, by_node, ms)
        _edge_panel(axes[3], by_node, EDGE_LOSS, "gated loss of each edge s\u2192t (mean per epoch)", "gated loss", ms)
        if has_gates:
            _edge_panel(axes[4], by_node, GATE_WEIGHT, "mean gate weight of each edge s\u2192t", "gate weight", ms)
    for ax in axes[n_panels:]:
        ax.axis("off")
    if title is None:
        title = run_dir.resolve().name
        cfg = run_dir / "run_config.json"
        if cfg.is_file():
            try:
                g = json.loads(cfg.read_text()).get("graph", {})
                ds = json.loads(cfg.read_text()).get("dataset", {}).get("name")
                title += f"  (graph {g.get('name', '?')}" + (f", {ds})" if ds else ")")
            except (json.JSONDecodeError, AttributeError):
                pass
    fig.suptitle(title, fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return _save(fig, Path(stem), dpi=100)


# --- searches -----------------------------------------------------------------------------------


def asha_rungs(grace: int, rf: float, max_epochs: int) -> list[int]:
    """The epochs at which ASHA compares trials: grace * rf^k below max_epochs."""
    rungs, k = [], 0
    while grace * rf ** k < max_epochs:
        rungs.append(int(round(grace * rf ** k)))
        k += 1
    return rungs


def search_asha_params(search_dir: Path) -> dict[str, Any]:
    """grace_period, reduction_factor, max_epochs of a search, from its search_summary.json or
    else its .hydra/config.yaml (searches run by ``launch.py mode=search``); max_epochs also
    from a trial's run_config.json (train.epochs); missing keys are simply absent."""
    import yaml

    search_dir = Path(search_dir)
    keys = ("grace_period", "reduction_factor", "max_epochs")
    found: dict[str, Any] = {}
    summary = search_dir / "search_summary.json"
    if summary.is_file():
        try:
            data = json.loads(summary.read_text())
            found.update({k: data[k] for k in keys if isinstance(data.get(k), (int, float))})
        except json.JSONDecodeError:
            pass
    hydra = search_dir / ".hydra" / "config.yaml"
    if hydra.is_file() and len(found) < len(keys):
        try:
            s = (yaml.safe_load(hydra.read_text()) or {}).get("search") or {}
            for k in keys:
                if k not in found and isinstance(s.get(k), (int, float)):
                    found[k] = s[k]
        except yaml.YAMLError:
            pass
    if "max_epochs" not in found:  # every trial is laid out over the search's max_epochs
        for cfg in sorted(search_dir.glob("trial_*/run_config.json")):
            try:
                epochs = json.loads(cfg.read_text()).get("train", {}).get("epochs")
            except (json.JSONDecodeError, AttributeError):
                continue
            if isinstance(epochs, int):
                found["max_epochs"] = epochs
                break
    return found


def _trial_curve(trial_dir: Path) -> tuple[list[int], list[float]]:
    """Target (node 0) validation accuracy per epoch of one trial."""
    metrics = trial_dir / "metrics.jsonl"
    if metrics.is_file():
        rows = [r for r in read_metrics(metrics) if int(r["node"]) == 0]
        xs, ys = [], []
        for r in rows:
            v = r.get("val_acc")
            xs.append(int(r["epoch"]))
            ys.append(float(v) if isinstance(v, (int, float)) else 0.0)  # what the search reported
        if xs:
            return xs, ys
    result = trial_dir / "result.json"  # Tune's own record, for trials that left no metrics
    xs, ys = [], []
    if result.is_file():
        for line in result.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "epoch" in r and isinstance(r.get("target_val_acc"), (int, float)) and not r.get("invalid"):
                xs.append(int(r["epoch"]))
                ys.append(float(r["target_val_acc"]))
    return xs, ys


def _trial_desc(row: Optional[TrialRow]) -> str:
    """`` (<models>; gates <matrix>)`` of a trials.csv row, or for a graph of more than
    ``LARGE`` nodes a count of each (`` (16 nodes: 16 x convnet; gates 240 T, 16 X)``)."""
    if row is None or not row.models:
        return ""
    models = [m.strip() for m in row.models.split(",")]
    if len(models) <= LARGE:
        return f" ({row.models}; gates {row.gates})"
    counts: dict[str, int] = {}
    for name in models:
        counts[name] = counts.get(name, 0) + 1
    gates: dict[str, int] = {}
    for g in row.gates.replace("/", " ").split():
        gates[g] = gates.get(g, 0) + 1
    return (f" ({len(models)} nodes: {', '.join(f'{c} x {m}' for m, c in counts.items())}; gates "
            f"{', '.join(f'{c} {g}' for g, c in sorted(gates.items(), key=lambda gc: -gc[1]))})")


def draw_search(search_dir: Path, stem: Path, grace: Optional[int] = None, rf: Optional[float] = None,
                max_epochs: Optional[int] = None, title: Optional[str] = None) -> list[Path]:
    """Every trial's target validation accuracy per epoch, ASHA's rungs as dotted lines, the
    best trial highlighted: ``<stem>.png/.svg``; and the best graph (``best_graph.yaml``) as
    ``<stem>_best_graph.png/.svg``. ASHA's parameters come from the search folder (see
    ``search_asha_params``); ``grace``/``rf``/``max_epochs`` override them."""
    search_dir = Path(search_dir)
    stem = Path(stem)
    rows, summary, curves = _search_records(search_dir)
    grace, rf, max_epochs = _asha_schedule(search_dir, curves, grace, rf, max_epochs)
    best = summary.get("best_trial")
    if best not in curves:  # no summary (an interrupted search): choose as the search does
        best = _best_curve(curves, rows)

    fig = _figure(10.5, 6.0)
    ax = fig.add_subplot(1, 1, 1)
    counts = _plot_trials(ax, curves, rows, best, max_epochs)
    _epoch_axis(ax, grace, rf, max_epochs)
    _search_legend(ax, curves, rows, best, counts, grace, rf, max_epochs)
    if title is None:
        n = len(set(rows) | set(curves))
        title = f"search {search_dir.resolve().name}: {n} trials" + (
            f" ({len(curves)} with a recorded epoch)" if len(curves) < n else "")
    ax.set_title(title, fontsize=12, pad=22)
    fig.tight_layout()
    paths = _save(fig, stem)

    best_yaml = search_dir / "best_graph.yaml"
    if best_yaml.is_file():
        graph = load_graph_file(best_yaml)
        acc = summary.get("best_val_acc")
        paths += draw_graph(graph, stem.parent / f"{stem.name}_best_graph",
                            title=f"best graph of {search_dir.resolve().name}"
                                  + (f"\n{best}: target val acc {acc:.1f}" if isinstance(acc, (int, float)) else ""))
    return paths


Curves = dict[str, tuple[list[int], list[float]]]
"""A search's trials' curves: trial folder name -> (epochs, target val accuracies)."""


def _search_records(search_dir: Path) -> tuple[dict[str, TrialRow], dict[str, Any], Curves]:
    """What a search folder records: its trials.csv rows by trial, its search_summary.json
    (empty when absent or unreadable), and the curve of every trial with an epoch."""
    rows: dict[str, TrialRow] = {}
    if (search_dir / "trials.csv").is_file():
        rows = {r.trial: r for r in read_trials(search_dir / "trials.csv") if r.trial}
    summary: dict[str, Any] = {}
    if (search_dir / "search_summary.json").is_file():
        try:
            summary = json.loads((search_dir / "search_summary.json").read_text())
        except json.JSONDecodeError:
            summary = {}
    curves = {}
    for d in sorted(search_dir.glob("trial_*")):
        if d.is_dir():
            xs, ys = _trial_curve(d)
            if xs:
                curves[d.name] = (xs, ys)
    if not curves:
        raise ValueError(f"{search_dir}: no trial_*/metrics.jsonl with an epoch in it: nothing to draw")
    return rows, summary, curves


def _asha_schedule(search_dir: Path, curves: Curves, grace: Optional[int], rf: Optional[float],
                   max_epochs: Optional[int]) -> tuple[int, float, int]:
    """ASHA's grace period, reduction factor and max epochs: those given, else as the search
    recorded them (``search_asha_params``), else 1, 2 and the longest trial."""
    asha = search_asha_params(search_dir)
    grace = int(grace if grace is not None else asha.get("grace_period", 1))
    rf = float(rf if rf is not None else asha.get("reduction_factor", 2))
    max_epochs = int(max_epochs if max_epochs is not None else
                     asha.get("max_epochs", max(max(xs) for xs, _ in curves.values())))
    if rf == int(rf):
        rf = int(rf)
    return grace, rf, max_epochs


def _best_curve(curves: Curves, rows: dict[str, TrialRow]) -> str:
    """The best trial as the search chooses it: the highest last accuracy among the trials
    that trained longest, failed ones excluded."""
    ok = [t for t in curves if not (rows[t].status if t in rows else "").startswith(("failed", "invalid"))]
    ok = ok or list(curves)
    top = max(curves[t][0][-1] for t in ok)
    return max((t for t in ok if curves[t][0][-1] == top), key=lambda t: curves[t][1][-1])


def _plot_trials(ax, curves: Curves, rows: dict[str, TrialRow], best: str, max_epochs: int) -> dict[str, int]:
    """Every trial's curve, coloured by how it ended (the best one last, on top); returns
    how many of the others completed, were stopped, failed."""
    counts = {"completed": 0, "stopped": 0, "failed": 0}
    short = max_epochs <= 40  # a marker per epoch only where they can be told apart
    for name, (xs, ys) in sorted(curves.items(), key=lambda kv: kv[0] == best):
        status = rows[name].status if name in rows else ""
        if not status:
            status = "completed" if xs[-1] >= max_epochs else "stopped by ASHA"
        if name == best:
            continue
        if status.startswith("failed"):
            color, end, kind = "#c0392b", "X", "failed"
        elif status.startswith("stopped") or xs[-1] < max_epochs:
            color, end, kind = "#7f8c8d", "x", "stopped"
        else:
            color, end, kind = "#2e86c1", "o", "completed"
        counts[kind] += 1
        (line,) = ax.plot(xs, ys, "-", color=color, alpha=0.55, linewidth=1.2, marker=".", markersize=4 if short else 0)
        line.set_gid(name)
        ax.plot(xs[-1:], ys[-1:], end, color=color, markersize=7, alpha=0.9)
    xs, ys = curves[best]
    (line,) = ax.plot(xs, ys, "-", color="#e67e22", linewidth=3, marker="o", markersize=4 if short else 0, zorder=5)
    line.set_gid(best)
    ax.plot(xs[-1:], ys[-1:], "*", color="#e67e22", markersize=16, zorder=6, markeredgecolor="#7e3f00")
    return counts


def _epoch_axis(ax, grace: int, rf: float, max_epochs: int) -> None:
    """ASHA's rungs as dotted lines; the epoch axis in log scale when the rungs span
    4 or more factors of ``rf``; the axis labels."""
    from matplotlib.transforms import blended_transform_factory

    rungs = asha_rungs(grace, rf, max_epochs)
    use_log = max_epochs / grace >= rf ** 4
    trans = blended_transform_factory(ax.transData, ax.transAxes)
    for k, e in enumerate(rungs):
        ax.axvline(e, color="#555555", linestyle=":", linewidth=1.2, zorder=1)
        ax.text(e, 1.01, f"rung {k}", transform=trans, rotation=0 if len(rungs) <= 8 or not use_log else 90,
                ha="center", va="bottom", fontsize=8.5, color="#333333")
    if use_log:
        from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

        ax.set_xscale("log", base=2)
        ax.set_xlim(0.9, max_epochs * 1.1)
        ax.xaxis.set_major_locator(FixedLocator(sorted({*rungs, max_epochs})))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(0.7, max_epochs + 0.3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("target (node 0) validation accuracy (%)")
    ax.grid(True, alpha=0.25)


def _search_legend(ax, curves: Curves, rows: dict[str, TrialRow], best: str, counts: dict[str, int], grace: int,
                   rf: float, max_epochs: int) -> None:
    """The legend under the search picture: the best trial (its graph described), the count
    of each kind of other trial, the trials that failed before an epoch, ASHA's rungs."""
    from matplotlib.lines import Line2D

    desc = _trial_desc(rows.get(best))
    handles = [Line2D([], [], color="#e67e22", linewidth=3, marker="*", markersize=12,
                      label=f"best: {best}, val {curves[best][1][-1]:.1f}{desc}")]
    labels = {"completed": ("#2e86c1", "o", "ran all epochs"), "stopped": ("#7f8c8d", "x", "stopped by ASHA"),
              "failed": ("#c0392b", "X", "failed")}
    for kind, count in counts.items():
        if count:
            color, marker, text = labels[kind]
            handles.append(Line2D([], [], color=color, marker=marker, alpha=0.8, label=f"{text} ({count})"))
    # trials that failed before their first epoch have no line; the legend still counts them
    no_curve = [t for t, r in rows.items() if t not in curves and r.status.startswith("failed")]
    if no_curve:
        handles.append(Line2D([], [], color="#c0392b", marker="X", linestyle="none",
                              label=f"failed before their first epoch ({len(no_curve)})"))
    handles.append(Line2D([], [], color="#555555", linestyle=":",
                          label=f"ASHA rungs: grace {grace} \u00d7 {rf}^k epochs (max {max_epochs})"))
    ax.legend(handles=handles, fontsize=8.5, loc="upper center", bbox_to_anchor=(0.5, -0.11), ncol=2, frameon=False)
