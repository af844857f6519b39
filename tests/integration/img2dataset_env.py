"""The real img2dataset tool for the tests, and a pool made with it from images served on 127.0.0.1.

img2dataset 1.47.0 pins pandas<3 and webdataset<0.3, which clash with the project's own pins
(constraints.txt), so it lives in a separate virtualenv that the first test needing it creates
beside the running one (`<sys.prefix>/img2dataset-1.47.0`, i.e. `.venv/img2dataset-1.47.0`; about
3 minutes once, from the package registry; `ACED_IMG2DATASET_VENV` names another place). Its exact
set is `img2dataset-constraints.txt` beside this file; a marker holding that file's sha256 says the
install finished, so an interrupted or outdated one is redone. Creation is serialised by a flock.

`make_pool` writes synthetic images (pipeline.synthetic: captions that describe them, 32-hex uids as
DataComp's) into a folder, serves it with `http.server` in a thread on 127.0.0.1, lists the URLs
(plus some that fail: missing files and a file that is not an image) in a Parquet with DataComp's
columns (url, caption, uid) and runs `img2dataset.download` on it, so the tars, json members and
`<shard>.parquet` sidecars are the tool's own, failures included.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

VERSION = "1.47.0"
CONSTRAINTS = Path(__file__).with_name("img2dataset-constraints.txt")


def _venv() -> Path:
    return Path(os.environ.get("ACED_IMG2DATASET_VENV") or Path(sys.prefix) / f"img2dataset-{VERSION}")


def img2dataset_python() -> Path:
    """The interpreter of a virtualenv holding img2dataset==VERSION (created on first use)."""
    venv = _venv()
    python = venv / "bin" / "python"
    marker = venv / ".aced-installed"
    want = hashlib.sha256(CONSTRAINTS.read_bytes()).hexdigest()
    if marker.is_file() and marker.read_text().strip() == want:
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test process may be installing it right now
        if marker.is_file() and marker.read_text().strip() == want:
            return python
        shutil.rmtree(venv, ignore_errors=True)
        steps = [[sys.executable, "-m", "venv", str(venv)],
                 [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c", str(CONSTRAINTS),
                  f"img2dataset=={VERSION}"]]
        for cmd in steps:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            if r.returncode:
                pytest.fail(f"could not install img2dataset {VERSION} into {venv} ({' '.join(cmd[:4])} ...: exit "
                            f"{r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
        marker.write_text(want + "\n")
    return python


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # the tests read the tool's results, not the access log
        pass


@contextlib.contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """`http://127.0.0.1:PORT` serving `folder` from a thread, for the life of the block."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


@dataclass
class Pool:
    """An img2dataset output folder and what went into it."""

    folder: Path
    uids: list[str]          # uids of the images that were served (the ones that can succeed)
    captions: dict[str, str]  # uid -> caption
    failed: int               # URLs that cannot succeed (missing files, a file that is not an image)


def make_pool(workdir: Path, *, n: int = 60, per_shard: int = 24, missing: int = 4, not_image: int = 2,
              seed: int = 0) -> Pool:
    """Run the real img2dataset over `n` synthetic images served on 127.0.0.1 plus `missing` URLs that
    404 and `not_image` URLs of a text file; output: webdataset tars of `per_shard` samples."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.synthetic import generate_pairs

    images = workdir / "www"
    images.mkdir(parents=True)
    (images / "notes.txt").write_text("not an image\n")
    pairs = list(generate_pairs(n, seed=seed, noise_frac=0.0))
    for i, s in enumerate(pairs):
        (images / f"{i:05d}.jpg").write_bytes(s.image_bytes)
    out = workdir / "pool"
    with serve_folder(images) as base:
        rows = [{"url": f"{base}/{i:05d}.jpg", "caption": s.caption, "uid": s.uid} for i, s in enumerate(pairs)]
        # Failures spread over the shards: img2dataset keeps each in its sidecar with the status it got.
        for j in range(missing):
            rows.insert(5 + j * 13, {"url": f"{base}/missing-{j}.jpg", "caption": f"gone {j}",
                                     "uid": hashlib.md5(f"missing{j}".encode()).hexdigest()})
        for j in range(not_image):
            rows.insert(9 + j * 17, {"url": f"{base}/notes.txt", "caption": f"text {j}",
                                     "uid": hashlib.md5(f"text{j}".encode()).hexdigest()})
        url_list = workdir / "urls.parquet"
        pq.write_table(pa.Table.from_pylist(rows), url_list)
        args = dict(url_list=str(url_list), input_format="parquet", url_col="url", caption_col="caption",
                    save_additional_columns=["uid"], output_format="webdataset", output_folder=str(out),
                    processes_count=1, thread_count=4, number_sample_per_shard=per_shard, image_size=64,
                    resize_mode="border", timeout=5, retries=0, enable_wandb=False,
                    disallowed_header_directives=[])
        env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
        env.update(no_proxy="127.0.0.1,localhost", NO_PROXY="127.0.0.1,localhost", WANDB_MODE="disabled",
                   PYTHONPATH="")
        script = "import json, sys; from img2dataset import download; download(**json.loads(sys.argv[1]))"
        r = subprocess.run([str(img2dataset_python()), "-c", script, json.dumps(args)], capture_output=True,
                           text=True, timeout=600, env=env, cwd=workdir)
        if r.returncode:
            pytest.fail(f"img2dataset failed (exit {r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
    return Pool(out, [s.uid for s in pairs], {s.uid: s.caption for s in pairs}, missing + not_image)
