"""Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4, NUL-separated
JSON): pages are loaded, clicked and screenshotted as a person would see them."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
)


def chromium_available() -> bool:
    return shutil.which(CHROMIUM) is not None


class Page:
    """One tab: navigate, run JavaScript, click, wait, screenshot."""

    def __init__(self, process: subprocess.Popen[bytes], commands: int, events: int) -> None:
        self._process = process
        self._commands = commands
        self._events = events
        self._buffer = b""
        self._next_id = 0
        self.errors: list[str] = []
        target = self._call("Target.createTarget", {"url": "about:blank"})["targetId"]
        attached = self._call("Target.attachToTarget", {"targetId": target, "flatten": True})
        self._session = attached["sessionId"]
        self._call("Runtime.enable", session=True)
        self._call("Page.enable", session=True)

    def goto(self, url: str, width: int = 1400, height: int = 1000) -> None:
        metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
        self._call("Emulation.setDeviceMetricsOverride", metrics, session=True)
        self._call("Page.navigate", {"url": url}, session=True)
        self.wait_for("document.readyState === 'complete'")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (promises awaited)."""
        reply = self._call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            session=True,
        )
        if "exceptionDetails" in reply:
            raise RuntimeError(f"{expression}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30) -> Any:
        """Poll until the expression is truthy; its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(f"never true within {timeout} s: {expression}")

    def click(self, selector: str) -> None:
        """A real mouse click at the middle of the element."""
        box = self.wait_for(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " if (!e || e.disabled) return null; e.scrollIntoView({block: 'center'});"
            " const r = e.getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            event = {"type": kind, "x": box[0], "y": box[1], "button": "left", "clickCount": 1}
            self._call("Input.dispatchMouseEvent", event, session=True)

    def type_into(self, selector: str, text: str) -> None:
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        self._call("Input.insertText", {"text": text}, session=True)

    def screenshot(self, path: Path) -> Path:
        data = self._call("Page.captureScreenshot", {"format": "png"}, session=True)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def _call(
        self, method: str, params: dict[str, Any] | None = None, session: bool = False
    ) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self._session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for reply in self._messages():
                if reply.get("id") == self._next_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    result: dict[str, Any] = reply.get("result", {})
                    return result
            if self._process.poll() is not None:
                raise RuntimeError(f"chromium exited with {self._process.returncode}")
        raise TimeoutError(f"{method}: no answer")

    def _messages(self) -> Iterator[dict[str, Any]]:
        readable, _, _ = select.select([self._events], [], [], 0.2)
        if readable:
            self._buffer += os.read(self._events, 1 << 20)
        while b"\0" in self._buffer:
            raw, self._buffer = self._buffer.split(b"\0", 1)
            message = json.loads(raw)
            method, params = message.get("method"), message.get("params", {})
            if method == "Runtime.exceptionThrown":
                self.errors.append(str(params["exceptionDetails"]))
            elif method == "Runtime.consoleAPICalled" and params["type"] == "error":
                self.errors.append(str(params["args"]))
            yield message


def _above_nine(fd: int) -> int:
    """The same pipe end on a descriptor that the redirection to 3 and 4 cannot clobber."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


@contextmanager
def browser() -> Iterator[Page]:
    """Headless Chromium with a fresh profile; killed with its helpers afterwards."""
    commands_read, commands = os.pipe()
    events, events_write = os.pipe()
    commands_read, events_write = _above_nine(commands_read), _above_nine(events_write)
    profile = tempfile.mkdtemp(prefix="chromium-")
    # bash puts our pipe ends on the fds 3 and 4 that --remote-debugging-pipe uses.
    script = f'exec "$0" "$@" 3<&{commands_read} 4>&{events_write}'
    process = subprocess.Popen(
        ["bash", "-c", script, CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
        pass_fds=(commands_read, events_write),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    os.close(commands_read)
    os.close(events_write)
    try:
        yield Page(process, commands, events)
    finally:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        os.close(commands)
        os.close(events)
        shutil.rmtree(profile, ignore_errors=True)
