"""Benchmark: redemption latency through the whole saga at a steady request rate.

    .venv/bin/python -m bench.rewards_latency [--rate 200] [--seconds 20] [--customers 200]

Starts its own broker and PostgreSQL, the ledger and the rewards service as real processes
(`python -m services.ledger`, `python -m services.rewards`), credits customers through the
ledger's admin API, then fires POST /v1/redemptions open-loop at --rate per second (each
request starts at its scheduled time, whatever the previous ones do, so a slow saga cannot
hide by slowing the load down). The HTTP call waits for the outcome (REWARDS_SAGA_WAIT_MS), so
each latency is the whole saga: request committed, RedemptionRequested through the outbox,
the ledger's hold, the reservation, the answer back to the waiting request. Latencies are
measured from each request's scheduled start. Prints p50/p90/p99/max and a JSON line.
Settings to try without editing code: BENCH_REWARDS_ENV / BENCH_LEDGER_ENV, JSON objects of
extra <SERVICE>_ settings without the prefix (e.g. '{"CONSUMER_FETCH_MAX_WAIT_MS": "10"}').
Goal: p99 under 100 ms at 200 redemptions/s on this machine.
"""

import argparse
import asyncio
import json
import os
import resource
import signal
import time
import uuid
from collections import Counter
from datetime import datetime

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.harness import Service, fetch_rows, infra, percentile, progress, progress_done
from services.rewards.token import mint_token
from shared.topics import POINTS_EVENTS, REWARDS_EVENTS

JWT_SECRET = "bench-jwt-secret-0123456789abcdef0123"
REWARDS_ADMIN = "bench-rewards-admin"
LEDGER_ADMIN = "bench-ledger-admin"


class HttpPool:
    """A minimal HTTP/1.1 keep-alive client: `size` persistent connections, one request at a
    time each. httpx spends more CPU per request than the service under test at this rate
    on two cores, which would measure the client instead of the saga."""

    def __init__(self, host: str, port: int, size: int) -> None:
        self.host, self.port, self.size = host, port, size
        self._idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def open(self) -> None:
        for _ in range(self.size):
            self._idle.put_nowait(await asyncio.open_connection(self.host, self.port))

    async def close(self) -> None:
        while not self._idle.empty():
            _, writer = self._idle.get_nowait()
            writer.close()

    async def post(self, path: str, body: dict, headers: dict[str, str]) -> tuple[int, dict]:
        reader, writer = await self._idle.get()
        data = json.dumps(body).encode()
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        request = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(data)}\r\n{head}\r\n").encode() + data
        try:
            for attempt in range(2):
                try:
                    writer.write(request)  # a few hundred bytes: never above the transport's high-water mark
                    # The whole head at once: one await per response, not one per header line.
                    response_head = await reader.readuntil(b"\r\n\r\n")
                    break
                except asyncio.IncompleteReadError as exc:
                    if exc.partial or attempt:
                        raise
                except (ConnectionResetError, BrokenPipeError):
                    if attempt:
                        raise
                # The server closed this idle keep-alive connection (uvicorn: after 5 s), maybe
                # as we sent: reconnect and send again (the Idempotency-Key makes that safe).
                writer.close()
                reader, writer = await asyncio.open_connection(self.host, self.port)
            else:
                raise ConnectionResetError("connection closed twice")
            status = int(response_head.split(b" ", 2)[1])
            length = 0
            for line in response_head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            payload = json.loads(await reader.readexactly(length)) if length else {}
            self._idle.put_nowait((reader, writer))
            return status, payload
        except Exception:
            writer.close()
            self._idle.put_nowait(await asyncio.open_connection(self.host, self.port))
            raise


async def fire(pool: HttpPool, tokens: list[str], *, rate: float, seconds: float, label: str,
               results: list[tuple[float, int, str]], reward_id: str = "bench-voucher") -> float:
    """Open-loop: request i starts at t0 + i/rate. Returns the achieved request rate."""
    total = int(rate * seconds)
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.05
    tasks = []

    async def one(i: int, scheduled: float) -> None:
        headers = {"Authorization": f"Bearer {tokens[i % len(tokens)]}", "Idempotency-Key": str(uuid.uuid4())}
        redemption_id = None
        try:
            code, body = await pool.post("/v1/redemptions", {"reward_id": reward_id}, headers)
            status, redemption_id = body.get("status", str(code)), body.get("redemption_id")
        except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
            status, code = type(exc).__name__, 0
        # (latency s, HTTP status, outcome, redemption id, wall clock at the answer: for the hops)
        results.append((loop.time() - scheduled, code, status, redemption_id, time.time()))

    for i in range(total):
        scheduled = t0 + i / rate
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, scheduled)))
        if i % 50 == 0:
            progress(f"{label}: {i}/{total} sent, {len(results)} answered")
    await asyncio.gather(*tasks)
    progress_done()
    return total / (loop.time() - t0)


