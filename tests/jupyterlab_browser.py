"""A throwaway JupyterLab server and a headless Chromium driving it, for tests of the notebooks as a person
sees them. The server binds 127.0.0.1 with a random token, its root, settings and workspaces in a temporary
folder; `window.jupyterapp` is exposed so cells are run through JupyterLab's own commands."""

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def missing():
    """Why the browser tests cannot run here ("" when they can)."""
    for module in ("selenium", "jupyterlab", "ipywidgets", "matplotlib"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed"
    if not (shutil.which("chromium") or shutil.which("chromium-browser")) or not shutil.which("chromedriver"):
        return "chromium and chromedriver are not installed (apt install chromium chromium-driver)"
    return ""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JupyterLab:
    """`jupyter lab` on 127.0.0.1 serving `root`; stopped by close()."""

    def __init__(self, root, env=None, config_folder=None):
        self.root = Path(root)
        self.token = secrets.token_hex(16)
        self.port = _free_port()
        config = Path(config_folder or self.root.parent) / "jupyter_config"
        (config / "labconfig").mkdir(parents=True, exist_ok=True)
        (config / "labconfig" / "page_config.json").write_text(json.dumps(
            {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
        self.log_path = config.parent / "jupyterlab.log"
        environment = dict(os.environ, JUPYTER_CONFIG_DIR=str(config),
                           JUPYTERLAB_SETTINGS_DIR=str(config / "settings"),
                           JUPYTERLAB_WORKSPACES_DIR=str(config / "workspaces"),
                           JUPYTER_RUNTIME_DIR=str(config / "runtime"), **(env or {}))
        for name in [name for name, value in environment.items() if value is None]:  # None: unset it
            del environment[name]
        environment.pop("MPLBACKEND", None)  # a test process may have set Agg: the kernel picks its inline one
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root",
             f"--IdentityProvider.token={self.token}",
             "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}", f"--ServerApp.root_dir={self.root}",
             "--LabApp.expose_app_in_browser=True"],
            stdout=self._log, stderr=subprocess.STDOUT, env=environment, cwd=self.root)
        self._wait_ready()

    @property
    def base(self):
        return f"http://127.0.0.1:{self.port}"

    def _wait_ready(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"jupyter lab exited: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.base}/api/status?token={self.token}", timeout=2):
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"jupyter lab did not start: {self.log_path.read_text()[-2000:]}")

    def url(self, notebook):
        return f"{self.base}/lab/tree/{notebook}?reset&token={self.token}"

    def close(self):
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


def chromium(download_dir):
    """Headless Chromium through Selenium, with the browser console log kept."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1600",
                "--disable-gpu"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(download_dir)})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_script_timeout(120)
    return driver


# JavaScript run in the page: JupyterLab's own notebook commands on the open notebook
_READY = """
const app = window.jupyterapp;
if (!app) return false;
const panel = app.shell.currentWidget;
if (!panel || !panel.sessionContext || !panel.content) return false;
const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
return !!kernel && kernel.status === 'idle' && panel.content.widgets.length > 0;
"""

_RUN = """
const [first, last, done] = [arguments[0], arguments[1], arguments[arguments.length - 1]];
const app = window.jupyterapp;
const panel = app.shell.currentWidget;
(async () => {
  window.__lcProgress = [];
  for (let i = first; i <= last && i < panel.content.widgets.length; i++) {
    panel.content.activeCellIndex = i;
    window.__lcProgress.push('run ' + i);
    await app.commands.execute('notebook:run-cell');
    window.__lcProgress.push('ran ' + i);
  }
  const kernel = panel.sessionContext.session.kernel;
  while (kernel.status !== 'idle') { await new Promise(r => setTimeout(r, 200)); }
  done(panel.content.widgets.length);
})().catch(e => done('error: ' + e));
"""

_CELLS = """
const panel = window.jupyterapp.shell.currentWidget;
return panel.content.widgets.map(w => ({
  type: w.model.type,
  count: w.model.executionCount === undefined ? null : w.model.executionCount,
  text: w.node.querySelector('.jp-Cell-outputArea') ? w.node.querySelector('.jp-Cell-outputArea').innerText : '',
}));
"""


class Notebook:
    """An open notebook in the driven browser."""

    def __init__(self, driver, lab, name, timeout=90):
        self.driver, self.lab, self.name = driver, lab, name
        driver.get(lab.url(name))
        deadline = time.monotonic() + timeout
        while not driver.execute_script(_READY):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: JupyterLab or its kernel did not become ready")
            time.sleep(0.5)

    def run(self, first, last):
        """Run cells first..last (0-based, inclusive) and wait for the kernel to be idle."""
        from selenium.common.exceptions import TimeoutException
        try:
            result = self.driver.execute_async_script(_RUN, first, last)
        except TimeoutException:
            steps = self.driver.execute_script("return window.__lcProgress")
            raise TimeoutError(f"{self.name}: cells {first}-{last} did not finish (steps: {steps})") from None
        if isinstance(result, str):
            raise RuntimeError(f"{self.name}: {result}")
        time.sleep(0.5)  # outputs render after the idle message
        return result

    def cells(self):
        return self.driver.execute_script(_CELLS)

    def output(self, index):
        """The output area element of cell `index`."""
        from selenium.webdriver.common.by import By
        cells = self.driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell")
        return cells[index].find_element(By.CSS_SELECTOR, ".jp-Cell-outputArea")

    def console(self):
        return self.driver.get_log("browser")

    def fetch_size(self, href):
        """Bytes the server sends for a link (as clicking it would download), or an 'HTTP nnn' string."""
        return self.driver.execute_async_script("""
            const done = arguments[arguments.length - 1];
            fetch(arguments[0]).then(r => r.ok ? r.blob().then(b => done(b.size)) : done('HTTP ' + r.status))
              .catch(e => done('error ' + e));""", href)

    def save_evidence(self, folder, label):
        """A screenshot and the console log, for a failed test."""
        folder = Path(folder)
        self.driver.save_screenshot(str(folder / f"{label}.png"))
        (folder / f"{label}.console.txt").write_text("\n".join(str(e) for e in self.console()))
