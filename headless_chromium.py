"""Debian's headless Chromium driven through its chromedriver with the few W3C WebDriver commands that the chat page's
test and the docs' screenshot need (docs/serve_screenshot.py, tests/test_serve.py). Plain HTTP from the standard
library: no selenium (its trio dependency broke scripts/check_imports.py), no driver manager, nothing downloaded.

    with chromium(profile_dir) as browser:
        browser.open("http://127.0.0.1:8000/")
        browser.type("#message", "Hello")
"""

import base64
import contextlib
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")  # apt-get install chromium-driver
# without the background-networking flags Chromium floods a closed network with refused connections
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C WebDriver key of an element reference


def installed() -> bool:
    return CHROMIUM.exists() and CHROMEDRIVER.exists()


@contextlib.contextmanager
def chromium(user_data_dir: Path, window: tuple = (1000, 700)) -> Iterator["WebDriver"]:
    """chromedriver on a free port of 127.0.0.1 and one headless Chromium session with a fresh profile in
    `user_data_dir` and a window of `window` (width, height) pixels; both end on exit."""
    if not installed():
        raise FileNotFoundError(f"{CHROMIUM} or {CHROMEDRIVER} is missing: apt-get install chromium chromium-driver")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    driver = subprocess.Popen([str(CHROMEDRIVER), f"--port={port}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: reachable(url + "/status"), timeout=30, what="chromedriver to start")
        browser = WebDriver(url, user_data_dir, window)
        try:
            yield browser
        finally:
            browser.close()
    finally:
        driver.terminate()
        driver.wait(timeout=30)


class WebDriver:
    """A session of chromedriver at `url`: the W3C WebDriver commands as methods."""

    def __init__(self, url: str, user_data_dir: Path, window: tuple) -> None:
        self.url = url
        args = CHROMIUM_ARGS + [f"--user-data-dir={user_data_dir}", f"--window-size={window[0]},{window[1]}"]
        options = {"binary": str(CHROMIUM), "args": args}
        self.session = self.command("POST", "/session", {"capabilities": {"alwaysMatch": {
            "browserName": "chrome", "goog:chromeOptions": options}}})["sessionId"]

    def command(self, method: str, path: str, body: Optional[dict] = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())["value"]
        except urllib.error.HTTPError as error:
            raise RuntimeError(f"WebDriver {method} {path}: {error.code} {error.read().decode()}") from None

    def __call__(self, method: str, path: str, body: Optional[dict] = None) -> Any:
        return self.command(method, f"/session/{self.session}{path}", body)

    def open(self, url: str) -> None:
        self("POST", "/url", {"url": url})

    def element(self, css: str) -> str:
        return self("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def type(self, css: str, text: str) -> None:
        element = self.element(css)
        self("POST", f"/element/{element}/clear", {})
        self("POST", f"/element/{element}/value", {"text": text})

    def click(self, css: str) -> None:
        self("POST", f"/element/{self.element(css)}/click", {})

    def script(self, source: str) -> Any:
        return self("POST", "/execute/sync", {"script": source, "args": []})

    def set_viewport(self, width: int, height: int) -> None:
        """Resize the window so that the page's view (the window less the browser's bars) is width x height."""
        inner_width, inner_height = self.script("return [window.innerWidth, window.innerHeight]")
        rect = self("GET", "/window/rect")
        self("POST", "/window/rect", {"width": rect["width"] + width - inner_width,
                                      "height": rect["height"] + height - inner_height})

    def screenshot(self) -> bytes:
        """The viewport as PNG bytes."""
        return base64.b64decode(self("GET", "/screenshot"))

    def close(self) -> None:
        self("DELETE", "")


def reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except OSError:  # refused, not yet listening (urllib.error.URLError is an OSError)
        return False


def wait_for(condition: Callable[[], bool], timeout: float = 30, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