async def run(args: argparse.Namespace) -> dict:
    with infra(durable=not args.no_fsync) as env:
        common = {"TOPIC_PARTITIONS": str(args.partitions), "LOG_JSON": "true"}
        if args.unix_socket:  # the services reach PostgreSQL through its Unix socket instead of TCP
            common["DATABASE_URL"] = f"postgresql://{env.dsn().split('://', 1)[1].split('@', 1)[0]}@/loyalty" \
                                     f"?host={env.pg.datadir}&port={env.pg.port}"
        ledger = Service(env, "ledger", {**common, "ADMIN_API_KEY": LEDGER_ADMIN, "SCHEDULER_INTERVAL_S": "3600",
                                          **json.loads(os.environ.get("BENCH_LEDGER_ENV", "{}"))})
        rewards = Service(env, "rewards", {
            **common, "JWT_SECRET": JWT_SECRET, "ADMIN_API_KEY": REWARDS_ADMIN, "SAGA_WAIT_MS": "10000",
            "DATABASE_POOL_MAX": "20", **json.loads(os.environ.get("BENCH_REWARDS_ENV", "{}")),
        })
        ledger.start()
        await ledger.wait_ready()
        rewards.start()
        await rewards.wait_ready()
        async with httpx.AsyncClient(base_url=rewards.url, timeout=30) as client, \
                httpx.AsyncClient(base_url=ledger.url, timeout=30) as ledger_client:
            response = await client.post("/v1/admin/rewards", headers={"X-Admin-Key": REWARDS_ADMIN}, json={
                "reward_id": "bench-voucher", "name": "Bench voucher", "cost_points": 1, "kind": "voucher",
                "voucher_value": "1.00", "voucher_currency": "EUR"})
            response.raise_for_status()
            customers = [f"bench-c{i}" for i in range(args.customers)]
            need = int(args.rate * (args.seconds + args.warmup_seconds)) // args.customers + 10
            for c in customers:
                (await ledger_client.post("/v1/admin/adjustments", headers={"X-Admin-Key": LEDGER_ADMIN}, json={
                    "customer_id": c, "amount_points": need, "reason_code": "goodwill", "actor": "bench"}
                )).raise_for_status()
            tokens = [mint_token(c, key=JWT_SECRET, issuer="loyalty-local", audience="loyalty-rewards",
                                 ttl_s=3600) for c in customers]
            pool = HttpPool("127.0.0.1", rewards.port, args.connections)
            await pool.open()
            try:
                warm: list[tuple[float, int, str]] = []
                await fire(pool, tokens, rate=args.rate, seconds=args.warmup_seconds, label="warm-up", results=warm)
                results: list[tuple[float, int, str]] = []
                cpu_before = cpu_by_process(env, rewards, ledger)
                achieved = await fire(pool, tokens, rate=args.rate, seconds=args.seconds, label="measured",
                                      results=results)
                cpu_after = cpu_by_process(env, rewards, ledger)
                cpu_ms = {name: round((cpu_after[name] - cpu_before.get(name, 0.0)) * 1000 / max(len(results), 1), 2)
                          for name in cpu_after}
            finally:
                await pool.close()
            hops = await hop_breakdown(env.bootstrap, env.dsn(), results)
    latencies_ms = sorted(r[0] * 1000 for r in results)
    outcomes = Counter(r[2] for r in results)
    return {
        "benchmark": "rewards_latency", "rate_per_s": args.rate, "achieved_rate_per_s": round(achieved, 1),
        "seconds": args.seconds, "requests": len(results), "outcomes": dict(outcomes),
        "http_202": sum(1 for r in results if r[1] == 202),
        "p50_ms": round(percentile(latencies_ms, 50), 1), "p90_ms": round(percentile(latencies_ms, 90), 1),
        "p99_ms": round(percentile(latencies_ms, 99), 1), "max_ms": round(latencies_ms[-1], 1),
        "partitions": args.partitions, "fsync": not args.no_fsync, "unix_socket": args.unix_socket, "hops_p50_p99_ms": hops,
        # CPU each service spent per redemption: a busy machine inflates latency, not this.
        "cpu_ms_per_redemption": cpu_ms, "load_average_1m": os.getloadavg()[0],
    }


