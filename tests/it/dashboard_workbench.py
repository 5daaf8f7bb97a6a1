"""The mapping workbench in a real browser (Debian chromium driven by Playwright).

Environment: BASE, ANALYST, READER, PASSWORD, OUT (screenshots). An analyst maps a report, accepts,
rejects and corrects suggestions, and uploads the report as a PDF (good and broken); a reader sees no
decision buttons and a forged decision is refused.
Prints one JSON line: the decisions made; exits non-zero on the first failure.
"""

import json
import os
import sys
import urllib.parse

from playwright.sync_api import sync_playwright

BASE = os.environ["BASE"].rstrip("/")
HOST = urllib.parse.urlparse(BASE).netloc
OUT = os.environ["OUT"]
CRADLE = ("The loader runs powershell -nop -w hidden -enc with an IEX (New-Object Net.WebClient)."
          "DownloadString cradle to fetch the next stage.")
REPORT = f"""<h1>Campaign notes</h1>
<p>Invoices sent as ISO attachments contain a shortcut file that the victim opens.</p>
<p>{CRADLE}</p>
<p>The beacon persists with a scheduled task named OneDriveUpdate and &lt;script&gt;alert(1)&lt;/script&gt; &quot;&gt;&lt;img src=x onerror=alert(2)&gt; beacons every minute.</p>
<script>alert(4)</script>
<ul><li>203.0.113.45</li><li>update-cdn-sync.example</li></ul>
"""


def pdf(lines):
    """A one-page PDF (Helvetica, a line per entry) laid out as the PDF 1.4 reference describes."""
    esc = [ln.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") for ln in lines]
    stream = "BT /F1 9 Tf 12 TL 30 750 Td\n" + "".join(f"({ln}) Tj T*\n" for ln in esc) + "ET"
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
        " /Resources << /Font << /F1 5 0 R >> >> >>",
        f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    ]
    out, offsets = b"%PDF-1.4\n", []
    for i, o in enumerate(objects):
        offsets.append(len(out))
        out += f"{i + 1} 0 obj\n{o}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


def fail(msg):
    print("FAIL: " + msg, file=sys.stderr)
    sys.exit(1)


