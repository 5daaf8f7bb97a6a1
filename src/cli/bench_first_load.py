"""First load of each dashboard page in Chromium (run by `threatlake bench dashboard --browser`).

Environment: BASE, USER, PASSWORD, PAGES (JSON list of paths), CHROMIUM, RUNS. Each load is in a fresh
browser context (empty cache, so every asset is fetched), signed in first; the figure is navigation
start to the load event plus the charts drawn (Navigation Timing). Prints one JSON line per page.
"""

import json
import os

from playwright.sync_api import sync_playwright

BASE = os.environ["BASE"].rstrip("/")
PAGES = json.loads(os.environ["PAGES"])
RUNS = int(os.environ.get("RUNS", "3"))

with sync_playwright() as p:
    browser = p.chromium.launch(
        executable_path=os.environ["CHROMIUM"],
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run"],
    )
    for path in PAGES:
        times = []
        for _ in range(RUNS):
            ctx = browser.new_context(viewport={"width": 1280, "height": 800})
            page = ctx.new_page()
            page.set_default_timeout(120000)
            page.goto(BASE + "/login")
            page.fill("#username", os.environ["USER"])
            page.fill("#password", os.environ["PASSWORD"])
            page.click("button[type=submit]")
            page.wait_for_url(BASE + "/")
            # A new context per load: nothing cached from the sign-in's own page either.
            cookies = ctx.cookies()
            ctx.close()
            ctx = browser.new_context(viewport={"width": 1280, "height": 800})
            ctx.add_cookies(cookies)
            page = ctx.new_page()
            page.set_default_timeout(120000)
            page.goto(BASE + path, wait_until="load")
            page.wait_for_function(
                "() => [...document.querySelectorAll('.chart[data-kind]')].every(e => e.dataset.drawn)")
            ms = page.evaluate("""() => {
                const n = performance.getEntriesByType('navigation')[0];
                return Math.max(n.loadEventEnd, performance.now()) - n.startTime;
            }""")
            times.append(ms)
            ctx.close()
        print(json.dumps({"page": path, "ms": sorted(times)}), flush=True)
    browser.close()
