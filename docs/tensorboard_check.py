"""Check in a real headless browser that TensorBoard shows a sweep's validation images.

    python docs/tensorboard_check.py --logdir results/<experiment> [--screenshot page.png] [--port N]

Starts TensorBoard on ``--logdir`` (a subprocess on 127.0.0.1), waits until its server has read every image
run on disk, opens the classic Images dashboard in Debian's headless ``chromium`` and, over the Chrome
DevTools Protocol, looks for image cards whose ``<img>`` came from ``data/plugin/images/individualImage``,
actually decoded (``naturalWidth > 0``) and carry the run and tag in their heading. Every image run on disk
must show each expected tag it holds (``reconstruction``, ``attention/level_1`` by default), and each
expected tag must show in at least one run. Prints one line per shown (run, tag) and per run listed
without images (Tune's scalars); exits 1 with one line naming what is missing.

The page is set up as a user would: the settings' pagination limit raised (12 cards per category page
otherwise), and "Toggle All Runs" pressed when TensorBoard selected no run (it selects all only up to 40).

The classic dashboard, not the default Time Series one: Time Series fetches a card's image only once the
card scrolls into view, so a headless page of many runs never loads most of them.

TensorBoard and Chromium run with ``HOME``, ``TMPDIR`` and the XDG directories in one temporary directory
(TensorBoard's ``.tensorboard-info``, Chromium's profile and caches), which is removed at the end together
with both process groups; Chromium's helpers that outlive the browser are adopted (Linux child subreaper)
and reaped. Needs ``chromium`` on ``PATH`` and ``tensorboard`` and ``aiohttp`` (a Ray
dependency, used as the DevTools websocket client) in this interpreter.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

DEFAULT_TAGS = ("reconstruction", "attention/level_1")
VIEWPORT = (1400, 900)
# The classic dashboard shows 12 cards per category page, and a sweep has more runs than that: set the
# page size of TensorBoard's settings dialog ("Pagination Limit"), kept in the page's local storage.
SETTINGS_KEY = "_tb_global_settings"
SETTINGS = {"paginationSize": 10_000}

# Every <img> of the page, through the shadow roots of TensorBoard's Polymer elements: where it came from,
# whether it decoded, and the visible text of its card (the tf-image-loader whose shadow root holds it).
CARDS_JS = r"""
(() => {
  const text = (node) => {
    let out = '';
    for (const child of node.childNodes) {
      if (child.nodeType === Node.TEXT_NODE) out += child.textContent;
      else if (child.nodeType === Node.ELEMENT_NODE && !['STYLE', 'SCRIPT'].includes(child.tagName)) {
        out += ' ' + text(child);
        if (child.shadowRoot) out += ' ' + text(child.shadowRoot);
      }
    }
    return out;
  };
  const cards = [];
  const walk = (root) => {
    for (const el of root.querySelectorAll('*')) {
      if (el.tagName === 'IMG') {
        const host = el.getRootNode().host;
        cards.push({
          src: el.getAttribute('src') || '',
          complete: el.complete,
          width: el.naturalWidth,
          height: el.naturalHeight,
          text: host && host.shadowRoot ? text(host.shadowRoot).replace(/\s+/g, ' ').trim() : '',
        });
      }
      if (el.shadowRoot) walk(el.shadowRoot);
    }
  };
  walk(document);
  return cards;
})()
"""

# A fresh TensorBoard page selects every run only when there are at most 40; with more (a sweep of 20
# trials has 40 runs: scalars and images), none. Then press "Toggle All Runs", as a user would.
SELECT_ALL_JS = r"""
(() => {
  const find = (root, name) => {
    for (const el of root.querySelectorAll('*')) {
      if (el.tagName === name) return el;
      if (el.shadowRoot) { const found = find(el.shadowRoot, name); if (found) return found; }
    }
    return null;
  };
  const selector = find(document, 'TF-RUNS-SELECTOR');
  const boxes = selector && selector.shadowRoot && find(selector.shadowRoot, 'TF-MULTI-CHECKBOX');
  const names = (boxes && boxes.names) || [];
  if (names.length && !(boxes.outSelected || []).length) {
    selector.shadowRoot.querySelector('#toggle-all').click();
  }
  return names;
})()
"""

# Scroll the first reconstruction card to the middle of the view, so a screenshot shows the last attention
# cards above it and the reconstructions below.
SCROLL_JS = r"""
(() => {
  const find = (root) => {
    for (const el of root.querySelectorAll('*')) {
      if (el.tagName === 'TF-IMAGE-LOADER' && el.tag === 'reconstruction') return el;
      if (el.shadowRoot) { const found = find(el.shadowRoot); if (found) return found; }
    }
    return null;
  };
  const card = find(document);
  if (card) card.scrollIntoView({block: 'center'});
  return card !== null;
})()
"""


class CheckError(RuntimeError):
    """The page did not show what it should (the message is the one line to print)."""


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (the OS's choice)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def image_runs_on_disk(logdir: str) -> dict[str, set[str]]:
    """Run -> image tags of every event-file directory under ``logdir``, named as TensorBoard names runs."""
    from tensorboard.backend.event_processing import io_wrapper
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    runs: dict[str, set[str]] = {}
    for directory in io_wrapper.GetLogdirSubdirectories(logdir):
        # Keep one image per tag: only the tag names matter here.
        accumulator = EventAccumulator(directory, size_guidance={IMAGES: 1})
        accumulator.Reload()
        tags = set(accumulator.Tags()[IMAGES])
        if tags:
            runs[Path(os.path.relpath(directory, logdir)).as_posix()] = tags
    return runs


def _get_json(url: str) -> Any:
    # No proxy: an http_proxy of the environment must not intercept a loopback request.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as response:
        return json.loads(response.read())


def _private_env(home: str) -> dict[str, str]:
    """The environment of the subprocesses: everything they would write under ~ or /tmp goes to ``home``."""
    env = dict(os.environ, HOME=home, TMPDIR=home)
    for name in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME"):
        env[name] = os.path.join(home, name.lower())
    return env


def start_tensorboard(logdir: str, port: int, home: str) -> subprocess.Popen:
    """TensorBoard on 127.0.0.1:``port`` in a process group of its own, its output in ``home``."""
    command = [
        sys.executable,
        "-m",
        "tensorboard.main",
        f"--logdir={logdir}",
        "--host=127.0.0.1",
        f"--port={port}",
        # The Python reader: no separate Rust data-server process to start and clean up.
        "--load_fast=false",
        "--reload_interval=2",
    ]
    with open(os.path.join(home, "tensorboard.log"), "wb") as log:
        return subprocess.Popen(
            command, env=_private_env(home), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def _log_tail(home: str, name: str) -> str:
    path = os.path.join(home, name)
    if not os.path.exists(path):
        return ""
    lines = Path(path).read_text(errors="replace").strip().splitlines()
    return lines[-1] if lines else ""


def wait_for_server(
    url: str, process: subprocess.Popen, expected: dict[str, set[str]], home: str, timeout: float
) -> None:
    """Wait until TensorBoard at ``url`` serves every (run, tag) of ``expected`` from its images plugin.

    The page's dashboard asks for its runs and tags once, when it loads; opened before the server's first
    pass over the logdir finished, it would miss runs until its next reload.
    """
    deadline = time.monotonic() + timeout
    missing: list[str] = ["(no answer)"]
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise CheckError(
                f"TensorBoard exited with code {process.returncode}: {_log_tail(home, 'tensorboard.log')}"
            )
        try:
            served = _get_json(f"{url}/data/plugin/images/tags")
        except (OSError, ValueError):
            served = None
        if served is not None:
            missing = [
                f"{run}: {tag}"
                for run, tags in expected.items()
                for tag in sorted(tags)
                if tag not in served.get(run, {})
            ]
            if not missing:
                return
        time.sleep(0.5)
    raise CheckError(f"TensorBoard did not serve within {timeout:g} s: {'; '.join(missing)}")


def start_chromium(home: str) -> subprocess.Popen:
    """Headless Chromium with its DevTools port chosen by itself and written to its profile directory."""
    binary = shutil.which("chromium")
    if binary is None:
        raise CheckError("no `chromium` on PATH (Debian: apt-get install chromium)")
    command = [
        binary,
        "--headless",
        "--no-sandbox",  # root in a container has no user namespace for the sandbox
        "--disable-gpu",
        "--disable-dev-shm-usage",  # containers often have a 64 MB /dev/shm
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--hide-scrollbars",
        "--mute-audio",
        "--disable-crash-reporter",
        f"--user-data-dir={os.path.join(home, 'chromium')}",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}",
        "about:blank",
    ]
    with open(os.path.join(home, "chromium.log"), "wb") as log:
        return subprocess.Popen(
            command, env=_private_env(home), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_for_devtools(process: subprocess.Popen, home: str, timeout: float) -> str:
    """The websocket URL of Chromium's first page, once its DevTools server listens."""
    port_file = os.path.join(home, "chromium", "DevToolsActivePort")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise CheckError(
                f"chromium exited with code {process.returncode}: {_log_tail(home, 'chromium.log')}"
            )
        lines = Path(port_file).read_text().split() if os.path.exists(port_file) else []
        if lines:
            try:
                targets = _get_json(f"http://127.0.0.1:{lines[0]}/json/list")
            except (OSError, ValueError):
                targets = []
            pages = [target for target in targets if target.get("type") == "page"]
            if pages:
                return str(pages[0]["webSocketDebuggerUrl"])
        time.sleep(0.2)
    raise CheckError(f"chromium's DevTools did not answer within {timeout:.0f} s")


