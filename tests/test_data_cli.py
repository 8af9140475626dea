"""``lra-data``: download with resume and checks (against a local HTTP server), extraction of the nested release,
status, prepare, generate, bench, and the errors a user meets."""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import socket
import tarfile
import threading

import pytest
from datasets import Dataset, DatasetDict

from lra.data import cli
from lra.data.listops import ListOpsDataModule, generated_folder
from lra.data.listops_generator import ListOpsSpec
from tests.test_retrieval import ROWS
from tests.test_text import save_imdb_like

AAN = "".join("\t".join(r) + "\n" for r in ROWS)
LISTOPS = "Source\tTarget\n( ( [MAX 2 ) 9 ) ] )\t9\n"


def release_archive() -> bytes:
    """A small lra_release.gz with the real archive's nesting: lra_release/lra_release/<task folders>, plus a
    top-level copy of listops-1000 (stale here: the nested one must win) and a folder only at the top level."""
    files = {f"lra_release/lra_release/tsv_data/new_aan_pairs.{s}.tsv": AAN for s in ("train", "eval", "test")}
    files |= {f"lra_release/lra_release/listops-1000/basic_{s}.tsv": LISTOPS for s in ("train", "val", "test")}
    files |= {"lra_release/listops-1000/basic_train.tsv": "stale", "lra_release/pathfinder128/readme.txt": "top"}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.payload`` at /lra_release.gz (at any path with ``server.any_path``) with Range support and
    GCS's x-goog-hash md5 header."""

    def _respond(self, body: bool):
        self.server.requests.append((self.command, self.path, self.headers.get("Range")))
        if self.path != "/lra_release.gz" and not getattr(self.server, "any_path", False):
            self.send_error(404)
            return
        data, start = self.server.payload, 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("x-goog-hash", f"crc32c=AAAAAA==,md5={self.server.md5}")
        self.end_headers()
        if body:
            self.wfile.write(data[start:])

    def do_GET(self):
        self._respond(body=True)

    def do_HEAD(self):
        self._respond(body=False)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.payload = release_archive()
    httpd.md5 = base64.b64encode(hashlib.md5(httpd.payload).digest()).decode()
    httpd.requests = []
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/lra_release.gz"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def download(tmp_path, server_url, task="retrieval", *extra):
    return cli.main(["download", task, "--data-dir", str(tmp_path / "data"), "--url", server_url, *extra])


def test_download_verifies_records_and_flattens_the_nested_release(tmp_path, server, capsys):
    assert download(tmp_path, server.url) == 0
    release = tmp_path / "data" / "lra_release"
    assert (release / "tsv_data" / "new_aan_pairs.eval.tsv").read_text() == AAN
    assert (release / "listops-1000" / "basic_train.tsv").read_text() == LISTOPS  # the nested copy won
    assert (release / "pathfinder128" / "readme.txt").read_text() == "top"
    assert not list((tmp_path / "data").glob("lra_release.partial-*"))  # the staging folder is gone
    archive = tmp_path / "data" / "lra_release.gz"
    sha = hashlib.sha256(server.payload).hexdigest()
    assert archive.read_bytes() == server.payload
    assert (tmp_path / "data" / "lra_release.gz.sha256").read_text().split()[0] == sha
    out = capsys.readouterr().out
    assert "MD5 checked" in out and sha in out and "all 3 source files present" in out
    assert download(tmp_path, server.url) == 0  # a second run finds the files and does nothing
    assert "nothing to do" in capsys.readouterr().out


def test_download_resumes_a_partial_file(tmp_path, server):
    part = tmp_path / "data" / "lra_release.gz.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(server.payload[:100])
    assert download(tmp_path, server.url) == 0
    assert ("GET", "/lra_release.gz", "bytes=100-") in server.requests
    assert (tmp_path / "data" / "lra_release.gz").read_bytes() == server.payload and not part.exists()


def test_a_complete_partial_file_is_accepted(tmp_path, server):
    part = tmp_path / "data" / "lra_release.gz.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(server.payload)  # the server answers 416 to its Range; HEAD says it is complete
    assert download(tmp_path, server.url) == 0
    assert (tmp_path / "data" / "lra_release.gz").read_bytes() == server.payload


def test_corrupt_download_is_deleted(tmp_path, server, capsys):
    server.md5 = base64.b64encode(hashlib.md5(b"something else").digest()).decode()
    assert download(tmp_path, server.url) == 2
    assert "MD5" in capsys.readouterr().err
    assert not any((tmp_path / "data").glob("lra_release.gz*"))  # neither the file nor a partial one


def test_unreachable_urls_fail_fast_with_the_manual_route(tmp_path, server, capsys):
    missing = server.url.replace("lra_release.gz", "nope.gz")
    assert download(tmp_path, missing) == 2
    err = capsys.readouterr().err
    assert f"could not download {missing} (HTTP 404" in err and "put it at" in err and "paths.lra_release" in err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/lra_release.gz"
    assert download(tmp_path, closed) == 2
    assert f"could not download {closed}" in capsys.readouterr().err


