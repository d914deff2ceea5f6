"""Import opening balances with a history import:
`python -m services.ledger.opening_balances FILE --reason TEXT [--ledger-url URL]`.

FILE is CSV with the columns `customer_id,points[,reason]` (a header row) or JSON lines
`{"customer_id": ..., "points": ..., "reason": ...}`: the points each customer had in the
retailer's old system. Each becomes an adjustment through the ledger's admin API with reason
code `opening_balance` and the row's reason (else --reason) as its note: an available lot
expiring like any adjustment, its PointsAdjusted marked history=true, never reminded of. The
adjustment id derives from the customer id, so importing the balances again changes nothing
(one opening balance per customer; a changed figure is reported, not applied: correct it with
an ordinary adjustment).

Exit status: 0 every row applied (or applied before); 1 some rows refused (see the summary);
2 the import could not run. Needs LEDGER_ADMIN_API_KEY (or --admin-key)."""

import argparse
import asyncio
import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx

from services.ledger.domain.adjustments import OPENING_BALANCE, opening_balance_id

CONCURRENCY = 8


def read_balances(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) for every row of the file."""
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".csv":
        return [(i + 2, row) for i, row in enumerate(csv.DictReader(text.splitlines()))]
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((i, json.loads(line)))
            except ValueError:
                rows.append((i, {"_error": "line is not valid JSON"}))
    return rows


def adjustment_of(row: dict[str, Any], reason: str | None) -> dict[str, Any] | str:
    """The admin API body for a row, or why the row cannot be one."""
    if "_error" in row:
        return row["_error"]
    customer_id = str(row.get("customer_id") or "").strip()
    try:
        points = int(str(row.get("points", "")).strip())
    except ValueError:
        return f"points must be a whole number, not {row.get('points')!r}"
    note = str(row.get("reason") or reason or "").strip()
    if not customer_id:
        return "customer_id is missing"
    if points <= 0:
        return "an opening balance is a positive number of points"
    if not note:
        return "no reason: give a reason column or --reason"
    return {"adjustment_id": str(opening_balance_id(customer_id)), "customer_id": customer_id,
            "amount_points": points, "reason_code": OPENING_BALANCE, "actor": "history-import", "note": note[:1000]}


async def run(args: argparse.Namespace, *, out=sys.stdout, transport: httpx.AsyncBaseTransport | None = None) -> int:
    path = Path(args.file)
    if not path.is_file():
        print(f"no such file: {path}", file=sys.stderr)
        return 2
    key = args.admin_key or os.environ.get("LEDGER_ADMIN_API_KEY")
    if not key:
        print("the ledger's admin key is needed: LEDGER_ADMIN_API_KEY or --admin-key", file=sys.stderr)
        return 2
    tally = {"applied": 0, "already": 0, "refused": 0}
    problems: list[str] = []
    limit = asyncio.Semaphore(CONCURRENCY)

    async def one(client: httpx.AsyncClient, line: int, body: dict[str, Any]) -> None:
        async with limit:
            r = await client.post("/v1/admin/adjustments", json=body, headers={"X-Admin-Key": key})
        if r.status_code == 201:
            tally["applied"] += 1
        elif r.status_code == 200:
            tally["already"] += 1
            if r.json().get("amount_points") != body["amount_points"]:
                problems.append(f"line {line}: {body['customer_id']} already has an opening balance of "
                                f"{r.json().get('amount_points')} points; {body['amount_points']} not applied")
        else:
            tally["refused"] += 1
            problems.append(f"line {line}: HTTP {r.status_code}: {r.text[:300]}")

    async with httpx.AsyncClient(base_url=args.ledger_url, timeout=30, transport=transport) as client:
        jobs = []
        for line, row in read_balances(path):
            body = adjustment_of(row, args.reason)
            if isinstance(body, str):
                tally["refused"] += 1
                problems.append(f"line {line}: {body}")
            else:
                jobs.append(one(client, line, body))
        await asyncio.gather(*jobs)
    print(f"opening balances: {tally['applied']} applied, {tally['already']} applied before, "
          f"{tally['refused']} refused", file=out)
    for p in problems[:50]:
        print(f"  {p}", file=out)
    return 1 if tally["refused"] or problems else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.ledger.opening_balances",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("file", help="CSV (customer_id,points[,reason]) or JSON lines")
    p.add_argument("--reason", help="the note of rows without a reason (e.g. 'balance from the old card system')")
    p.add_argument("--ledger-url", default=os.environ.get("LEDGER_URL", "http://127.0.0.1:8102"))
    p.add_argument("--admin-key", help="default LEDGER_ADMIN_API_KEY")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(run(args))
    except httpx.HTTPError as exc:
        print(f"the ledger did not answer: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
