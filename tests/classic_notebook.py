"""Both notebooks in Colab's own widget stack, the classic Notebook 6.5 with ipywidgets 7.7 and ipykernel 6,
driven in headless Chromium: the forms render as controls, every cell runs, the plots and the download link
show, nothing is a widget error. Not part of the suite (it needs its own environment); run by hand:

    python -m venv --system-site-packages /tmp/v77
    /tmp/v77/bin/pip install "ipywidgets==7.7.*" "ipykernel<7" "notebook<7" "traitlets==5.9.0"
    /tmp/v77/bin/python tests/classic_notebook.py

Exit status 0 when everything a person would check holds; the screenshots stay in the printed folder.
"""

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from jupyterlab_browser import chromium  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def main():
    import ipywidgets
    tmp = Path(tempfile.mkdtemp())
    root = tmp / "root"
    root.mkdir()
    for name in ("extract_lora.ipynb", "resize_lora.ipynb"):
        shutil.copy(NOTEBOOKS / name, root / name)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_hex(8)
    env = dict(os.environ, LORA_COLAB_WORKDIR=str(root / "work"), JUPYTER_CONFIG_DIR=str(tmp / "cfg"),
               JUPYTER_RUNTIME_DIR=str(tmp / "rt"))
    env.pop("MPLBACKEND", None)
    log = open(tmp / "notebook.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "notebook", "--no-browser", "--allow-root",
                               f"--NotebookApp.token={token}", "--NotebookApp.ip=127.0.0.1",
                               f"--NotebookApp.port={port}", f"--NotebookApp.notebook_dir={root}"],
                              stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
    base = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    driver = chromium(tmp / "downloads")
    failures = []
    try:
        for name in ("extract_lora.ipynb", "resize_lora.ipynb"):
            driver.get(f"{base}/notebooks/{name}?token={token}")
            for _ in range(120):
                if driver.execute_script("return !!(window.Jupyter && Jupyter.notebook && Jupyter.notebook.kernel "
                                         "&& Jupyter.notebook.kernel.is_connected())"):
                    break
                time.sleep(0.5)
            for _ in range(60):  # as a person would: after the page (and its widget manager) has loaded
                if driver.execute_script("return !!(window.require && require.defined('nbextensions/jupyter-js-widgets/extension'))"):
                    break
                time.sleep(0.5)
            time.sleep(5)
            driver.execute_script("Jupyter.notebook.execute_all_cells()")
            deadline = time.time() + 300
            while time.time() < deadline and driver.execute_script(
                    "return [...document.querySelectorAll('.input_prompt')].some(e => e.innerText.includes('*'))"):
                time.sleep(1)
            time.sleep(2)
            text = driver.execute_script("return document.querySelector('#notebook-container').innerText")
            images = driver.execute_script("return [...document.querySelectorAll('.output_png img')]"
                                           ".map(i => i.naturalWidth)")
            selects = driver.execute_script("return document.querySelectorAll('.widget-dropdown select').length")
            href = driver.execute_script("const a = document.querySelector('a[download]'); return a && a.href")
            size = driver.execute_async_script("""const done = arguments[arguments.length - 1];
                fetch(arguments[0]).then(r => r.ok ? r.blob().then(b => done(b.size)) : done('HTTP ' + r.status))
                  .catch(e => done('error ' + e));""", href) if href else None
            checks = {"widgets render as controls": selects >= 4 and "Error displaying widget" not in text
                      and "VBox(children" not in text,
                      "no traceback": "Traceback" not in text, "a plot": any(images),
                      "bar at its end": "100%" in text, "download link serves a file": isinstance(size, int)
                      and size > 0}
            driver.save_screenshot(str(tmp / f"{name}.png"))
            print(f"{name} (ipywidgets {ipywidgets.__version__}): " + ", ".join(
                f"{check} {'ok' if good else 'FAILED'}" for check, good in checks.items()))
            failures += [f"{name}: {check}" for check, good in checks.items() if not good]
    finally:
        driver.quit()
        server.terminate()
    print(f"screenshots in {tmp}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
