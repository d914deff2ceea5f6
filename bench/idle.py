"""Benchmark: what the platform costs when nothing happens.

    .venv/bin/python -m bench.idle [--seconds 20] [--settle-seconds 8]

Starts its own broker and PostgreSQL and every service (as `make bench` does) as
real processes, waits until they are ready and have settled (consumer groups joined), then
measures the CPU each process uses over --seconds with no traffic at all, and prints it as a
share of one core, plus a JSON line. On a small shop's server this is the floor every other
figure stands on: consumers that poll the broker (the embedded broker answers an idle fetch
only when its wait runs out and spends CPU while it waits), relays and schedulers that wake
up. Settings to try without editing code: BENCH_SERVICE_ENV, a JSON object of settings
without the service prefix given to every service (e.g. '{"CONSUMER_FETCH_MAX_WAIT_MS": "50"}').
"""

import argparse
import asyncio
import json
import os

from bench.e2e import service_settings
from bench.harness import Service, cpu_seconds, infra, pg_processes, process_tree



async def run(args: argparse.Namespace) -> dict:
    extra = json.loads(os.environ.get("BENCH_SERVICE_ENV", "{}"))
    with infra(durable=True) as env:
        own = {"ledger": {"SCHEDULER_INTERVAL_S": "60"}}
        services = [Service(env, name, {**settings, **own.get(name, {}), **extra})
                    for name, settings in service_settings().items()]
        for service in services:
            service.start()
            await service.wait_ready()
        await asyncio.sleep(args.settle_seconds)
        groups = {s.name: process_tree(s.proc.pid) for s in services if s.proc is not None}
        groups["broker"] = process_tree(env.broker.pid)
        groups["postgres"] = pg_processes(env.pg)
        before = {name: cpu_seconds(pids) for name, pids in groups.items()}
        await asyncio.sleep(args.seconds)
        share = {name: round((cpu_seconds(pids) - before[name]) / args.seconds * 100, 1)
                 for name, pids in groups.items()}
    return {"benchmark": "idle", "seconds": args.seconds, "cpu_percent_of_one_core": share,
            "total_percent_of_one_core": round(sum(share.values()), 1), "settings": extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="measured idle time")
    parser.add_argument("--settle-seconds", type=float, default=8.0, help="wait after every service is ready")
    report = asyncio.run(run(parser.parse_args()))
    share = report["cpu_percent_of_one_core"]
    print(f"idle CPU over {report['seconds']:.0f} s, % of one core: "
          + ", ".join(f"{name} {value}" for name, value in share.items())
          + f"; in all {report['total_percent_of_one_core']}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