def test_download_of_a_hub_task_saves_it_where_training_looks(tmp_path, monkeypatch, capsys):
    import datasets

    tiny = DatasetDict(train=Dataset.from_dict({"text": ["good", "bad"], "label": [1, 0]}),
                       test=Dataset.from_dict({"text": ["fine"], "label": [1]}),
                       unsupervised=Dataset.from_dict({"text": ["?"], "label": [-1]}))
    monkeypatch.setattr(datasets, "load_dataset", lambda name: tiny if name == "imdb" else pytest.fail(name))
    assert cli.main(["download", "text", "--data-dir", str(tmp_path / "data")]) == 0
    saved = datasets.load_from_disk(str(tmp_path / "data" / "hub" / "imdb"))
    assert sorted(saved) == ["test", "train"] and saved["train"]["text"][:] == ["good", "bad"]
    monkeypatch.setattr(datasets, "load_dataset", lambda name: pytest.fail("the saved folder should be used"))
    assert cli.main(["prepare", "text", "--data-dir", str(tmp_path / "data")]) == 0
    assert "prepared in" in capsys.readouterr().out


def test_status_lists_every_task_sources_and_caches(tmp_path, capsys):
    args = ["--data-dir", str(tmp_path / "data"), "--lra-release", str(tmp_path / "rel")]
    assert cli.main(["status", *args]) == 0
    out = capsys.readouterr().out
    for task in cli.task_names():
        assert f"\n{task}" in f"\n{out}"
    assert f"missing  {tmp_path / 'rel' / 'tsv_data' / 'new_aan_pairs.train.tsv'}" in out
    (tmp_path / "rel" / "tsv_data").mkdir(parents=True)
    for split in ("train", "eval", "test"):
        (tmp_path / "rel" / "tsv_data" / f"new_aan_pairs.{split}.tsv").write_text(AAN)
    assert cli.main(["prepare", "retrieval", *args]) == 0
    assert "prepared in" in capsys.readouterr().out
    assert cli.main(["prepare", "retrieval", *args]) == 0
    assert "already prepared" in capsys.readouterr().out
    assert cli.main(["status", "retrieval", *args]) == 0
    out = capsys.readouterr().out
    assert f"present  {tmp_path / 'rel' / 'tsv_data' / 'new_aan_pairs.eval.tsv'}" in out
    (current,) = [line for line in out.splitlines() if line.endswith("<- current options")]
    assert current.startswith(f"  cache    {tmp_path / 'data' / 'cache' / 'retrieval'}") and "KB  prepared" in current
    assert cli.main(["status", "retrieval", "task.max_len=8", *args]) == 0  # other options: another cache
    assert "<- current options" not in capsys.readouterr().out