class DevTools:
    """A minimal Chrome DevTools Protocol client: one command at a time, events ignored."""

    ANSWER_WITHIN = 30.0  # seconds; a hung browser must fail the check, not block it

    def __init__(self, websocket: Any) -> None:
        self.websocket = websocket
        self.next_id = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command and return its result (CheckError on a protocol error or no answer)."""
        import aiohttp

        self.next_id += 1
        await self.websocket.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            try:
                received = await self.websocket.receive(timeout=self.ANSWER_WITHIN)
            except TimeoutError:
                raise CheckError(
                    f"chromium did not answer DevTools {method} within {self.ANSWER_WITHIN:.0f} s"
                ) from None
            if received.type != aiohttp.WSMsgType.TEXT:
                raise CheckError(f"chromium closed its DevTools connection during {method} (crashed?)")
            message = json.loads(received.data)
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise CheckError(f"DevTools {method} failed: {message['error'].get('message')}")
                return message.get("result", {})

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of ``expression`` evaluated in the page."""
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise CheckError(f"page script failed: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")


def _card_key(card: dict[str, Any]) -> tuple[str, str] | None:
    """(run, tag) of an image card: TensorBoard's blob key in the src, confirmed by the card's heading."""
    src = card["src"]
    if "data/plugin/images/individualImage" not in src or not card["complete"] or card["width"] <= 0:
        return None
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(src).query)
    blob_key = query.get("blob_key", [""])[0]
    try:
        # TensorBoard's blob key: urlsafe base64 (unpadded) of JSON [experiment, plugin, run, tag, step, i].
        _, _, run, tag, *_ = json.loads(base64.urlsafe_b64decode(blob_key + "=" * (-len(blob_key) % 4)))
    except (ValueError, TypeError):
        return None
    # Whole words of the heading: "attention/level_1" must not match a card of "attention/level_10".
    heading = f" {card['text']} "
    return (run, tag) if f" {' '.join(run.split())} " in heading and f" {tag} " in heading else None


