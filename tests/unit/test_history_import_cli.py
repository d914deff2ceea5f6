"""The history importer's reading and checking (no broker: --dry-run and the reader)."""

import asyncio
import io
import json
from datetime import datetime, timezone

from services.purchases import history, importer
from services.purchases.domain import PurchaseIn, Rejection
from services.purchases.settings import PurchasesSettings

NOW = datetime(2026, 12, 7, 12, tzinfo=timezone.utc)


def sale(pid: str, store: str = "store-1", occurred: str = "2025-06-01T10:00:00+02:00", **over) -> dict:
    return {"purchase_id": pid, "type": "sale", "original_purchase_id": None, "source": "pos", "store_id": store,
            "customer_id": "c-1", "occurred_at": occurred, "currency": "PLN", "total": "25.00",
            "lines": [{"line_id": "1", "sku": "A", "category": "grocery", "quantity": 2, "unit_price": "12.50",
                       "discount": "0.00"}], **over}


CSV = (
    "purchase_id,type,original_purchase_id,source,store_id,customer_id,occurred_at,currency,total,"
    "line_id,sku,category,quantity,unit_price,discount\n"
    "r-1,sale,,pos,store-1,c-1,2025-06-01T10:00:00+00:00,PLN,30.00,1,A,grocery,2,10.00,0\n"
    "r-1,sale,,pos,store-1,c-1,2025-06-01T10:00:00+00:00,PLN,30.00,2,B,grocery,1,10.00,0\n"
    "r-1,sale,,pos,store-2,c-2,2025-06-02T10:00:00+00:00,PLN,5.00,1,A,grocery,1,5.00,0\n"
    "r-2,sale,,pos,store-1,c-1,2025-06-03T10:00:00+00:00,PLN,9.00,1,A,grocery,1,5.00,0\n"
)


def test_csv_rows_of_one_purchase_make_one_purchase_and_the_store_separates_receipts():
    rows = list(history.read_csv(io.BytesIO(CSV.encode())))
    assert [r.data["store_id"] for r in rows] == ["store-1", "store-2", "store-1"]
    assert [len(r.data["lines"]) for r in rows] == [2, 1, 1]
    assert rows[0].line == 2 and rows[1].line == 4
    checked = [history.check_history(r.data, now=NOW, max_clock_skew_s=300) for r in rows]
    assert isinstance(checked[0], PurchaseIn) and checked[0].total == 30
    assert isinstance(checked[2], Rejection) and checked[2].reason == "total_mismatch"


def test_csv_resumes_at_a_purchase_boundary():
    data = CSV.encode()
    rows = list(history.read_csv(io.BytesIO(data)))
    assert [r.next_line for r in rows] == [4, 5, 6]
    again = list(history.read_csv(io.BytesIO(data), start_offset=rows[0].next_offset, start_line=rows[0].next_line))
    assert [r.data for r in again] == [r.data for r in rows[1:]]
    assert [r.line for r in again] == [4, 5]


def test_csv_purchase_columns_must_agree_across_its_rows():
    bad = CSV.replace("r-1,sale,,pos,store-1,c-1,2025-06-01T10:00:00+00:00,PLN,30.00,2",
                      "r-1,sale,,pos,store-1,c-9,2025-06-01T10:00:00+00:00,PLN,30.00,2")
    first = next(history.read_csv(io.BytesIO(bad.encode())))
    assert first.refusal is not None and first.refusal.reason == "csv_inconsistent"
    assert "customer_id" in first.refusal.message


def test_csv_header_must_name_the_contract_columns():
    try:
        list(history.read_csv(io.BytesIO(b"purchase_id,colour\nx,red\n")))
    except ValueError as exc:
        assert "colour" in str(exc) and "store_id" in str(exc)
    else:
        raise AssertionError("an unknown header was accepted")


