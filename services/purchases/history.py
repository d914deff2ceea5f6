"""Reading imported history (JSON lines or CSV in the inbound purchase contract) and
checking it with the purchases domain's own rules. Pure: files are read, nothing is sent.

Each input is yielded with the byte offset where the *next* input starts, so an importer can
checkpoint after what the broker acknowledged and resume there."""

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, BinaryIO, Literal

from services.purchases import domain
from services.purchases.domain import PurchaseIn, Rejection

Policy = Literal["analytics", "as-earned"]
POLICIES: tuple[Policy, ...] = ("analytics", "as-earned")

# A purchase's columns, then a line's: one CSV row per line item; the rows of one purchase
# are consecutive and share the purchase columns.
PURCHASE_COLUMNS = ("purchase_id", "type", "original_purchase_id", "source", "store_id", "customer_id",
                    "occurred_at", "currency", "total")
LINE_COLUMNS = ("line_id", "sku", "category", "quantity", "unit_price", "discount")
CSV_COLUMNS = PURCHASE_COLUMNS + LINE_COLUMNS
_OPTIONAL = {"original_purchase_id", "customer_id", "discount"}


@dataclass(frozen=True)
class Row:
    """One input: the purchase as a dict in the contract (or why it cannot be one), where it
    was read (`line`, 1-based; for CSV the first row of the purchase) and where the next
    input starts (`next_offset`)."""

    line: int
    next_offset: int
    data: dict[str, Any] | None
    refusal: Rejection | None = None
    raw: bytes | None = None  # JSON lines: the line as read, sent as it is once it passed the checks
    next_line: int = 0  # the line number at next_offset (for a resumed import's line numbers)


def detect_format(path: str) -> Literal["jsonl", "csv"]:
    return "csv" if path.lower().endswith(".csv") else "jsonl"


def read_jsonl(f: BinaryIO, *, start_offset: int = 0, start_line: int = 1) -> Iterator[Row]:
    f.seek(start_offset)
    offset, line_no = start_offset, start_line
    for raw in iter(f.readline, b""):
        offset += len(raw)
        line_no += 1
        text = raw.strip()
        if not text:
            continue
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            yield Row(line_no - 1, offset, None, Rejection("malformed_json", [
                {"loc": [], "msg": "line is not valid JSON", "type": "json_invalid"}]), next_line=line_no)
            continue
        if not isinstance(data, dict):
            yield Row(line_no - 1, offset, None, Rejection("schema", [
                {"loc": [], "msg": "a line must be a JSON object", "type": "object_type"}]), next_line=line_no)
            continue
        yield Row(line_no - 1, offset, data, raw=text, next_line=line_no)


class _Lines:
    """Feeds csv.reader line by line and remembers where each line ended, so every CSV row
    (which may span lines inside quotes) knows the byte offset after it."""

    def __init__(self, f: BinaryIO, offset: int) -> None:
        self._f, self.offset, self.lines = f, offset, 0

    def __iter__(self) -> "_Lines":
        return self

    def __next__(self) -> str:
        raw = self._f.readline()
        if not raw:
            raise StopIteration
        self.offset += len(raw)
        self.lines += 1
        return raw.decode("utf-8-sig" if self.lines == 1 and self.offset == len(raw) else "utf-8",
                          errors="replace")