async def _inspect_page(
    websocket_url: str,
    url: str,
    expected: dict[str, set[str]],
    screenshot: str | None,
    timeout: float,
) -> dict[str, dict[str, tuple[int, int]]]:
    """Load the Images dashboard and poll its cards until all ``expected`` show (or ``timeout``).

    Returns:
        Run -> tag -> (width, height) of every decoded image card of an expected tag; every run of the
        page's run selector is a key (Tune's scalar runs with no tags).
    """
    import aiohttp

    shown: dict[str, dict[str, tuple[int, int]]] = {}
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(websocket_url, max_msg_size=0) as websocket,
    ):
        devtools = DevTools(websocket)
        width, height = VIEWPORT
        await devtools.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        await devtools.call("Page.enable")
        await devtools.call(
            "Page.addScriptToEvaluateOnNewDocument",
            source=f"localStorage.setItem({json.dumps(SETTINGS_KEY)}, {json.dumps(json.dumps(SETTINGS))});",
        )
        await devtools.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while True:
            listed = await devtools.evaluate(SELECT_ALL_JS) or []
            shown = {run: {} for run in listed}
            for card in await devtools.evaluate(CARDS_JS) or []:
                key = _card_key(card)
                if key is not None and key[1] in expected.get(key[0], set()):
                    shown.setdefault(key[0], {})[key[1]] = (card["width"], card["height"])
            done = all(tags <= set(shown.get(run, {})) for run, tags in expected.items())
            if done or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        if screenshot:
            await devtools.evaluate(SCROLL_JS)
            await asyncio.sleep(0.5)  # let the scroll paint
            shot = await devtools.call("Page.captureScreenshot", format="png")
            Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
        try:
            await devtools.call("Browser.close")
        except (CheckError, aiohttp.ClientError, ConnectionError, TypeError):
            pass  # the browser closing its socket before answering is fine; the process group goes anyway
    return shown


PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37


def _children() -> dict[int, tuple[str, str]]:
    """Pid -> (command name, state) of this process's children, from /proc (empty elsewhere)."""
    children = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            stat = entry.read_text()
        except OSError:
            continue  # exited meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split at the last ")".
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        if int(ppid) == os.getpid():
            children[int(entry.parent.name)] = (name, state)
    return children