def test_jsonl_refuses_bad_lines_with_reasons_and_accepts_old_purchases_but_not_future_ones():
    lines = [json.dumps(sale("a", occurred="2019-01-01T00:00:00+00:00")), "{not json", json.dumps([1]),
             json.dumps(sale("b", occurred="2027-01-01T00:00:00+00:00")), json.dumps(sale("c", currency="XXQ"))]
    rows = list(history.read_jsonl(io.BytesIO(("\n".join(lines) + "\n").encode())))
    assert [r.line for r in rows] == [1, 2, 3, 4, 5]
    results = [r.refusal or history.check_history(r.data, now=NOW, max_clock_skew_s=300) for r in rows]
    assert isinstance(results[0], PurchaseIn)  # seven years old: history has no age limit
    assert [x.reason for x in results[1:]] == ["malformed_json", "schema", "timestamp_future", "unknown_currency"]


def test_dry_run_summarises_refusals_and_exits_1(tmp_path, capsys):
    f = tmp_path / "h.jsonl"
    f.write_text(json.dumps(sale("a")) + "\n" + json.dumps(sale("b", total="1.00")) + "\n")
    args = importer.parse_args([str(f), "--policy", "analytics", "--dry-run", "--no-progress"])
    out = io.StringIO()
    assert asyncio.run(importer.run_import(args, PurchasesSettings(), out=out)) == 1
    text = out.getvalue()
    assert "1 purchases checked (policy analytics); 1 refused" in text and "total_mismatch: 1" in text
    refused = [json.loads(x) for x in (tmp_path / "h.jsonl.refused.jsonl").read_text().splitlines()]
    assert refused == [{"line": 2, "reason": "total_mismatch", "errors": refused[0]["errors"], "purchase_id": "b"}]


def test_a_checkpoint_of_another_file_is_refused(tmp_path):
    f = tmp_path / "h.jsonl"
    f.write_text(json.dumps(sale("a")) + "\n")
    importer.Checkpoint(str(f), "not-this-file", "analytics").save(tmp_path / "h.jsonl.checkpoint.json")
    args = importer.parse_args([str(f), "--policy", "analytics", "--resume", "--no-progress"])
    assert asyncio.run(importer.run_import(args, PurchasesSettings(), out=io.StringIO())) == 2


def test_policy_is_required_and_checked():
    for argv in (["f.jsonl"], ["f.jsonl", "--policy", "generous"]):
        try:
            importer.parse_args(argv)
        except SystemExit as exc:
            assert exc.code == 2
        else:
            raise AssertionError(f"{argv} accepted")


def test_a_resumed_import_goes_on_after_the_checkpoint_and_keeps_the_refusals_before_it(tmp_path):
    f = tmp_path / "h.jsonl"
    lines = [json.dumps(sale(f"p{i}", total="1.00" if i in (1, 3) else "25.00")) for i in range(4)]
    f.write_text("\n".join(lines) + "\n")
    first_two = len(lines[0]) + len(lines[1]) + 2
    # As an interrupted run leaves them: two rows done (one refused), and a refusal past the checkpoint.
    importer.Checkpoint(str(f), importer.head_sha256(f), "analytics", next_offset=first_two, next_line=3, sent=1,
                        refused={"total_mismatch": 1}).save(tmp_path / "h.jsonl.checkpoint.json")
    (tmp_path / "h.jsonl.refused.jsonl").write_text(json.dumps({"line": 2, "reason": "total_mismatch"}) + "\n"
                                                    + json.dumps({"line": 4, "reason": "total_mismatch"}) + "\n")
    rows = list(history.read_jsonl(io.BytesIO(f.read_bytes()), start_offset=first_two, start_line=3))
    assert [r.line for r in rows] == [3, 4] and rows[0].data["purchase_id"] == "p2"
    args = importer.parse_args([str(f), "--policy", "analytics", "--resume", "--dry-run", "--no-progress"])
    out = io.StringIO()
    assert asyncio.run(importer.run_import(args, PurchasesSettings(), out=out)) == 1
    assert "2 purchases checked (policy analytics); 2 refused" in out.getvalue()
    refused = [json.loads(x)["line"] for x in (tmp_path / "h.jsonl.refused.jsonl").read_text().splitlines()]
    assert refused == [2, 4]
