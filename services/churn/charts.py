"""Server-side SVG charts for the dashboard: line chart, horizontal bar chart, heat map, the
2x2 loyalty matrix and the cohort triangle. Pure functions returning an SVG string; every
text is escaped; every mark carries its value in a data- attribute (and a <title> a person
sees on hover), so tests read numbers off the chart rather than guess at pixels."""

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

FONT = "font-family='system-ui, sans-serif'"
PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c")


def _t(value: object) -> str:
    return escape(str(value), quote=True)


def _svg(width: int, height: int, title: str, body: list[str], css_class: str) -> str:
    return (f"<svg xmlns='http://www.w3.org/2000/svg' class='chart {css_class}' role='img' "
            f"aria-label='{_t(title)}' viewBox='0 0 {width} {height}' width='{width}' height='{height}' {FONT}>"
            f"<title>{_t(title)}</title>{''.join(body)}</svg>")


def _empty(width: int, height: int, title: str, css_class: str, message: str) -> str:
    text = (f"<text class='empty' x='{width / 2}' y='{height / 2}' text-anchor='middle' font-size='14' "
            f"fill='#6b7280'>{_t(message)}</text>")
    return _svg(width, height, title, [text], css_class)


@dataclass(frozen=True, slots=True)
class Series:
    name: str
    values: Sequence[float | None]  # None: no data for that point (a gap in the line)


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    for step in (1, 2, 2.5, 5, 10):
        magnitude = 10 ** (len(str(int(value))) - 1) if value >= 1 else 1
        if value <= step * magnitude:
            return step * magnitude
    return value


