"""Import purchase history: `python -m services.purchases.importer FILE --policy analytics|as-earned`.

Reads JSON lines or CSV in the inbound purchase contract (history.py), checks each purchase
with the purchases domain's own rules, and produces the valid ones to `purchases.import`
with the policy in the `import_policy` header; the purchases service records them as history
and the ledger earns by the policy. A checkpoint file beside the input records how far the
broker has acknowledged, so `--resume` goes on from there after an interruption; running the
whole import again changes nothing either (purchases are de-duplicated by their identity).

Exit status: 0 every purchase sent; 1 some rows refused (the rest sent; see the summary and
FILE.refused.jsonl); 2 the import could not run (arguments, file, checkpoint, broker).
"""

import argparse
import asyncio
import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aiokafka.errors import KafkaError
from tqdm import tqdm

from services.purchases import history
from services.purchases.domain import Rejection
from services.purchases.settings import PurchasesSettings
from shared.events import utcnow
from shared.kafka import create_producer
from shared.topics import PURCHASES_IMPORT

# Purchases produced between two checkpoints: the most a resume may send again (harmless:
# the purchases service drops the duplicates).
CHUNK = 5_000
_HEAD_BYTES = 64 * 1024


@dataclass
class Checkpoint:
    """How far an import got: the input is recognised by its head, so a resume never
    continues another file at an offset that means nothing there."""

    path: str
    head_sha256: str
    policy: str
    next_offset: int = 0
    next_line: int = 1
    sent: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    done: bool = False

    @classmethod
    def load(cls, path: Path) -> "Checkpoint | None":
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            return None

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        os.replace(tmp, path)  # atomic: a crash leaves the old checkpoint or the new one


def head_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.sha256(f.read(_HEAD_BYTES)).hexdigest()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.purchases.importer", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="JSON lines (one purchase per line) or CSV (.csv: one row per line item)")
    p.add_argument("--policy", choices=history.POLICIES, required=True,
                   help="what the history earns: analytics (nothing) or as-earned (as if earned at the time)")
    p.add_argument("--resume", action="store_true", help="go on from the checkpoint of an earlier run of this file")
    p.add_argument("--checkpoint", help="checkpoint file (default FILE.checkpoint.json)")
    p.add_argument("--refused-out", help="where refused rows are written (default FILE.refused.jsonl)")
    p.add_argument("--dry-run", action="store_true", help="check every row, send nothing")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (default PURCHASES_KAFKA_BOOTSTRAP_SERVERS)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


class _Sender:
    """Produces to purchases.import, a chunk at a time: `flush` returns once the broker has
    acknowledged every record sent so far (acks=all)."""

    def __init__(self, settings: PurchasesSettings, policy: str) -> None:
        self._producer = create_producer(settings, client_id="purchases-importer")
        self._topic = settings.topic(PURCHASES_IMPORT)
        self._headers = [("import_policy", policy.encode())]
        self._pending: list[asyncio.Future] = []

    async def start(self) -> None:
        await self._producer.start()

    async def send(self, value: bytes, key: str) -> None:
        self._pending.append(await self._producer.send(self._topic, value, key=key.encode(), headers=self._headers))

    async def flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending:
            await asyncio.gather(*pending)

    async def stop(self) -> None:
        await self._producer.stop()


