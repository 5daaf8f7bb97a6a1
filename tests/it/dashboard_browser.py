"""The dashboard in a real browser (Debian chromium driven by Playwright), against `threatlake serve`.

Environment: BASE (server URL), ANALYST / READER (user names; password in PASSWORD), TOKEN (a reader
API token, for the SQL answers the pages must equal), HOSTILE (the hostile pulse's item id), OUT
(screenshots). Prints one JSON line of what it checked; exits non-zero on the first failure.
"""

import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

from playwright.sync_api import sync_playwright

BASE = os.environ["BASE"].rstrip("/")
HOST = urllib.parse.urlparse(BASE).netloc
OUT = os.environ["OUT"]
PASSWORD = os.environ["PASSWORD"]
TOKEN = os.environ["TOKEN"]
HOSTILE = os.environ["HOSTILE"]
PAYLOADS = ["<script>alert(1)</script>", '"><img src=x onerror=alert(2)>', "javascript:alert(3)"]
HOSTILE_TEXT = " ".join(PAYLOADS)
PAGES = ["/", "/map", "/matrix", "/matrix?sub=1", "/items", "/threat-model", "/sql", "/jobs"]
checked = []


def fail(msg):
    print("FAIL: " + msg, file=sys.stderr)
    sys.exit(1)


