"""Plugs the reports into the churn service: the JSON router, the dashboard, and the
scheduled jobs (quadrant refresh, departure record, gauges). main.py calls `install_reports`
once; the consumer's apply functions call `signals.record_signals` with their batches."""

from collections.abc import Callable
from datetime import datetime

from fastapi import FastAPI
from pydantic import SecretStr

from services.churn import reports, reports_metrics
from services.churn.dashboard import create_dashboard_router
from services.churn.dashboard_auth import reports_dependency
from services.churn.reports_api import create_reports_router
from services.churn.reports_settings import ReportsSettings
from shared.events import utcnow
from shared.runtime import ServiceRuntime

METRICS_INTERVAL_S = 15.0


def install_reports(app: FastAPI, runtime: ServiceRuntime, *, admin_key: Callable[[], str | SecretStr | None],
                    settings: ReportsSettings | None = None, clock: Callable[[], datetime] = utcnow,
                    jobs: bool = True) -> ReportsSettings:
    settings = settings or ReportsSettings()

    def pool():
        assert runtime.pool is not None, "the runtime is not started"
        return runtime.pool

    app.include_router(create_reports_router(pool=pool, settings=settings, authorised=reports_dependency(admin_key),
                                             clock=clock))
    app.include_router(create_dashboard_router(pool=pool, settings=settings, admin_key=admin_key, clock=clock))
    if jobs:
        # Idempotent jobs: with several instances the last quadrant refresh wins and a
        # departure is recorded once (its key is the customer and the lost episode).
        runtime.every(settings.matrix_refresh_interval_s, "churn-quadrants",
                      lambda: reports.refresh_quadrants(pool(), settings, now=clock()))
        runtime.every(settings.departures_interval_s, "churn-departures",
                      lambda: reports.record_departures(pool(), settings, now=clock()))
        runtime.every(METRICS_INTERVAL_S, "churn-report-metrics",
                      lambda: reports_metrics.sample(pool(), settings, now=clock()))
    return settings