async def hop_breakdown(bootstrap: str, dsn: str, results: list[tuple]) -> dict[str, list[float]]:
    """Where the time goes, per redemption, from the clocks of this one machine: the request's
    scheduled start, requested_at (rewards, before its transaction), the Kafka timestamp of
    RedemptionRequested (when the rewards relay sent it), PointsHeld's recorded_at (the ledger
    applying the request), the Kafka timestamp of PointsHeld (the ledger relay sending it),
    fulfilled_at (rewards applying the hold, before its commit), and the answer's arrival."""
    rows = await fetch_rows(dsn, "SELECT redemption_id, requested_at, fulfilled_at FROM rewards.redemptions "
                                 "WHERE status = 'fulfilled'")
    held: dict[str, tuple[float, float]] = {}  # recorded_at, sent (epoch seconds)
    requested_sent: dict[str, float] = {}
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for topic in (POINTS_EVENTS, REWARDS_EVENTS)
               for p in consumer.partitions_for_topic(topic) or []]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            for records in (await consumer.getmany(timeout_ms=200, max_records=5000)).values():
                for r in records:
                    event = json.loads(r.value)
                    rid = event.get("payload", {}).get("redemption_id")
                    if event.get("type") == "PointsHeld":
                        held[rid] = (datetime.fromisoformat(event["recorded_at"]).timestamp(), r.timestamp / 1000)
                    elif event.get("type") == "RedemptionRequested":
                        requested_sent.setdefault(rid, r.timestamp / 1000)
    finally:
        await consumer.stop()
    answered = {r[3]: (r[4] - r[0], r[4]) for r in results if len(r) > 4 and r[3]}  # scheduled, answered
    hops: dict[str, list[float]] = {name: [] for name in (
        "requested_to_held", "held_to_fulfilled", "client_to_requested", "rewards_commit_and_relay",
        "ledger_consume", "ledger_commit_and_relay", "rewards_consume", "rewards_commit_and_answer")}
    for row in rows:
        rid = str(row["redemption_id"])
        requested, fulfilled = row["requested_at"].timestamp(), row["fulfilled_at"].timestamp()
        if rid not in held:
            continue
        held_at, held_sent = held[rid]
        hops["requested_to_held"].append(held_at - requested)
        hops["held_to_fulfilled"].append(fulfilled - held_at)
        hops["ledger_commit_and_relay"].append(held_sent - held_at)
        hops["rewards_consume"].append(fulfilled - held_sent)
        if rid in requested_sent:
            hops["rewards_commit_and_relay"].append(requested_sent[rid] - requested)
            hops["ledger_consume"].append(held_at - requested_sent[rid])
        if rid in answered:
            hops["client_to_requested"].append(requested - answered[rid][0])
            hops["rewards_commit_and_answer"].append(answered[rid][1] - fulfilled)
    return {name: [round(percentile(sorted(v), 50) * 1000, 1), round(percentile(sorted(v), 99) * 1000, 1)]
            for name, v in hops.items() if v}


def cpu_by_process(env, rewards: Service, ledger: Service) -> dict[str, float]:
    """CPU seconds so far of each part of the saga: the two services, PostgreSQL (postmaster
    and every backend), the broker, and this client (which shares the two cores)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = {"rewards": cpu_seconds(rewards.proc.pid), "ledger": cpu_seconds(ledger.proc.pid),
           "postgres": 0.0, "broker": cpu_seconds(env.broker.pid), "bench client": usage.ru_utime + usage.ru_stime}
    try:
        postmaster = int((env.pg.datadir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return cpu
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if int(entry) == postmaster or ppid == postmaster:
                cpu["postgres"] += cpu_seconds(int(entry))
        except (OSError, ValueError):
            continue  # a backend that just ended
    return cpu


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=200.0, help="redemptions per second")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured duration")
    parser.add_argument("--warmup-seconds", type=float, default=3.0)
    parser.add_argument("--customers", type=int, default=200)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--connections", type=int, default=256, help="keep-alive HTTP connections of the client")
    parser.add_argument("--no-fsync", action="store_true", help="PostgreSQL without fsync (not the real figure)")
    parser.add_argument("--unix-socket", action="store_true",
                        help="services connect to PostgreSQL through its Unix socket (default: TCP on 127.0.0.1)")
    args = parser.parse_args()

    def terminate(*_: object) -> None:
        raise SystemExit(143)  # unwinds through the harness: every process it started is stopped

    signal.signal(signal.SIGTERM, terminate)
    started = time.perf_counter()
    report = asyncio.run(run(args))
    print(f"rewards redemption latency at {report['rate_per_s']:.0f}/s (achieved {report['achieved_rate_per_s']}/s), "
          f"{report['requests']} requests over {report['seconds']:.0f} s, outcomes {report['outcomes']}, "
          f"{report['http_202']} answered 202")
    print(f"  p50 {report['p50_ms']} ms   p90 {report['p90_ms']} ms   p99 {report['p99_ms']} ms   "
          f"max {report['max_ms']} ms   (goal: p99 < 100 ms)")
    hops = report["hops_p50_p99_ms"]
    print(f"  requested -> ledger hold: p50 {hops['requested_to_held'][0]} ms, p99 {hops['requested_to_held'][1]} ms; "
          f"hold -> fulfilled: p50 {hops['held_to_fulfilled'][0]} ms, p99 {hops['held_to_fulfilled'][1]} ms")
    split = [name for name in ("client_to_requested", "rewards_commit_and_relay", "ledger_consume",
                               "ledger_commit_and_relay", "rewards_consume", "rewards_commit_and_answer") if name in hops]
    print("  hops p50/p99 ms: " + ", ".join(f"{name.replace('_', ' ')} {hops[name][0]}/{hops[name][1]}" for name in split))
    cpu = ", ".join(f"{name} {ms} ms" for name, ms in report["cpu_ms_per_redemption"].items())
    print(f"  CPU per redemption: {cpu}; machine load average {report['load_average_1m']:.1f}")
    print(json.dumps(report | {"wall_s": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
