"""The dashboard's SVG charts: well-formed, labelled, values on the marks, an empty state."""

import xml.etree.ElementTree as ET

from services.churn import charts
from services.churn.charts import MatrixCell, Series

NS = {"s": "http://www.w3.org/2000/svg"}


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)


def texts(root: ET.Element) -> list[str]:
    return ["".join(t.itertext()) for t in root.iter("{http://www.w3.org/2000/svg}text")]


def test_line_chart_has_a_point_per_value_labelled_axes_and_gaps_for_missing_data():
    svg = parse(charts.line_chart("Retention", ["2026-01", "2026-02", "2026-03"],
                                  [Series("retention", [90.0, None, 80.5]), Series("churn", [10.0, 12.0, 19.5])],
                                  y_label="rate", unit="%", y_max=100))
    points = svg.findall(".//s:circle[@class='point']", NS)
    assert [(p.get("data-series"), p.get("data-x"), float(p.get("data-value"))) for p in points] == [
        ("retention", "2026-01", 90.0), ("retention", "2026-03", 80.5),
        ("churn", "2026-01", 10.0), ("churn", "2026-02", 12.0), ("churn", "2026-03", 19.5)]
    retention_path = svg.find(".//s:path[@data-series='retention']", NS).get("d")
    assert retention_path.count("M") == 2  # the gap starts a new stroke
    labels = texts(svg)
    assert "rate (%)" in labels and "2026-02" in labels and "100%" in labels and "retention" in labels


def test_empty_charts_say_so():
    for svg in (charts.line_chart("x", [], [], y_label="y"), charts.bar_chart("x", ["a"], [Series("s", [None])],
                                                                                  x_label="y"),
                charts.heat_map("x", ["r"], ["c"], [[0]], x_label="a", y_label="b"),
                charts.cohort_triangle("x", []),
                charts.loyalty_matrix("x", **{k: MatrixCell(k, k, 0, []) for k in
                                              ("top_left", "top_right", "bottom_left", "bottom_right")},
                                      x_label="l", y_label="p")):
        root = parse(svg)
        assert root.find(".//s:text[@class='empty']", NS) is not None


def test_bar_chart_bars_carry_values_and_escape_labels():
    svg = charts.bar_chart("Factors <before> leaving", ["open complaint", "tier & lost"],
                           [Series("lost", [50.0, 20.0]), Series("retained", [10.0, None])], x_label="share", unit="%")
    root = parse(svg)  # parses: the "<" and "&" were escaped
    bars = root.findall(".//s:rect[@class='bar']", NS)
    assert [(b.get("data-label"), b.get("data-series"), b.get("data-value")) for b in bars] == [
        ("open complaint", "lost", "50.0000"), ("open complaint", "retained", "10.0000"),
        ("tier & lost", "lost", "20.0000"), ("tier & lost", "retained", "")]
    assert float(bars[0].get("width")) == 5 * float(bars[1].get("width"))
    assert "share (%)" in texts(root)


def test_heat_map_shades_by_value_and_writes_the_numbers():
    root = parse(charts.heat_map("RFM", ["R5", "R1"], ["F1", "F5"], [[3, 0], [10, None]],
                                 x_label="frequency score", y_label="recency score"))
    cells = {(c.get("data-row"), c.get("data-col")): c for c in root.findall(".//s:rect[@class='cell']", NS)}
    assert set(cells) == {("R5", "F1"), ("R5", "F5"), ("R1", "F1")}
    assert cells[("R1", "F1")].get("fill") == "rgb(30,64,175)"  # the largest is the darkest
    assert cells[("R5", "F5")].get("fill") == "rgb(255,255,255)"
    assert {"3", "10", "frequency score", "↓ recency score"} <= set(texts(root))


def test_loyalty_matrix_shows_each_quadrant_count():
    root = parse(charts.loyalty_matrix(
        "Loyalty matrix", top_left=MatrixCell("butterfly", "Butterflies", 3, ["revenue 10 PLN"]),
        top_right=MatrixCell("true_friend", "True friends", 5, []),
        bottom_left=MatrixCell("stranger", "Strangers", 7, []), bottom_right=MatrixCell("barnacle", "Barnacles", 1, []),
        x_label="loyalty", y_label="profitability"))
    quads = {q.get("data-quadrant"): int(q.get("data-customers")) for q in root.findall(".//s:rect[@class='quadrant']", NS)}
    assert quads == {"butterfly": 3, "true_friend": 5, "stranger": 7, "barnacle": 1}
    assert {"Butterflies", "5", "revenue 10 PLN"} <= set(texts(root))


def test_cohort_triangle_has_one_cell_fewer_per_later_cohort():
    root = parse(charts.cohort_triangle("Cohorts", [("2026-01", 2, [1.0, 0.5, 1.0]), ("2026-02", 1, [1.0, 0.0])]))
    cells = root.findall(".//s:rect[@class='cell']", NS)
    assert [(c.get("data-row"), c.get("data-col"), c.get("data-value")) for c in cells] == [
        ("2026-01 (n=2)", "0", "100"), ("2026-01 (n=2)", "1", "50"), ("2026-01 (n=2)", "2", "100"),
        ("2026-02 (n=1)", "0", "100"), ("2026-02 (n=1)", "1", "0")]
    assert "cohorts" in root.get("class") and "50%" in texts(root)


def test_a_dashboard_session_is_signed_with_the_admin_key_and_expires():
    from services.churn.dashboard_auth import session_valid, session_value

    value = session_value("key-1", now=1000, ttl_s=60)
    assert session_valid(value, "key-1", now=1059)
    assert not session_valid(value, "key-1", now=1061)  # expired
    assert not session_valid(value, "key-2", now=1000)  # the key changed: every session ends
    expires, signature = value.split(".")
    assert not session_valid(f"{int(expires) + 3600}.{signature}", "key-1", now=1000)  # a longer life is forged
    assert not session_valid("garbage", "key-1") and not session_valid(value, None, now=1000)