def test_prepare_follows_overrides_and_reports_bad_ones(tmp_path, capsys):
    save_imdb_like(tmp_path / "hub")
    base = ["prepare", "text", "--data-dir", str(tmp_path / "data"), f"task.hub_path={tmp_path / 'hub'}"]
    assert cli.main([*base, "task.max_len=8"]) == 0
    assert "train 6, val 4, test 4 examples" in capsys.readouterr().out
    assert cli.main([*base, "task.nope=1"]) == 2
    assert "cannot compose the config of task=text" in capsys.readouterr().err
    assert cli.main(["prepare", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


def test_generate_listops_keeps_its_flags_and_folder(tmp_path, capsys):
    flags = dict(num_train=30, num_val=5, num_test=5, max_depth=3, max_args=3, min_length=4, max_length=30, seed=2)
    argv = ["generate", "listops", "--data-dir", str(tmp_path)]
    for name, value in flags.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    assert cli.main(argv) == 0
    spec = ListOpsSpec(**flags)
    dm = ListOpsDataModule(lra_release=tmp_path / "none", data_dir=tmp_path, source="generate", generator=flags,
                           cache_dir=tmp_path / "cache", batch_size=2, seq_len=30, max_len=30)
    assert dm.folder == generated_folder(tmp_path, spec) and all(p.is_file() for p in dm.source_files())
    out = capsys.readouterr().out
    assert "train on them with: python -m lra.train task=listops" in out and "task.generator.seed=2" in out


def test_generate_refuses_tasks_without_a_generator(tmp_path, capsys):
    assert cli.main(["generate", "retrieval", "--data-dir", str(tmp_path)]) == 2
    assert "has no generator" in capsys.readouterr().err
    assert cli.main(["generate", "text", "--seed", "3"]) == 2
    assert "ListOps flags" in capsys.readouterr().err


def test_bench_times_prepare_loader_and_a_training_step(tmp_path, capsys):
    save_imdb_like(tmp_path / "hub")
    args = cli.parse_args(
        ["bench", "text", "--data-dir", str(tmp_path / "data"), "--batches", "4", "--steps", "1", "--warmup", "0",
         f"task.hub_path={tmp_path / 'hub'}", "task.max_len=16", "data.seq_len=16", "data.batch_size=2"])
    result = cli.cmd_bench(args)
    assert result["protocol"] == "nystrom" and result["batch_size"] == 2 and result["seq_len"] == 16
    assert result["loader_batches_per_s"] > 0 and result["step_s"] > 0 and result["prepare_s"] >= 0
    assert result["loader_headroom"] == pytest.approx(result["loader_batches_per_s"] * result["step_s"])
    assert "loader headroom" in capsys.readouterr().out


def test_extraction_refuses_escaping_members_and_broken_archives(tmp_path):
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("lra_release/../../outside.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(cli.DataError, match="points outside it"):
        cli.extract_release(evil, tmp_path / "release")
    assert not (tmp_path / "outside.txt").exists() and not list(tmp_path.glob("release.partial-*"))
    truncated = tmp_path / "truncated.gz"
    truncated.write_bytes(release_archive()[:200])
    with pytest.raises(cli.DataError, match="not a complete tar.gz archive.*Delete it"):
        cli.extract_release(truncated, tmp_path / "release")
    assert not list(tmp_path.glob("release.partial-*"))


# ---- what a damaged release, an error page, a bomb, a link or a folder URL gets ----
def partials(folder) -> list:
    return [p for p in folder.rglob("*") if ".partial" in p.name or ".extracting" in p.name]


def test_force_downloads_again_and_repairs_a_damaged_release(tmp_path, server):
    assert download(tmp_path, server.url) == 0
    damaged = tmp_path / "data" / "lra_release" / "tsv_data" / "new_aan_pairs.train.tsv"
    damaged.write_text(AAN[:10])
    assert download(tmp_path, server.url) == 0  # without --force: the files are there, nothing to do
    assert damaged.read_text() == AAN[:10]
    assert download(tmp_path, server.url, "retrieval", "--force") == 0
    assert damaged.read_text() == AAN
    assert [r for r in server.requests if r[0] == "GET"] == [("GET", "/lra_release.gz", None)] * 2
    assert (tmp_path / "data" / "lra_release" / "listops-1000" / "basic_train.tsv").read_text().startswith("Source")
    assert not partials(tmp_path)


def test_an_html_page_served_with_status_200_is_not_recorded(tmp_path, server, capsys):
    server.payload = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>...</body></html>\n"
    server.md5 = base64.b64encode(hashlib.md5(server.payload).digest()).decode()
    assert download(tmp_path, server.url) == 2
    err = capsys.readouterr().err
    assert "did not send the release archive" in err and "an HTML page" in err and "Sign in" in err
    assert not any((tmp_path / "data").glob("lra_release.gz*"))  # no archive, no partial file, no SHA-256 record


def test_an_existing_archive_that_is_not_one_is_not_recorded(tmp_path, server, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "lra_release.gz").write_text("<html><body>404 Not Found</body></html>")
    assert download(tmp_path, server.url) == 2
    assert "is not the release archive: it holds" in capsys.readouterr().err
    assert not (tmp_path / "data" / "lra_release.gz.sha256").exists()


def _archive(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def test_extraction_stops_at_a_size_limit(tmp_path):
    bomb = _archive(tmp_path / "bomb.tar.gz", [_file("lra_release/lra_release/listops-1000/basic_train.tsv",
                                                     bytes(8 << 20))])
    assert bomb.stat().st_size < 100_000
    with pytest.raises(cli.DataError, match=r"refusing to extract .*basic_train.tsv.*would exceed .*--max-extract-gb"):
        cli.extract_release(bomb, tmp_path / "release")
    assert not (tmp_path / "release").exists() and not partials(tmp_path)
    assert cli.extract_release(bomb, tmp_path / "release", limit=9 << 20) == ["listops-1000"]


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_extraction_refuses_links(tmp_path, kind):
    (tmp_path / "secret").write_text("outside the release")
    link = tarfile.TarInfo("lra_release/lra_release/listops-1000")
    link.type, link.linkname = kind, "../../secret" if kind == tarfile.SYMTYPE else "lra_release/secret"
    archive = _archive(tmp_path / "links.tar.gz", [_file("lra_release/secret", b"x"), (link, None)])
    # a relative symlink inside the staging folder; flattened into the release it would point at tmp_path/secret
    with pytest.raises(cli.DataError, match=r"refusing the archive member 'lra_release/lra_release/listops-1000', a "
                                        r"(symbolic|hard) link to .*links are not extracted"):
        cli.extract_release(archive, tmp_path / "data" / "release")
    assert not (tmp_path / "data" / "release").exists() and not partials(tmp_path)


def test_a_url_ending_in_a_slash_is_a_clear_error(tmp_path, server, capsys):
    server.any_path = True  # a server that answers 200 for the folder too
    url = server.url.rsplit("/", 1)[0] + "/"
    assert download(tmp_path, url) == 2
    assert f"--url {url} names a folder, not the archive file" in capsys.readouterr().err
    assert not server.requests