def sql(query):
    """The API's answer to `query` (rows as dicts)."""
    req = urllib.request.Request(
        BASE + "/api/v1/sql",
        data=json.dumps({"sql": query}).encode(),
        headers={"Authorization": "Bearer " + TOKEN, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["rows"]


def scalar(query):
    rows = sql(query)
    return list(rows[0].values())[0]


def quote(s):
    return "'" + s.replace("'", "''") + "'"


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *a, **k):
        return None


# Without a session every page sends the browser to the sign-in page.
opener = urllib.request.build_opener(NoRedirect)
for path in PAGES + ["/techniques/T0853", "/items/" + urllib.parse.quote(HOSTILE, safe="")]:
    try:
        opener.open(BASE + path, timeout=30)
        fail(f"{path} answered without a session")
    except urllib.error.HTTPError as e:
        if e.code not in (302, 303, 307) or e.headers.get("Location") != "/login":
            fail(f"{path} without a session: {e.code} {e.headers.get('Location')}")
checked.append("redirects")

with sync_playwright() as p:
    browser = p.chromium.launch(
        executable_path="/usr/bin/chromium",
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run"],
    )
    problems, foreign, dialogs = [], [], []

    def session(user, viewport):
        ctx = browser.new_context(viewport=viewport, accept_downloads=True)
        # Runs before the page's scripts, outside the page's CSP: records every violation.
        ctx.add_init_script(
            "window.__csp = []; document.addEventListener('securitypolicyviolation',"
            " e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));"
        )
        page = ctx.new_page()
        page.set_default_timeout(30000)
        page.on("console", lambda m: m.type == "error" and problems.append(f"{page.url}: console: {m.text}"))
        page.on("pageerror", lambda e: problems.append(f"{page.url}: error: {e}"))
        page.on("request", lambda r: urllib.parse.urlparse(r.url).netloc not in (HOST, "")
                and not r.url.startswith("data:") and foreign.append(r.url))

        def on_dialog(d):
            dialogs.append(f"{page.url}: {d.message}")
            d.dismiss()

        page.on("dialog", on_dialog)
        page.goto(BASE + "/login")
        page.fill("#username", user)
        page.fill("#password", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(BASE + "/")
        return ctx, page

    def visit(page, path, shot=None):
        page.goto(BASE + path)
        page.wait_for_load_state("load")
        page.wait_for_timeout(300)
        csp = page.evaluate("window.__csp")
        if csp:
            problems.append(f"{path}: CSP violations {csp}")
        # No element an injected payload would have made, no javascript: link.
        if page.locator("img[src='x'], a[href^='javascript:'], iframe").count():
            fail(f"{path}: an injected element is in the page")
        scripts = page.eval_on_selector_all("script[src]", "els => els.map(e => e.getAttribute('src'))")
        if any(not s.startswith("/assets/") for s in scripts) or page.locator("script:not([src]):not([type='application/json'])").count():
            fail(f"{path}: a script that is not the server's own: {scripts}")
        if shot:
            page.screenshot(path=os.path.join(OUT, shot), full_page=True)

    def check_clean(where):
        if problems:
            fail(f"{where}: " + "; ".join(problems))
        if dialogs:
            fail(f"{where}: a dialog opened: {dialogs}")
        if foreign:
            fail(f"{where}: requests to another host: {foreign}")

    ctx, page = session(os.environ["ANALYST"], {"width": 1280, "height": 800})
    hostile_path = "/items/" + urllib.parse.quote(HOSTILE, safe="")
    all_pages = PAGES + ["/sql?sql=" + urllib.parse.quote("SELECT source, count(*) AS n FROM threat_intelligence_data GROUP BY source ORDER BY n DESC"),
                         "/techniques/T0853", hostile_path]
    for i, path in enumerate(all_pages):
        visit(page, path, f"desktop-{i:02d}.png")
    check_clean("desktop pages")
    checked.append("pages")

    # The hostile pulse's text shows as text on its page and in the lists.
    visit(page, hostile_path)
    body = page.inner_text("body")
    for payload in PAYLOADS:
        if payload not in body:
            fail(f"the hostile item page does not show {payload!r} as text")
    visit(page, "/items?q=" + urllib.parse.quote("alert(1)"))
    if PAYLOADS[0] not in page.inner_text("#results"):
        fail("the item list does not show the hostile title as text")
    # Its raw response, as the feed sent it: JSON shown as text, never run.
    visit(page, hostile_path)
    with page.expect_response(lambda r: r.url.endswith("/raw")) as resp:
        page.click("#raw-link")
    page.wait_for_load_state("load")
    if resp.value.status != 200 or not resp.value.headers["content-type"].startswith("application/json"):
        fail(f"the raw response link answered {resp.value.status} {resp.value.headers.get('content-type')}")
    raw = json.loads(resp.value.text())
    if not any("otx:" + r.get("id", "") == HOSTILE and r.get("name") == HOSTILE_TEXT for r in raw.get("results", [])):
        fail(f"the raw response is not the hostile pulse's: {str(raw)[:300]}")
    if page.locator("img").count():
        fail("the raw response's markup became elements")
    # Chart tooltips: hovering the hostile family's bar draws its whole name as chart text only.
    visit(page, "/")
    spot = page.evaluate("""(x) => {
        const el = document.getElementById('chart-families');
        const c = echarts.getInstanceByDom(el);
        const i = c.getOption().yAxis[0].data.indexOf(x);
        if (i < 0) return null;
        const [px, py] = c.convertToPixel({seriesIndex: 0}, [0.5, i]);
        const r = el.getBoundingClientRect();
        return {x: r.left + px + 2, y: r.top + py};
    }""", HOSTILE_TEXT)
    if spot is None:
        fail("the hostile family has no bar on the overview")
    shown = "(x) => document.getElementById('chart-families').textContent.includes(x)"
    if page.evaluate(shown, HOSTILE_TEXT):
        fail("the family axis shows the whole hostile name before any hover (labels should be cut)")
    page.mouse.move(spot["x"], spot["y"])
    page.wait_for_function(shown, arg=HOSTILE_TEXT, timeout=10000)
    if page.locator("#chart-families img, #chart-families script, #chart-families a[href^='javascript']").count():
        fail("the tooltip injected an element")
    page.screenshot(path=os.path.join(OUT, "desktop-tooltip.png"))
    checked.append("hostile text")

    # Overview numbers equal SQL.
    visit(page, "/")
    total = int(page.inner_text("#total-items"))
    if total != scalar("SELECT count(*) FROM threat_intelligence_data"):
        fail(f"overview total {total} is not the SQL count")
    # Drag across the time chart: the range becomes the URL filter, and the counts follow it.
    box = page.locator("#chart-time").bounding_box()
    page.mouse.move(box["x"] + 50, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] - 20, box["y"] + box["height"] / 2, steps=8)
    page.mouse.up()
    page.wait_for_url("**/?*since=*", timeout=10000)
    page.wait_for_load_state("load")
    q = urllib.parse.parse_qs(urllib.parse.urlparse(page.url).query)
    since, until = q["since"][0], q["until"][0]
    want = scalar(f"SELECT count(*) FROM threat_intelligence_data WHERE observed_at >= TIMESTAMP {quote(since + 'T00:00:00Z')} "
                  f"AND observed_at < TIMESTAMP {quote(until + 'T00:00:00Z')}")
    got = int(page.inner_text("#total-items"))
    if got != want:
        fail(f"after selecting {since}..{until}: overview shows {got}, SQL says {want}")
    page.screenshot(path=os.path.join(OUT, "desktop-range.png"), full_page=True)
    # Click the first family bar: the family becomes the filter.
    visit(page, "/")
    first = page.evaluate("""() => {
        const c = echarts.getInstanceByDom(document.getElementById('chart-families'));
        const [x, y] = c.convertToPixel({seriesIndex: 0}, [0.5, 0]);
        const r = document.getElementById('chart-families').getBoundingClientRect();
        return {x: r.left + x + 3, y: r.top + y, label: c.getOption().yAxis[0].data[0]};
    }""")
    page.mouse.click(first["x"], first["y"])
    page.wait_for_url("**family=*", timeout=10000)
    page.wait_for_load_state("load")
    fam = urllib.parse.parse_qs(urllib.parse.urlparse(page.url).query)["family"][0]
    if fam != first["label"]:
        fail(f"clicked {first['label']!r}, filtered by {fam!r}")
    want = scalar(f"SELECT count(*) FROM threat_intelligence_data WHERE family = {quote(fam)}")
    if int(page.inner_text("#total-items")) != want:
        fail(f"family {fam!r}: overview disagrees with SQL ({want})")
    checked.append("overview counts")

    # The matrix cell with most items: its count, its technique page and SQL agree.
    visit(page, "/matrix")
    cells = page.eval_on_selector_all(".cell[data-count]", "els => els.map(e => [e.dataset.technique, +e.dataset.count, e.getAttribute('href')])")
    tid, n, href = max(cells, key=lambda c: c[1])
    if n <= 0:
        fail("no matrix cell has items")
    parent = tid.split(".")[0]
    want = scalar("SELECT count(DISTINCT m.item_id) FROM mapped_threat_data m JOIN threat_intelligence_data t "
                  "ON m.item_id = t.item_id AND m.item_version = t.item_version "
                  f"WHERE split_part(m.technique_id, '.', 1) = {quote(parent)}")
    if n != want:
        fail(f"matrix cell {tid}: {n}, SQL {want}")
    page.click(f".cell[data-technique='{tid}']")
    page.wait_for_load_state("load")
    if int(page.inner_text("#technique-count")) != n:
        fail(f"technique page of {tid} disagrees with its matrix cell ({n})")
    checked.append("matrix counts")

    # The Navigator layer of the matrix loads with MITRE's own library.
    visit(page, "/matrix")
    with page.expect_download() as d:
        page.click("#download-layer")
    layer_path = os.path.join(OUT, "matrix-layer.json")
    d.value.save_as(layer_path)
    from mitreattack.navlayers import Layer
    layer = Layer()
    layer.from_file(layer_path)
    ids = {t.techniqueID for t in layer.layer.techniques}
    if tid not in ids and parent not in ids:
        fail(f"the layer lacks {tid}: {sorted(ids)[:10]}")
    with page.expect_download() as d:
        page.click("#download-svg")
    svg_path = os.path.join(OUT, "matrix.svg")
    d.value.save_as(svg_path)
    if "<svg" not in open(svg_path, encoding="utf-8").read(2000):
        fail("the matrix SVG download is not SVG")
    checked.append("navigator layer")

    # The map: a country's count, its items page and SQL agree.
    visit(page, "/map")
    rows = page.eval_on_selector_all("#countries tbody tr", "trs => trs.map(t => [t.cells[0].innerText, +t.cells[1]?.innerText])")
    rows = [r for r in rows if r[1] == r[1] and r[1] > 0]
    if not rows:
        fail("the map lists no country")
    country, n = rows[0]
    if n != scalar(f"SELECT count(*) FROM threat_intelligence_data WHERE country = {quote(country)}"):
        fail(f"map count of {country!r} disagrees with SQL")
    shape = page.locator("svg.world a.country path[data-count]").first
    shape.hover()
    page.locator("svg.world a.country").first.click()
    page.wait_for_url("**/items?*country=*")
    q = urllib.parse.parse_qs(urllib.parse.urlparse(page.url).query)["country"][0]
    if int(page.inner_text("#items-total")) != scalar(f"SELECT count(*) FROM threat_intelligence_data WHERE country = {quote(q)}"):
        fail(f"the items of {q!r} from the map disagree with SQL")
    checked.append("map counts")

    # The SQL console: result and CSV.
    visit(page, "/sql?sql=" + urllib.parse.quote("SELECT count(*) AS n FROM otx_data"))
    if page.inner_text("#sql-result tbody td") != str(scalar("SELECT count(*) AS n FROM otx_data")):
        fail("the SQL console's answer differs from the API's")
    checked.append("sql console")

    # Analyst starts a job from the Jobs page; it shows up in the history.
    visit(page, "/jobs")
    before = page.locator("#runs tbody tr").count()
    page.select_option("select[name=job]", "snapshot")
    page.click("form[action='/jobs'] button")
    page.wait_for_url(BASE + "/jobs")
    for _ in range(60):
        page.goto(BASE + "/jobs")
        if page.locator("#runs tbody tr").count() > before:
            break
        page.wait_for_timeout(1000)
    else:
        fail("the started job never appeared in the history")
    checked.append("jobs")

    # Keyboard: the first Tab reaches the skip link.
    page.keyboard.press("Tab")
    if page.evaluate("document.activeElement.className") != "skip":
        fail("the first Tab does not reach the skip link")
    check_clean("checks")
    ctx.close()

    # Phone width.
    ctx, page = session(os.environ["READER"], {"width": 390, "height": 844})
    for i, path in enumerate(all_pages):
        visit(page, path, f"phone-{i:02d}.png")
    # A reader has no start form, and a forged start is refused.
    visit(page, "/jobs")
    if page.locator("form[action='/jobs']").count():
        fail("a reader sees the job start form")
    csrf = page.get_attribute("meta[name=csrf-token]", "content")
    r = page.request.post(BASE + "/jobs", form={"csrf_token": csrf, "job": "snapshot"})
    if r.status != 403:
        fail(f"a reader's job start answered {r.status}")
    check_clean("phone pages")
    checked.append("reader")
    ctx.close()
    browser.close()

print(json.dumps({"checked": checked, "screenshots": sorted(os.listdir(OUT))}))
