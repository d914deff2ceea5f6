"""Benchmark: importing purchase history end to end, for each earning policy.

    .venv/bin/python -m bench.history_import [--purchases 100000] [--policies analytics,as-earned]

On a broker and PostgreSQL of its own, with the purchases service and the ledger running as
processes: generates an 18-month history (bench/history_data.py), runs the importer CLI
(`python -m services.purchases.importer FILE --policy P`) and times it from the CLI's start
until the ledger has claimed every purchases.recorded event and both outboxes are empty (CLI
-> purchases.import -> purchases -> purchases.recorded -> ledger). Prints purchases/s for each
policy, when each stage finished, and the CPU per purchase of each process; then a JSON line.
"""

import argparse
import asyncio
import json
import subprocess
import sys
import time

import asyncpg

from bench.harness import ROOT, Service, cpu_seconds, create_topics, infra, pg_processes, process_tree, progress, \
    progress_done
from bench.history_data import HistorySpec, generate_history, write_jsonl
from shared.topics import ALL_TOPICS

PARTITIONS = 4


async def counts(dsn: str) -> tuple[int, int, int, int]:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM purchases.purchases) AS recorded, (SELECT count(*) FROM purchases.outbox) AS"
            " p_out, (SELECT count(*) FROM ledger.inbox WHERE consumer = 'ledger.purchases') AS applied,"
            " (SELECT count(*) FROM ledger.outbox) AS l_out")
        return row["recorded"], row["p_out"], row["applied"], row["l_out"]
    finally:
        await conn.close()


async def run_policy(env, services: dict[str, Service], policy: str, n: int, seed: int) -> dict:
    spec = HistorySpec(customers=max(n // 12, 10), sales=int(n / 1.1), days=540, stores=20, seed=seed)
    purchases = generate_history(spec, prefix=f"{policy}-")
    path = write_jsonl(purchases, env.workdir / f"history-{policy}.jsonl")
    total = len(purchases)
    dsn = env.dsn()
    recorded0, _, applied0, _ = await counts(dsn)
    pids = {name: process_tree(s.proc.pid) for name, s in services.items()}
    pids["postgres"] = pg_processes(env.pg)
    pids["broker"] = process_tree(env.broker.pid)
    cpu0 = {name: cpu_seconds(p) for name, p in pids.items()}
    started = time.perf_counter()
    cli = subprocess.Popen([sys.executable, "-m", "services.purchases.importer", str(path), "--policy", policy,
                            "--no-progress", "--bootstrap", env.bootstrap], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
    cli_cpu = 0.0
    stages: dict[str, float] = {}
    while True:
        if "cli" not in stages:
            cli_cpu = max(cli_cpu, cpu_seconds(process_tree(cli.pid)))
            if cli.poll() is not None:
                stages["cli"] = time.perf_counter() - started
        recorded, p_out, applied, l_out = await counts(dsn)
        if "purchases" not in stages and recorded - recorded0 >= total and p_out == 0:
            stages["purchases"] = time.perf_counter() - started
        if "purchases" in stages and applied - applied0 >= total and l_out == 0 and "cli" in stages:
            stages["ledger"] = time.perf_counter() - started
            break
        progress(f"{policy}: recorded {recorded - recorded0}/{total}, applied by the ledger {applied - applied0}")
        if time.perf_counter() - started > 3600:
            raise TimeoutError(f"{policy}: not done after an hour")
        await asyncio.sleep(0.25)
    progress_done()
    output = cli.stdout.read().decode() if cli.stdout else ""
    if cli.returncode != 0:
        raise RuntimeError(f"importer exited {cli.returncode}: {output}")
    elapsed = stages["ledger"]
    cpu = {name: cpu_seconds(p) - cpu0[name] for name, p in pids.items()}
    cpu["importer"] = cli_cpu
    return {"policy": policy, "purchases": total, "seconds": round(elapsed, 2),
            "purchases_per_s": round(total / elapsed), "stages_s": {k: round(v, 2) for k, v in stages.items()},
            "cpu_us_per_purchase": {k: round(v / total * 1e6) for k, v in cpu.items()}}


async def main_async(args: argparse.Namespace) -> list[dict]:
    results = []
    with infra(durable=True) as env:
        await create_topics(env.bootstrap, list(ALL_TOPICS), PARTITIONS)
        services = {
            "ledger": Service(env, "ledger", {"TOPIC_PARTITIONS": str(PARTITIONS), "ADMIN_API_KEY": "bench",
                                              "SCHEDULER_INTERVAL_S": "3600"}).start(),
        }
        # Scaling out, as in production: more instances join the purchases group.
        for i in range(args.purchases_instances):
            name = "purchases" if i == 0 else f"purchases-{i + 1}"
            services[name] = Service(env, "purchases", {"TOPIC_PARTITIONS": str(PARTITIONS),
                                                        "IMPORT_CONSUMERS": str(args.import_consumers)}).start()
        for s in services.values():
            await s.wait_ready()
        for i, policy in enumerate(args.policies.split(",")):
            results.append(await run_policy(env, services, policy, args.purchases, seed=100 + i))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.history_import", description=__doc__.split("\n\n")[0])
    p.add_argument("--purchases", type=int, default=100_000, help="history size per policy (sales and returns)")
    p.add_argument("--policies", default="analytics,as-earned")
    p.add_argument("--purchases-instances", type=int, default=1, help="purchases service processes")
    p.add_argument("--import-consumers", type=int, default=2, help="consumers of purchases.import per process")
    args = p.parse_args(argv)
    results = asyncio.run(main_async(args))
    print(f"{'policy':<10} {'purchases':>9} {'seconds':>8} {'purchases/s':>11}  stages (s)  CPU per purchase (us)")
    for r in results:
        stages = " ".join(f"{k} {v}" for k, v in r["stages_s"].items())
        cpu = " ".join(f"{k} {v}" for k, v in r["cpu_us_per_purchase"].items())
        print(f"{r['policy']:<10} {r['purchases']:>9} {r['seconds']:>8} {r['purchases_per_s']:>11}  {stages}  {cpu}")
    print(json.dumps({"bench": "history_import", "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
