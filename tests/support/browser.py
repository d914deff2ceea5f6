"""A real headless Chromium page for browser tests: Debian's /usr/bin/chromium driven by
playwright (playwright's own browser download cannot work offline; make test installs the
package through deploy/local/ensure_chromium.py).

    from tests.support.browser import browser_page

    async def test_page(...):
        async with browser_page() as page:
            await page.goto(url)

`offline=True` (the default) blocks every request that does not go to 127.0.0.1/localhost,
so a page that needs the internet fails its test instead of passing on a connected machine.
`page.blocked` lists the URLs that were refused; `page.console_errors` the console errors.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

from playwright.async_api import Page, Route, async_playwright

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


@asynccontextmanager
async def browser_page(*, offline: bool = True) -> AsyncIterator[Page]:
    if not CHROMIUM.exists():
        raise RuntimeError(f"{CHROMIUM} is missing: python -m deploy.local.ensure_chromium")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            context = await browser.new_context()
            page = await context.new_page()
            page.blocked = []
            page.console_errors = []
            page.on("console", lambda msg: msg.type == "error" and page.console_errors.append(msg.text))
            if offline:
                async def only_local(route: Route) -> None:
                    url = route.request.url
                    if urlsplit(url).scheme in ("data", "blob") or urlsplit(url).hostname in LOCAL_HOSTS:
                        await route.continue_()
                    else:
                        page.blocked.append(url)
                        await route.abort("internetdisconnected")

                await context.route("**/*", only_local)
            yield page
        finally:
            await browser.close()