async def run_import(args: argparse.Namespace, settings: PurchasesSettings, *, out=sys.stdout) -> int:
    path = Path(args.file)
    if not path.is_file():
        print(f"no such file: {path}", file=sys.stderr)
        return 2
    checkpoint_path = Path(args.checkpoint or f"{path}.checkpoint.json")
    refused_path = Path(args.refused_out or f"{path}.refused.jsonl")
    head = head_sha256(path)
    state = Checkpoint.load(checkpoint_path) if args.resume else None
    if state is not None and (state.head_sha256 != head or state.policy != args.policy):
        print(f"{checkpoint_path} belongs to another file or policy ({state.policy}); remove it or drop --resume",
              file=sys.stderr)
        return 2
    resumed = state is not None
    state = state or Checkpoint(str(path.resolve()), head, args.policy)
    tally = history.Tally(sent=state.sent, refused=dict(state.refused))
    if resumed and refused_path.exists():
        # Rows refused after the checkpoint are read and refused again: keep only those before.
        kept = [x for x in refused_path.read_text().splitlines() if x and json.loads(x)["line"] < state.next_line]
        refused_path.write_text("".join(x + "\n" for x in kept))
    sender = None if args.dry_run else _Sender(settings, args.policy)
    try:
        if sender is not None:
            await sender.start()
        with path.open("rb") as f, refused_path.open("a" if resumed else "w") as refused_out, tqdm(
                total=path.stat().st_size, initial=state.next_offset, unit="B", unit_scale=True, desc="import",
                disable=args.no_progress, file=sys.stderr) as bar:
            in_chunk, last_offset = 0, state.next_offset
            for row in history.read_rows(str(path), f, start_offset=state.next_offset, start_line=state.next_line):
                result = row.refusal or history.check_history(row.data or {}, now=utcnow(),
                                                               max_clock_skew_s=settings.max_clock_skew_s)
                if isinstance(result, Rejection):
                    refused_out.write(json.dumps(tally.refuse(row, result)) + "\n")
                elif sender is not None:
                    value = row.raw if row.raw is not None else history.contract_json(result)
                    await sender.send(value, result.customer_id or f"anonymous:{result.store_id}")
                    tally.sent += 1
                else:
                    tally.sent += 1
                in_chunk += 1
                bar.update(row.next_offset - last_offset)
                last_offset = row.next_offset
                if in_chunk >= CHUNK:
                    await _checkpoint(sender, state, tally, row, checkpoint_path, refused_out, args.dry_run)
                    bar.set_postfix(purchases=tally.sent, refused=tally.refused_total)
                    in_chunk = 0
            if sender is not None:
                await sender.flush()
            state.done = True
            if not args.dry_run:
                state.sent, state.refused = tally.sent, dict(tally.refused)
                state.next_offset = path.stat().st_size
                state.save(checkpoint_path)
    except ValueError as exc:  # a CSV header that is not the contract's
        print(str(exc), file=sys.stderr)
        return 2
    finally:
        if sender is not None:
            await sender.stop()
    _summary(tally, refused_path, args, out)
    return 1 if tally.refused_total else 0


async def _checkpoint(sender: _Sender | None, state: Checkpoint, tally: history.Tally, row: history.Row,
                      path: Path, refused_out: Any, dry_run: bool) -> None:
    if sender is not None:
        await sender.flush()
    if dry_run:
        return
    refused_out.flush()
    state.next_offset, state.next_line = row.next_offset, row.next_line
    state.sent, state.refused = tally.sent, dict(tally.refused)
    state.save(path)


def _summary(tally: history.Tally, refused_path: Path, args: argparse.Namespace, out) -> None:
    verb = "checked" if args.dry_run else "sent to purchases.import"
    print(f"{tally.sent} purchases {verb} (policy {args.policy}); {tally.refused_total} refused", file=out)
    for reason, n in sorted(tally.refused.items(), key=lambda kv: -kv[1]):
        print(f"  {reason}: {n}", file=out)
    for e in tally.examples[:10]:
        msg = Rejection(e["reason"], e["errors"]).message
        print(f"  line {e['line']} ({e['purchase_id'] or '?'}): {e['reason']}: {msg}", file=out)
    if tally.refused_total:
        print(f"every refused row, with its reasons: {refused_path}", file=out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = PurchasesSettings()
    if args.bootstrap:
        settings = settings.model_copy(update={"kafka_bootstrap_servers": args.bootstrap})
    try:
        return asyncio.run(run_import(args, settings))
    except KeyboardInterrupt:
        print("interrupted: run again with --resume to go on", file=sys.stderr)
        return 2
    except (OSError, KafkaError) as exc:
        print(f"import failed: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
