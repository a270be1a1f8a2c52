"""The status page at /admin/ in a real headless Chromium (Playwright).

Run by tests/status_page.rs against the real binary, which passes:
  PG_ADMIN           the admin listener, http://127.0.0.1:PORT
  PG_BASE            the public listener
  PG_ADMIN_KEY       the admin key
  PG_CLIENT_KEY      a gateway key for chat requests
  PG_PROMPT_FILE     the prompt file to break
  PG_DISABLED_ADMIN  an admin listener without a key
  PG_PLAIN_ADMIN, PG_PLAIN_KEY  a gateway without gateway keys, and its admin key
  PROMPTGATE_CHROMIUM  the Chromium binary (no browser download)
  PROMPTGATE_SCREENSHOTS  optional: a folder for the PNGs
"""

import json
import os
import sys
import time
import urllib.error
import urllib.request

from playwright.sync_api import expect, sync_playwright

ADMIN = os.environ["PG_ADMIN"]
BASE = os.environ["PG_BASE"]
KEY = os.environ["PG_ADMIN_KEY"]
CLIENT_KEY = os.environ["PG_CLIENT_KEY"]
PROMPT_FILE = os.environ["PG_PROMPT_FILE"]
DISABLED = os.environ["PG_DISABLED_ADMIN"]
PLAIN = os.environ["PG_PLAIN_ADMIN"]
PLAIN_KEY = os.environ["PG_PLAIN_KEY"]
CHROMIUM = os.environ.get("PROMPTGATE_CHROMIUM", "/usr/bin/chromium")
SHOTS = os.environ.get("PROMPTGATE_SCREENSHOTS")
WAIT_MS = 10_000

expect.set_options(timeout=WAIT_MS)