@contextlib.contextmanager
def _adopting_orphans() -> Iterator[None]:
    """Adopt, and on exit kill and reap, the browser processes that outlive their parents.

    Chromium starts its crash handler in a session of its own (out of reach of a process-group kill) and
    its helpers die after the browser process; orphans go to init, which in a container may reap them late
    or never. As a Linux "child subreaper" this process becomes their parent instead.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        flag = ctypes.c_int(0)
        libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0)
        was = flag.value
        adopting = libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux
        libc, was, adopting = None, 0, False
    before = set(_children())
    try:
        yield
    finally:
        deadline = time.monotonic() + 10.0
        while adopting:
            orphans = {
                pid: state
                for pid, (name, state) in _children().items()
                if pid not in before and name.startswith("chrom")
            }
            if not orphans:
                break
            for pid, state in orphans.items():
                if state != "Z" and time.monotonic() > deadline - 5.0:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if adopting and not was:
            libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def _stop(process: subprocess.Popen | None, grace: float = 0.0) -> None:
    """Stop ``process`` and everything it started (its own process group).

    Args:
        process: The group leader (started with ``start_new_session``); None does nothing.
        grace: Seconds to wait first for it to exit by itself (Chromium after ``Browser.close`` reaps its
            own helpers; killed first, they would linger as zombies of init).
    """
    if process is None:
        return
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; helpers it left in its group (Chromium's zygotes and renderers) go too.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        break


def check_images(
    logdir: str | os.PathLike[str],
    expected_tags: Iterable[str] = DEFAULT_TAGS,
    screenshot: str | os.PathLike[str] | None = None,
    port: int | None = None,
    timeout: float = 120.0,
    verbose: bool = False,
) -> dict[str, set[str]]:
    """Check that TensorBoard's Images dashboard, in headless Chromium, shows the images under ``logdir``.

    Args:
        logdir: TensorBoard's ``--logdir`` (an experiment directory, or a directory of experiments).
        expected_tags: Image tags that must show, in every run that holds them on disk, and in at least one.
        screenshot: Where to save a PNG of the page (also on failure, when the page loaded).
        port: TensorBoard's port; a free one by default.
        timeout: Seconds for each of: the server reading the logdir, the page showing every card.
        verbose: Print one line per shown (run, tag) and per listed run without images.

    Returns:
        Run -> the expected tags whose image cards showed and decoded, for every run the page lists (an empty
        set for runs without images, such as Tune's scalars).

    Raises:
        CheckError: If something expected did not show (one-line message), or a process failed to start.
    """
    logdir = os.path.abspath(logdir)
    if not os.path.isdir(logdir):
        raise CheckError(f"no directory {logdir}")
    tags = tuple(expected_tags)
    on_disk = image_runs_on_disk(logdir)
    expected = {run: found & set(tags) for run, found in on_disk.items() if found & set(tags)}
    absent = [tag for tag in tags if not any(tag in found for found in expected.values())]
    if absent:
        raise CheckError(f"no run under {logdir} has image tag(s) {', '.join(absent)}")

    if port is not None and not _port_free(port):
        raise CheckError(f"port {port} is in use")
    tensorboard = chromium = None
    with tempfile.TemporaryDirectory(prefix="tensorboard_check_") as home, _adopting_orphans():
        try:
            port = port or free_port()
            url = f"http://127.0.0.1:{port}"
            tensorboard = start_tensorboard(logdir, port, home)
            wait_for_server(url, tensorboard, expected, home, timeout)
            chromium = start_chromium(home)
            websocket_url = wait_for_devtools(chromium, home, 30.0)
            try:
                shown = asyncio.run(
                    _inspect_page(
                        websocket_url,
                        f"{url}/#images",
                        expected,
                        str(screenshot) if screenshot else None,
                        timeout,
                    )
                )
            except CheckError as error:
                last = _log_tail(home, "chromium.log")
                raise CheckError(f"{error}; chromium's log: {last}" if last else str(error)) from None
        finally:
            _stop(chromium, grace=5.0)
            _stop(tensorboard)
    if verbose:
        for run in sorted(shown):
            for tag in sorted(shown[run]):
                width, height = shown[run][tag]
                print(f"shown: {run}  {tag}  ({width}x{height} px)")
            if not shown[run]:
                print(f"listed: {run}  (no images)")
    missing = [
        f"{run}: {', '.join(sorted(tags_ - set(shown.get(run, {}))))}"
        for run, tags_ in sorted(expected.items())
        if tags_ - set(shown.get(run, {}))
    ]
    if missing:
        raise CheckError(f"TensorBoard's page did not show: {'; '.join(missing)}")
    return {run: set(found) for run, found in shown.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logdir", required=True, help="TensorBoard's log directory (e.g. one experiment)")
    parser.add_argument("--screenshot", help="also save a PNG of the page here")
    parser.add_argument("--port", type=int, help="TensorBoard's port (default: a free one)")
    parser.add_argument("--tags", nargs="+", default=list(DEFAULT_TAGS), help="image tags that must show")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds for each wait")
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        check_images(args.logdir, args.tags, args.screenshot, args.port, args.timeout, verbose=True)
    except CheckError as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    print(f"ok: TensorBoard shows {', '.join(args.tags)} ({time.monotonic() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