def line_chart(title: str, x_labels: Sequence[str], series: Sequence[Series], *, y_label: str, unit: str = "",
               y_min: float = 0.0, y_max: float | None = None, width: int = 640, height: int = 260,
               empty_message: str = "No data yet") -> str:
    """Lines over categories (months); the y axis is labelled with `y_label` and `unit`."""
    points = [v for s in series for v in s.values if v is not None]
    if not x_labels or not points:
        return _empty(width, height, title, "line-chart", empty_message)
    top = y_max if y_max is not None else _nice_max(max(points))
    left, right, upper, lower = 56, 16, 28, 48
    plot_w, plot_h = width - left - right, height - upper - lower
    step = plot_w / max(len(x_labels) - 1, 1)

    def x(i: int) -> float:
        return left + i * step

    def y(v: float) -> float:
        return upper + plot_h * (1 - (v - y_min) / ((top - y_min) or 1))

    body = [f"<text x='{left}' y='16' font-size='13' font-weight='600'>{_t(title)}</text>"]
    for k in range(5):
        v = y_min + (top - y_min) * k / 4
        body.append(f"<line x1='{left}' x2='{width - right}' y1='{y(v):.1f}' y2='{y(v):.1f}' stroke='#e5e7eb'/>"
                    f"<text class='y-tick' x='{left - 6}' y='{y(v) + 4:.1f}' font-size='10' text-anchor='end'>"
                    f"{_t(_fmt(v))}{_t(unit)}</text>")
    every = max(1, -(-len(x_labels) // 8))  # at most ~8 labels: legible at 640 px
    for i, label in enumerate(x_labels):
        if i % every == 0 or i == len(x_labels) - 1:
            body.append(f"<text class='x-tick' x='{x(i):.1f}' y='{height - lower + 16}' font-size='10' "
                        f"text-anchor='middle'>{_t(label)}</text>")
    body.append(f"<text class='axis-label' x='14' y='{upper + plot_h / 2:.1f}' font-size='11' text-anchor='middle' "
                f"transform='rotate(-90 14 {upper + plot_h / 2:.1f})'>{_t(y_label)}"
                f"{' (' + _t(unit) + ')' if unit else ''}</text>")
    for n, s in enumerate(series):
        colour = PALETTE[n % len(PALETTE)]
        path, pen_up = [], True
        for i, v in enumerate(s.values):
            if v is None:
                pen_up = True
                continue
            path.append(f"{'M' if pen_up else 'L'}{x(i):.1f},{y(v):.1f}")
            pen_up = False
        body.append(f"<path class='series' data-series='{_t(s.name)}' d='{' '.join(path)}' fill='none' "
                    f"stroke='{colour}' stroke-width='2'/>")
        for i, v in enumerate(s.values):
            if v is not None:
                body.append(f"<circle class='point' data-series='{_t(s.name)}' data-x='{_t(x_labels[i])}' "
                            f"data-value='{v:.4f}' cx='{x(i):.1f}' cy='{y(v):.1f}' r='3' fill='{colour}'>"
                            f"<title>{_t(s.name)} {_t(x_labels[i])}: {_t(_fmt(v))}{_t(unit)}</title></circle>")
        legend_x = left + n * 150
        body.append(f"<rect x='{legend_x}' y='{height - 18}' width='10' height='10' fill='{colour}'/>"
                    f"<text class='legend' x='{legend_x + 14}' y='{height - 9}' font-size='11'>{_t(s.name)}</text>")
    return _svg(width, height, title, body, "line-chart")


def bar_chart(title: str, labels: Sequence[str], series: Sequence[Series], *, x_label: str, unit: str = "",
              x_max: float | None = None, width: int = 640, empty_message: str = "No data yet") -> str:
    """Horizontal grouped bars, one group per label (e.g. a factor: lost vs retained)."""
    values = [v for s in series for v in s.values if v is not None]
    bar_h, gap, left, right, upper = 12, 10, 170, 60, 28
    height = upper + len(labels) * (len(series) * bar_h + gap) + 44
    if not labels or not values:
        return _empty(width, 200, title, "bar-chart", empty_message)
    top = x_max if x_max is not None else _nice_max(max(values))
    plot_w = width - left - right
    body = [f"<text x='8' y='16' font-size='13' font-weight='600'>{_t(title)}</text>"]
    for i, label in enumerate(labels):
        y0 = upper + i * (len(series) * bar_h + gap)
        body.append(f"<text class='bar-label' x='{left - 6}' y='{y0 + len(series) * bar_h / 2 + 4}' font-size='11' "
                    f"text-anchor='end'>{_t(label)}</text>")
        for n, s in enumerate(series):
            v = s.values[i]
            w = 0 if v is None else plot_w * v / top
            yb = y0 + n * bar_h
            body.append(f"<rect class='bar' data-label='{_t(label)}' data-series='{_t(s.name)}' "
                        f"data-value='{'' if v is None else f'{v:.4f}'}' x='{left}' y='{yb}' width='{w:.1f}' "
                        f"height='{bar_h - 2}' fill='{PALETTE[n % len(PALETTE)]}'><title>{_t(s.name)}, {_t(label)}: "
                        f"{'no data' if v is None else _t(_fmt(v)) + _t(unit)}</title></rect>"
                        f"<text x='{left + w + 4:.1f}' y='{yb + bar_h - 3}' font-size='10'>"
                        f"{'–' if v is None else _t(_fmt(v)) + _t(unit)}</text>")
    axis_y = height - 40
    body.append(f"<line x1='{left}' x2='{left + plot_w}' y1='{axis_y}' y2='{axis_y}' stroke='#9ca3af'/>")
    for k in range(5):
        v = top * k / 4
        body.append(f"<text class='x-tick' x='{left + plot_w * k / 4:.1f}' y='{axis_y + 14}' font-size='10' "
                    f"text-anchor='middle'>{_t(_fmt(v))}{_t(unit)}</text>")
    body.append(f"<text class='axis-label' x='{left + plot_w / 2}' y='{axis_y + 30}' font-size='11' "
                f"text-anchor='middle'>{_t(x_label)}{' (' + _t(unit) + ')' if unit else ''}</text>")
    for n, s in enumerate(series):
        body.append(f"<rect x='{8 + n * 120}' y='{height - 12}' width='10' height='10' fill='{PALETTE[n]}'/>"
                    f"<text class='legend' x='{22 + n * 120}' y='{height - 3}' font-size='11'>{_t(s.name)}</text>")
    return _svg(width, height, title, body, "bar-chart")


def _shade(share: float) -> str:
    """White to deep blue; text turns white on the dark end."""
    share = min(max(share, 0.0), 1.0)
    r, g, b = (int(255 - (255 - c) * share) for c in (30, 64, 175))
    return f"rgb({r},{g},{b})"


def heat_map(title: str, row_labels: Sequence[str], col_labels: Sequence[str], cells: Sequence[Sequence[float | None]],
             *, x_label: str, y_label: str, cell_text: Sequence[Sequence[str]] | None = None, cell: int = 44,
             empty_message: str = "No data yet") -> str:
    """A grid of shaded cells (shade by value / max); `cell_text` overrides what is written."""
    values = [v for row in cells for v in row if v is not None]
    left, upper = 110, 56
    width, height = left + cell * len(col_labels) + 16, upper + cell * len(row_labels) + 44
    if not values or not any(values):
        return _empty(max(width, 320), max(height, 160), title, "heat-map", empty_message)
    top = max(values) or 1
    body = [f"<text x='8' y='16' font-size='13' font-weight='600'>{_t(title)}</text>"]
    for j, label in enumerate(col_labels):
        body.append(f"<text class='x-tick' x='{left + j * cell + cell / 2}' y='{upper - 6}' font-size='10' "
                    f"text-anchor='middle'>{_t(label)}</text>")
    for i, label in enumerate(row_labels):
        body.append(f"<text class='y-tick' x='{left - 6}' y='{upper + i * cell + cell / 2 + 4}' font-size='10' "
                    f"text-anchor='end'>{_t(label)}</text>")
        for j, v in enumerate(cells[i]):
            if v is None:
                continue
            text = cell_text[i][j] if cell_text else _fmt(v)
            dark = v / top > 0.55
            body.append(f"<rect class='cell' data-row='{_t(label)}' data-col='{_t(col_labels[j])}' data-value='{v:g}' "
                        f"x='{left + j * cell}' y='{upper + i * cell}' width='{cell - 2}' height='{cell - 2}' "
                        f"fill='{_shade(v / top)}'><title>{_t(y_label)} {_t(label)}, {_t(x_label)} "
                        f"{_t(col_labels[j])}: {_t(text)}</title></rect>"
                        f"<text x='{left + j * cell + cell / 2 - 1}' y='{upper + i * cell + cell / 2 + 3}' "
                        f"font-size='10' text-anchor='middle' fill='{'#fff' if dark else '#111'}'>{_t(text)}</text>")
    body.append(f"<text class='axis-label' x='{left + cell * len(col_labels) / 2}' y='{height - 12}' font-size='11' "
                f"text-anchor='middle'>{_t(x_label)}</text>"
                f"<text class='axis-label' x='8' y='{upper - 24}' font-size='11'>↓ {_t(y_label)}</text>")
    return _svg(width, height, title, body, "heat-map")


@dataclass(frozen=True, slots=True)
class MatrixCell:
    key: str  # the quadrant
    label: str
    customers: int
    lines: Sequence[str]  # extra lines (revenue, margin)


def loyalty_matrix(title: str, *, top_left: MatrixCell, top_right: MatrixCell, bottom_left: MatrixCell,
                   bottom_right: MatrixCell, x_label: str, y_label: str, size: int = 420,
                   empty_message: str = "No customers yet") -> str:
    """The 2x2 matrix: x = loyalty (low | high), y = profitability (high on top)."""
    cells = (top_left, top_right, bottom_left, bottom_right)
    total = sum(c.customers for c in cells)
    if total == 0:
        return _empty(size, size, title, "matrix", empty_message)
    left, upper, half = 40, 28, (size - 56) / 2
    body = [f"<text x='8' y='16' font-size='13' font-weight='600'>{_t(title)}</text>"]
    for n, c in enumerate(cells):
        x0, y0 = left + (n % 2) * half, upper + (n // 2) * half
        share = c.customers / total
        body.append(f"<rect class='quadrant' data-quadrant='{_t(c.key)}' data-customers='{c.customers}' x='{x0}' "
                    f"y='{y0}' width='{half - 2}' height='{half - 2}' fill='{_shade(0.12 + 0.6 * share)}' "
                    f"stroke='#1f2937'><title>{_t(c.label)}: {c.customers} customers</title></rect>"
                    f"<text x='{x0 + half / 2}' y='{y0 + 26}' font-size='14' font-weight='600' text-anchor='middle' "
                    f"fill='{'#fff' if share > 0.55 else '#111'}'>{_t(c.label)}</text>"
                    f"<text class='count' x='{x0 + half / 2}' y='{y0 + half / 2}' font-size='22' text-anchor='middle' "
                    f"fill='{'#fff' if share > 0.55 else '#111'}'>{c.customers}</text>")
        for k, line in enumerate(c.lines):
            body.append(f"<text x='{x0 + half / 2}' y='{y0 + half / 2 + 22 + 14 * k}' font-size='11' "
                        f"text-anchor='middle' fill='{'#fff' if share > 0.55 else '#111'}'>{_t(line)}</text>")
    body.append(f"<text class='axis-label' x='{left + half}' y='{size - 6}' font-size='11' text-anchor='middle'>"
                f"{_t(x_label)} → (low | high)</text>"
                f"<text class='axis-label' x='14' y='{upper + half}' font-size='11' text-anchor='middle' "
                f"transform='rotate(-90 14 {upper + half})'>{_t(y_label)} → (low | high)</text>")
    return _svg(size, size, title, body, "matrix")


def cohort_triangle(title: str, cohorts: Sequence[tuple[str, int, Sequence[float]]], *, cell: int = 34,
                    empty_message: str = "No purchases yet") -> str:
    """Rows: (first-purchase month, customers, share buying in month 0, 1, ...); a triangle."""
    if not cohorts:
        return _empty(480, 160, title, "cohorts", empty_message)
    months = max(len(shares) for _, _, shares in cohorts)
    rows = [f"{month} (n={n})" for month, n, _ in cohorts]
    cells = [[shares[k] * 100 if k < len(shares) else None for k in range(months)] for _, _, shares in cohorts]
    text = [[f"{v:.0f}%" if v is not None else "" for v in row] for row in cells]
    svg = heat_map(title, rows, [str(k) for k in range(months)], cells, x_label="months after the first purchase",
                   y_label="first purchase", cell_text=text, cell=cell)
    return svg.replace("class='chart heat-map'", "class='chart heat-map cohorts'", 1)


def _fmt(value: float) -> str:
    if abs(value) >= 100 or value == int(value):
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