def call(method, url, body=None, key=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("content-type", "application/json")
    if key:
        req.add_header("authorization", "Bearer " + key)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def admin(method, path, body=None):
    return call(method, ADMIN + path, body, KEY)


def breaker(target):
    _, s = admin("GET", "/admin/status")
    for r in s["routes"]:
        for t in r.get("targets", []):
            if t["target"] == target:
                return t["breaker"]
    return None


def shot(page, name, full_page=True):
    if SHOTS:
        os.makedirs(SHOTS, exist_ok=True)
        path = os.path.join(SHOTS, name)
        page.screenshot(path=path, full_page=full_page)
        print("screenshot:", path)


def sign_in(page, key):
    page.fill("#key", key)
    page.click("#login-submit")


def watch(page, problems):
    page.on("pageerror", lambda e: problems.append("page error: %s" % e))
    page.on(
        "console",
        lambda m: problems.append("console: " + m.text)
        if "Content Security Policy" in m.text or "Refused to" in m.text
        else None,
    )


T0 = time.monotonic()


def mark(what):
    print("%5.1f s  %s" % (time.monotonic() - T0, what))


def main():
    problems = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox"], headless=True
        )

        # Admin API without a key: the page says so (no login form).
        ctx = browser.new_context(viewport={"width": 1280, "height": 800})
        page = ctx.new_page()
        watch(page, problems)
        page.goto(DISABLED + "/admin/")
        expect(page.locator("#disabled")).to_be_visible()
        expect(page.locator("#disabled")).to_contain_text("disabled")
        expect(page.locator("#login-form")).to_be_hidden()

        # A gateway without gateway keys: no Keys card.
        page.goto(PLAIN + "/admin/")
        sign_in(page, PLAIN_KEY)
        expect(page.locator("#dash")).to_be_visible()
        expect(page.locator("#card-routes")).to_contain_text("sandbox-echo")
        expect(page.locator("#card-keys")).to_be_hidden()
        ctx.close()

        ctx = browser.new_context(viewport={"width": 1280, "height": 900})
        page = ctx.new_page()
        watch(page, problems)
        # /admin redirects to /admin/; without a key the login form shows.
        page.goto(ADMIN + "/admin")
        assert page.url == ADMIN + "/admin/", page.url
        expect(page.locator("#login-form")).to_be_visible()
        expect(page.locator("#dash")).to_be_hidden()
        # Faster polling for the test (`?refresh=SECONDS`).
        page.goto(ADMIN + "/admin/?refresh=0.5")
        expect(page.locator("#login-form")).to_be_visible()

        mark('login form')
        # A wrong key is refused with a message, and the form stays.
        sign_in(page, "not-the-admin-key")
        expect(page.locator("#login-error")).to_be_visible()
        expect(page.locator("#login-error")).to_contain_text("refused this key")
        expect(page.locator("#login-form")).to_be_visible()
        expect(page.locator("#dash")).to_be_hidden()

        # The right key: the dashboard, live.
        sign_in(page, KEY)
        expect(page.locator("#dash")).to_be_visible()
        expect(page.locator("#conn-state")).to_have_text("live")
        stored = page.evaluate("sessionStorage.getItem('promptgate.adminKey')")
        assert stored == KEY, "the key is kept in sessionStorage"
        assert page.evaluate("localStorage.length") == 0, "nothing in localStorage"

        routes = page.locator("#card-routes")
        for name in ["support-chat", "support-ab", "support-shadow", "primary/chat", "backup/chat"]:
            expect(routes).to_contain_text(name)
        providers = page.locator("#card-providers")
        for name in ["primary", "backup", "sandbox", "ready", "breaker closed"]:
            expect(providers).to_contain_text(name)
        prompts = page.locator("#card-prompts")
        for text in ["greeting", "v1", "v2", "production → v1", "staging → v2"]:
            expect(prompts).to_contain_text(text)
        cache = page.locator("#card-cache")
        expect(cache).to_contain_text("Hit rate")
        expect(cache).to_contain_text("50%")  # 3 hits of 6
        experiments = page.locator("#card-experiments")
        for text in ["control", "candidate", "sandbox/echo"]:
            expect(experiments).to_contain_text(text)
        expect(page.locator("#card-keys")).to_be_visible()
        expect(page.locator("#card-keys")).to_contain_text("support-app")
        expect(page.locator("#card-keys")).to_contain_text("rpm")
        expect(page.locator("#updated")).to_contain_text("updated")
        shot(page, "status-page.png")

        mark('healthy page')
        # A drill fault on the primary; requests until its breaker opens.
        status, body = admin(
            "POST",
            "/admin/faults",
            {"provider": "primary", "fault": "error", "status": 503, "duration": "120s"},
        )
        assert status == 201, body
        for i in range(40):
            status, body = call(
                "POST",
                BASE + "/v1/chat/completions",
                {"model": "support-chat", "messages": [{"role": "user", "content": "during the fault %d" % i}]},
                CLIENT_KEY,
            )
            assert status == 200, body  # the backup answers
            if breaker("primary/chat") == "open":
                break
        else:
            sys.exit("the primary's breaker never opened")
        target = page.locator('#card-providers [data-target="primary/chat"]')
        expect(target).to_have_attribute("data-breaker", "open")
        expect(target).to_have_text("breaker open")
        expect(providers).to_contain_text("fault: error 503")
        expect(page.locator("#alerts")).to_contain_text("Breaker open")
        expect(page.locator('#card-routes [data-target="primary/chat"]').first).to_have_text("breaker open")

        mark('breaker open')
        # A broken prompt file and a reload: rejected, and the page shows the
        # file and the problem.
        with open(PROMPT_FILE, "a") as f:
            f.write(
                "  3:\n    route: support-chat\n    messages:\n"
                "      - {role: user, content: \"Hello {{ name \"}\n"
            )
        status, body = admin("POST", "/admin/reload")
        assert status == 422, (status, body)
        problem = body["problems"][0]
        assert problem["file"].endswith("greeting.yaml"), problem
        error = page.locator("#reload-error")
        expect(error).to_be_visible()
        expect(error).to_contain_text("greeting.yaml")
        expect(error).to_contain_text(problem["message"])
        expect(error).to_contain_text("rejected")
        expect(page.locator("#alerts")).to_contain_text("last reload was rejected")
        shot(page, "status-page-fault.png")

        mark('reload error')
        # The gateway stops answering: the page says so.
        page.route("**/admin/status", lambda route: route.abort())
        expect(page.locator("#conn-state")).to_have_text("stale")
        expect(page.locator("#banner")).to_be_visible()
        expect(page.locator("#banner")).to_contain_text("not answering")
        page.unroute("**/admin/status")
        expect(page.locator("#conn-state")).to_have_text("live")
        expect(page.locator("#banner")).to_be_hidden()

        mark('stale')
        # A hidden tab stops polling; shown again, it refreshes at once.
        fetched = []
        page.on("request", lambda r: fetched.append(r.url) if "/admin/status" in r.url else None)
        page.evaluate(
            "Object.defineProperty(document, 'hidden', {value: true, configurable: true});"
            "document.dispatchEvent(new Event('visibilitychange'))"
        )
        expect(page.locator("#conn-state")).to_have_text("paused")
        fetched.clear()
        page.wait_for_timeout(1500)  # three polls' intervals
        assert fetched == [], "a hidden tab kept polling: %s" % fetched
        page.evaluate(
            "Object.defineProperty(document, 'hidden', {value: false, configurable: true});"
            "document.dispatchEvent(new Event('visibilitychange'))"
        )
        expect(page.locator("#conn-state")).to_have_text("live")
        assert fetched, "a visible tab polls again"

        mark('paused')
        # Sign out clears the key.
        page.click("#signout")
        expect(page.locator("#login-form")).to_be_visible()
        assert page.evaluate("sessionStorage.getItem('promptgate.adminKey')") is None
        ctx.close()

        mark('signed out')
        # A phone: one column, no sideways scrolling of the page.
        ctx = browser.new_context(
            viewport={"width": 390, "height": 844},
            device_scale_factor=2,
            is_mobile=True,
            has_touch=True,
        )
        page = ctx.new_page()
        watch(page, problems)
        page.goto(ADMIN + "/admin/")
        sign_in(page, KEY)
        expect(page.locator("#dash")).to_be_visible()
        expect(page.locator('#card-providers [data-target="primary/chat"]')).to_have_attribute("data-breaker", "open")
        expect(page.locator("#reload-error")).to_be_visible()
        width = page.evaluate("[document.scrollingElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], "the page scrolls sideways on a phone: %s" % width
        columns = page.evaluate(
            "getComputedStyle(document.querySelector('.grid')).gridTemplateColumns.split(' ').length"
        )
        assert columns == 1, "one column on a phone, not %s" % columns
        shot(page, "status-page-mobile.png", full_page=False)
        ctx.close()
        browser.close()

    if problems:
        sys.exit("\n".join(problems))
    print("status page: ok")


if __name__ == "__main__":
    start = time.monotonic()
    main()
    print("took %.1f s" % (time.monotonic() - start))
