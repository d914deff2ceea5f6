"""Every service's /docs (Swagger UI) renders in a real headless Chromium with no
network beyond the service itself: their assets come from an installed package
(fastapi-offline), never from a CDN. Requests to any other host are refused by the browser
helper, so a page that reaches for the internet fails here even on a connected machine."""

import asyncio
import importlib
import socket

import pytest
import uvicorn

from deploy.local.stack import discover_services
from tests.support.browser import browser_page

pytestmark = pytest.mark.asyncio(loop_scope="session")

# Secrets a service may require at start; a setting a service does not have is ignored.
LOCAL_SECRETS = {"JWT_SECRET": "docs-test-secret-0123456789abcdefghijklmnopqrstuvwxyz",
                 "ADMIN_API_KEY": "docs-test-admin-key", "SHOPIFY_WEBHOOK_SECRET": "docs-test-shopify",
                 "WOOCOMMERCE_WEBHOOK_SECRET": "docs-test-woo"}


def build_app(name: str, base_env: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    """The service's app from its composition root, configured the way its process is:
    from <NAME>_* environment variables."""
    for key, value in {**base_env, **LOCAL_SECRETS}.items():
        monkeypatch.setenv(f"{name.upper()}_{key}", value)
    return importlib.import_module(f"services.{name}.main").create_app()


async def served(app) -> tuple[uvicorn.Server, asyncio.Task, int]:
    """The app over real HTTP on a free port. No lifespan: the documents and their pages
    need neither the broker nor the database."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    return server, task, port


@pytest.mark.parametrize("name", discover_services())
async def test_docs_render_offline_with_every_operation(name, base_env, monkeypatch):
    app = build_app(name, base_env, monkeypatch)
    operations = sum(len(item) for item in app.openapi()["paths"].values())
    server, task, port = await served(app)
    try:
        async with browser_page() as page:
            await page.goto(f"http://127.0.0.1:{port}/docs")
            await page.wait_for_selector(".swagger-ui .info .title", timeout=20_000)
            title = await page.inner_text(".swagger-ui .info .title")
            rendered = await page.locator(".opblock").count()
            blocked, errors = list(page.blocked), list(page.console_errors)
    finally:
        server.should_exit = True
        await task
    assert app.title in title
    assert rendered == operations, (rendered, operations)
    assert not blocked and not errors, (blocked, errors)