def read_csv(f: BinaryIO, *, start_offset: int = 0, start_line: int = 1) -> Iterator[Row]:
    """CSV with a header row naming CSV_COLUMNS (any order; optional ones may be missing).
    Consecutive rows with the same (source, store_id, purchase_id) are one purchase."""
    f.seek(0)
    header_src = _Lines(f, 0)
    header = next(csv.reader(header_src), None)
    if header is None:
        return
    header = [h.strip() for h in header]
    missing = [c for c in CSV_COLUMNS if c not in header and c not in _OPTIONAL]
    unknown = [c for c in header if c not in CSV_COLUMNS]
    if missing or unknown:
        raise ValueError(f"CSV header: missing columns {missing}, unknown columns {unknown}; "
                         f"expected {', '.join(CSV_COLUMNS)}")
    header_end = header_src.offset
    src = _Lines(f, max(start_offset, header_end))
    f.seek(src.offset)
    line_base = start_line if start_offset > header_end else 2
    reader = csv.reader(src)
    group: list[tuple[int, dict[str, str]]] = []
    group_end, group_end_line = src.offset, line_base
    while True:
        line_no = line_base + src.lines
        cells = next(reader, None)
        row = dict(zip(header, (c.strip() for c in cells))) if cells is not None else None
        if row is not None and not any(row.values()):
            continue
        if group and (row is None or _key(row) != _key(group[0][1])):
            yield _purchase_of(group, group_end, group_end_line)
            group = []
        if row is None:
            return
        if len(cells) != len(header):
            yield Row(line_no, src.offset, None, Rejection("schema", [
                {"loc": [], "msg": f"row has {len(cells)} cells, the header {len(header)}", "type": "csv_row"}]),
                next_line=line_base + src.lines)
            continue
        group.append((line_no, row))
        group_end, group_end_line = src.offset, line_base + src.lines


def _key(row: dict[str, str]) -> tuple[str, str, str]:
    return (row.get("source", ""), row.get("store_id", ""), row.get("purchase_id", ""))


def _purchase_of(group: list[tuple[int, dict[str, str]]], next_offset: int, next_line: int) -> Row:
    line_no, first = group[0]
    for other_line, other in group[1:]:
        differing = [c for c in PURCHASE_COLUMNS if (other.get(c) or "") != (first.get(c) or "")]
        if differing:
            return Row(line_no, next_offset, None, Rejection("csv_inconsistent", [
                {"loc": differing, "type": "csv_inconsistent",
                 "msg": f"line {other_line} differs from line {line_no} in {', '.join(differing)}"}]),
                       next_line=next_line)
    data: dict[str, Any] = {c: (first.get(c) or None) for c in PURCHASE_COLUMNS}
    data["lines"] = [{"line_id": r.get("line_id", ""), "sku": r.get("sku", ""), "category": r.get("category", ""),
                      "quantity": _int(r.get("quantity", "")), "unit_price": r.get("unit_price", ""),
                      "discount": r.get("discount") or "0"} for _, r in group]
    return Row(line_no, next_offset, data, next_line=next_line)


def _int(text: str) -> int | str:
    try:
        return int(text)
    except ValueError:
        return text  # the schema refuses it with its own message


def read_rows(path: str, f: BinaryIO, *, start_offset: int = 0, start_line: int = 1) -> Iterator[Row]:
    reader = read_csv if detect_format(path) == "csv" else read_jsonl
    return reader(f, start_offset=start_offset, start_line=start_line)


def check_history(data: dict[str, Any], *, now: datetime, max_clock_skew_s: int) -> PurchaseIn | Rejection:
    """The purchases service's own checks for history: the schema, the currency, the total,
    no future dates; no age limit (history is old by nature)."""
    parsed = domain.parse_purchase(data)
    if isinstance(parsed, Rejection):
        return parsed
    return domain.check_purchase(parsed, now=now, max_clock_skew_s=max_clock_skew_s, max_age_days=None) or parsed


def contract_json(p: PurchaseIn) -> bytes:
    """The purchase as the inbound contract writes it (money as decimal strings)."""
    return p.model_dump_json(exclude_none=False).encode()


@dataclass
class Tally:
    """What an import did: purchases sent, refused by reason (with the first examples)."""

    sent: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)
    max_examples: int = 20

    def refuse(self, row: Row, rejection: Rejection) -> dict[str, Any]:
        self.refused[rejection.reason] = self.refused.get(rejection.reason, 0) + 1
        entry = {"line": row.line, "reason": rejection.reason, "errors": rejection.errors,
                 "purchase_id": (row.data or {}).get("purchase_id")}
        if len(self.examples) < self.max_examples:
            self.examples.append(entry)
        return entry

    @property
    def refused_total(self) -> int:
        return sum(self.refused.values())