with sync_playwright() as p:
    browser = p.chromium.launch(
        executable_path="/usr/bin/chromium",
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run"],
    )
    problems = []

    def session(user, viewport):
        ctx = browser.new_context(viewport=viewport)
        ctx.add_init_script(
            "window.__csp = []; document.addEventListener('securitypolicyviolation',"
            " e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));"
        )
        page = ctx.new_page()
        page.set_default_timeout(60000)
        page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
        page.on("pageerror", lambda e: problems.append(f"error: {e}"))
        page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
        page.on("request", lambda r: urllib.parse.urlparse(r.url).netloc not in (HOST, "")
                and not r.url.startswith("data:") and problems.append(f"foreign request {r.url}"))
        page.goto(BASE + "/login")
        page.fill("#username", user)
        page.fill("#password", os.environ["PASSWORD"])
        page.click("button[type=submit]")
        page.wait_for_url(BASE + "/")
        return ctx, page

    def submit(page):
        page.goto(BASE + "/workbench")
        page.fill("#text", REPORT)
        page.click("form[action='/workbench'] button[type=submit]")
        page.wait_for_load_state("load")
        if page.evaluate("window.__csp"):
            problems.append(f"CSP violations {page.evaluate('window.__csp')}")

    ctx, page = session(os.environ["ANALYST"], {"width": 1280, "height": 800})
    submit(page)
    sentences = page.locator("section.sentence")
    texts = [sentences.nth(i).locator(".said").inner_text() for i in range(sentences.count())]
    if any("203.0.113.45" in t for t in texts) or len(texts) < 3:
        fail(f"the indicator list was mapped as prose, or sentences are missing: {texts}")
    cradle = sentences.filter(has_text="DownloadString")
    if cradle.count() != 1:
        fail(f"the PowerShell sentence is not one section: {texts}")
    ids = cradle.locator("tr[data-technique]").evaluate_all("rs => rs.map(r => r.dataset.technique)")
    # PowerShell, or its parent the way report annotators label report prose (README: Techniques and
    # sub-techniques).
    family = [i for i in ids if i in ("T1059.001", "T1059")]
    if not family:
        fail(f"neither T1059.001 nor T1059 is among the cradle's top 3: {ids}")
    accepted = family[0]
    joined = " ".join(texts)
    if "<script>alert(1)</script>" not in joined or '"><img src=x onerror=alert(2)>' not in joined:
        fail(f"the hostile markup in the report's text is not shown as text: {texts}")
    if "alert(4)" in joined:
        fail("the report's own script element was mapped as prose")
    page.screenshot(path=os.path.join(OUT, "workbench-desktop.png"), full_page=True)
    # Accept it; reject the cradle's other suggestions; correct the first sentence's first.
    decisions = []
    row = cradle.locator(f"tr[data-technique='{accepted}']")
    row.locator("button[value=accept]").click()
    row.locator(".decided").wait_for()
    decisions.append(["accept", accepted, row.locator(".decided").inner_text()])
    for other in [i for i in ids if i != accepted]:
        r = cradle.locator(f"tr[data-technique='{other}']")
        r.locator("button[value=reject]").click()
        r.locator(".decided").wait_for()
        decisions.append(["reject", other, r.locator(".decided").inner_text()])
    first = sentences.nth(0).locator("tr[data-technique]").first
    suggested = first.get_attribute("data-technique")
    first.locator("input[name=correct]").fill("T1566.001")
    first.locator("button[value=correct]").click()
    first.locator(".decided").wait_for()
    decisions.append(["correct", suggested, first.locator(".decided").inner_text()])
    for verdict, tid, said in decisions:
        if tid not in said:
            fail(f"{verdict} {tid}: the page said {said!r}")
    # A PDF report is read on the server: its sentences are mapped like pasted text.
    page.goto(BASE + "/workbench")
    page.set_input_files("#file", files=[{"name": "campaign.pdf", "mimeType": "application/pdf",
                                          "buffer": pdf(["Campaign notes", "", CRADLE])}])
    page.click("form[action='/workbench'] button[type=submit]")
    page.wait_for_load_state("load")
    from_pdf = page.locator("section.sentence").filter(has_text="DownloadString")
    if from_pdf.count() != 1:
        fail(f"the PDF's cradle sentence is not mapped: {page.locator('main').inner_text()[:600]}")
    ids = from_pdf.locator("tr[data-technique]").evaluate_all("rs => rs.map(r => r.dataset.technique)")
    if accepted not in ids:
        fail(f"{accepted} is not among the PDF cradle's top 3: {ids}")
    if "DownloadString" not in page.input_value("#text"):
        fail("the text read from the PDF is not shown in the text box")
    page.screenshot(path=os.path.join(OUT, "workbench-pdf.png"), full_page=True)
    # A broken PDF with a hostile name gets an error naming it (as text) and the fix.
    page.goto(BASE + "/workbench")
    seen = len(problems)
    hostile = '"><img src=x onerror=alert(5)>.pdf'
    page.set_input_files("#file", files=[{"name": hostile, "mimeType": "application/pdf",
                                          "buffer": b"%PDF-1.7\n1 0 obj << /Type /Catalog"}])
    with page.expect_response(BASE + "/workbench") as resp:
        page.click("form[action='/workbench'] button[type=submit]")
    if resp.value.status != 400:
        fail(f"a broken PDF answered {resp.value.status}")
    page.wait_for_load_state("load")
    said = page.locator("#error").inner_text()
    # Chromium sends the name's quote as %22; the rest arrives as typed.
    if hostile[1:] + ": the PDF's text could not be read" not in said or "paste its text" not in said:
        fail(f"the broken PDF's error does not name it and the fix: {said[:400]}")
    if page.locator("main img").count():
        fail("the hostile file name became an element")
    # Chromium logs the (expected) 400 of that form post as a console error; nothing else may appear.
    problems[seen:] = [m for m in problems[seen:] if "status of 400 (Bad Request)" not in m]
    # A decision form without the session's CSRF token is refused.
    r = page.request.post(BASE + "/workbench/feedback", form={
        "csrf_token": "forged", "doc": "x", "sentence": "x", "suggested": "T1059", "decision": "accept"})
    if r.status != 403:
        fail(f"a forged CSRF token answered {r.status}")
    ctx.close()

    ctx, page = session(os.environ["READER"], {"width": 390, "height": 844})
    submit(page)
    if page.locator("section.sentence").count() == 0:
        fail("a reader gets no suggestions")
    if page.locator("form.decide").count():
        fail("a reader sees decision buttons")
    csrf = page.get_attribute("meta[name=csrf-token]", "content")
    r = page.request.post(BASE + "/workbench/feedback", form={
        "csrf_token": csrf, "doc": "x", "sentence": "x", "suggested": "T1059", "decision": "accept"})
    if r.status != 403:
        fail(f"a reader's decision answered {r.status}")
    page.screenshot(path=os.path.join(OUT, "workbench-phone.png"), full_page=True)
    ctx.close()
    browser.close()
    if problems:
        fail("; ".join(problems))

print(json.dumps({"decisions": decisions, "cradle": CRADLE, "first": texts[0], "accepted": accepted}))
