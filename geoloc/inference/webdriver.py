"""A minimal W3C WebDriver client over HTTP (stdlib only): enough to drive headless Chromium through
``chromedriver`` in the served page's browser test and to take the README's screenshot, without Selenium.

    with Chromium() as browser:           # starts chromedriver and a headless Chromium session
        browser.get("http://127.0.0.1:8000/")
        browser.find("#file").send_keys("/path/photo.jpg")
        browser.wait_for("body[data-state='answered']")
        browser.screenshot("page.png")

Chromium and its driver come from Debian (``sudo make browser``: ``chromium``, ``chromium-driver``);
:func:`find_chromium` says what is missing.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference


def find_chromium() -> tuple[str, str] | str:
    """``(chromium, chromedriver)`` paths, or a sentence saying what is missing and how to install it."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists()
                                              else None)
    if browser and driver:
        return browser, driver
    missing = [n for n, p in (("chromium", browser), ("chromedriver", driver)) if not p]
    return f"{' and '.join(missing)} not installed; install with `sudo make browser` (Debian chromium chromium-driver)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Element:
    def __init__(self, browser: Chromium, ref: str):
        self.browser, self.ref = browser, ref

    def send_keys(self, text: str) -> None:
        self.browser._call("POST", f"/element/{self.ref}/value", {"text": text})

    @property
    def text(self) -> str:
        return self.browser._call("GET", f"/element/{self.ref}/text")


class Chromium:
    """A headless Chromium session through chromedriver (both from :func:`find_chromium`).

    Args:
        width, height: the window.
        timeout: seconds :meth:`wait_for` waits by default.
    """

    def __init__(self, width: int = 1400, height: int = 900, timeout: float = 60.0):
        found = find_chromium()
        if isinstance(found, str):
            raise FileNotFoundError(found)
        self.chromium, self.driver = found
        self.size, self.timeout = (width, height), timeout
        self.port = _free_port()
        self.proc = subprocess.Popen([self.driver, f"--port={self.port}"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        self.session = None
        deadline = time.time() + 30
        while True:
            try:
                self._request("GET", "/status")
                break
            except (urllib.error.URLError, ConnectionError) as e:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise RuntimeError(f"{self.driver} did not start") from e
                time.sleep(0.2)
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": self.chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={width},{height}", "--no-first-run", "--no-default-browser-check"]}}}}
        self.session = self._request("POST", "/session", caps)["value"]["sessionId"]

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            detail = json.loads(e.read() or b"{}").get("value", {})
            raise RuntimeError(f"webdriver {method} {path}: {detail.get('error')}: "
                               f"{str(detail.get('message', ''))[:300]}") from e

    def _call(self, method: str, path: str, body: dict | None = None):
        return self._request(method, f"/session/{self.session}{path}", body if method == "POST" else None)["value"]

    def get(self, url: str) -> None:
        self._call("POST", "/url", {"url": url})

    def find(self, css: str) -> Element:
        return Element(self, self._call("POST", "/element", {"using": "css selector", "value": css})[ELEMENT])

    def find_all(self, css: str) -> list[Element]:
        return [Element(self, e[ELEMENT]) for e in
                self._call("POST", "/elements", {"using": "css selector", "value": css})]

    def run(self, script: str, *args):
        """Runs JavaScript in the page; returns its value."""
        return self._call("POST", "/execute/sync", {"script": script, "args": list(args)})

    def wait_for(self, css: str, timeout: float | None = None) -> Element:
        """The first element matching ``css``, once there is one (TimeoutError after ``timeout`` seconds)."""
        deadline = time.time() + (self.timeout if timeout is None else timeout)
        while True:
            found = self.find_all(css)
            if found:
                return found[0]
            if time.time() > deadline:
                raise TimeoutError(f"no {css!r} in the page after {timeout or self.timeout:g} s")
            time.sleep(0.2)

    def screenshot(self, path: str | Path) -> Path:
        Path(path).write_bytes(base64.b64decode(self._call("GET", "/screenshot")))
        return Path(path)

    def close(self) -> None:
        try:
            if self.session:
                self._request("DELETE", f"/session/{self.session}")
        except Exception:  # noqa: BLE001 - closing a session that already ended
            pass
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
