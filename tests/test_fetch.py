"""stages.fetch: verified downloads from local and HTTP sources, fallback, and an all-or-nothing output."""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from stages import datasets as datasets_mod
from stages import fetch
from stages import params as params_mod
from stages.common import PipelineError
from stages.datasets import FILE_ROLES, DataFile, load_table
from stages.idx import write_idx
from tests.synthetic import use_synthetic_dataset, write_mirror

TIMEOUT_S = 5.0


@pytest.fixture
def mirror(tmp_path) -> tuple[Path, dict[str, DataFile]]:
    """A synthetic mirror directory and its four files by role."""
    directory = tmp_path / "mirror"
    entry = write_mirror(directory, n_train=60, n_test=20)
    return directory, {role: DataFile(f["name"], f["sha256"], len(gzip.decompress((directory / f"{f['name']}.gz").read_bytes())))
                       for role, f in entry["files"].items()}


def content_of(directory: Path, file: DataFile) -> bytes:
    return gzip.decompress((directory / file.gz_name).read_bytes())


def bad_mirror(root: Path, file: DataFile, damage: str) -> Path:
    """A directory under `root` holding `file` damaged in one way; the good one is in root/mirror."""
    good = content_of(root / "mirror", file)
    if damage == "wrong content":  # a valid IDX file of another synthetic dataset
        write_mirror(root / "other", n_train=60, n_test=20, seed=1)
        data = (root / "other" / file.gz_name).read_bytes()
    else:
        data = {"flipped byte": gzip.compress(good[:-1] + bytes([good[-1] ^ 1])),
                "truncated gzip": gzip.compress(good)[:-20],
                "truncated content": gzip.compress(good[:-10])}[damage]
    directory = root / f"bad-{damage.replace(' ', '-')}"
    directory.mkdir()
    (directory / file.gz_name).write_bytes(data)
    return directory


# ------------------------------------------------------------------------------------------
# Local directories


@pytest.mark.parametrize("compressed", [True, False], ids=["gz", "unpacked"])
def test_fetch_verified_from_directory(mirror, tmp_path, compressed):
    """A local mirror may hold the files gzipped or unpacked; either gives the verified content."""
    directory, files = mirror
    file = files["train_images"]
    expected = content_of(directory, file)
    if not compressed:
        directory = tmp_path / "unpacked"
        directory.mkdir()
        (directory / file.name).write_bytes(expected)
    content = fetch.fetch_verified(str(directory), file, TIMEOUT_S)
    assert content == expected
    assert hashlib.sha256(content).hexdigest() == file.sha256


@pytest.mark.parametrize(("damage", "reason"), [
    ("wrong content", "SHA-256"), ("flipped byte", "SHA-256"),
    ("truncated gzip", "damaged gzip"), ("truncated content", "SHA-256"),
])
def test_damaged_file_is_rejected(mirror, tmp_path, damage, reason):
    """Content that does not match the table's digest, or gzip that does not unpack, is a SourceError."""
    _, files = mirror
    file = files["train_labels"]
    with pytest.raises(fetch.SourceError, match=reason):
        fetch.fetch_verified(str(bad_mirror(tmp_path, file, damage)), file, TIMEOUT_S)


def test_missing_file_is_rejected(mirror, tmp_path):
    """A directory without the file is a SourceError naming both names it looked for."""
    _, files = mirror
    (tmp_path / "empty").mkdir()
    with pytest.raises(fetch.SourceError, match="neither .*\\.gz nor"):
        fetch.fetch_verified(str(tmp_path / "empty"), files["test_images"], TIMEOUT_S)


def test_missing_directory_is_named_with_where_it_resolved(mirror, tmp_path, monkeypatch):
    """A mirror directory that is not there says so; a relative one also says what it resolved to
    and why that can surprise (`dvc exp run --temp` runs the stage under .dvc/tmp/exps)."""
    _, files = mirror
    with pytest.raises(fetch.SourceError) as absolute:
        fetch.fetch_verified(str(tmp_path / "nowhere"), files["test_images"], TIMEOUT_S)
    assert str(absolute.value) == f"no such directory: {tmp_path / 'nowhere'}"
    (tmp_path / "a-file").write_text("")
    with pytest.raises(fetch.SourceError, match="^not a directory: "):
        fetch.fetch_verified(str(tmp_path / "a-file"), files["test_images"], TIMEOUT_S)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(fetch.SourceError) as relative:
        fetch.fetch_verified("../elsewhere", files["test_images"], TIMEOUT_S)
    assert str(relative.value).startswith(f"no such directory: ../elsewhere, here {tmp_path.parent / 'elsewhere'} "
                                          f"(a relative {fetch.MIRROR_ENV} is taken from the stage's working directory")
    assert "give an absolute path" in str(relative.value)


def test_another_datasets_file_is_named(mirror, tmp_path):
    """A file whose content is another known file (a mirror of the other dataset) is named as such."""
    _, files = mirror
    file = files["train_labels"]
    wrong = bad_mirror(tmp_path, file, "wrong content")
    served = hashlib.sha256(gzip.decompress((wrong / file.gz_name).read_bytes())).hexdigest()
    with pytest.raises(fetch.SourceError) as info:
        fetch.fetch_verified(str(wrong), file, TIMEOUT_S, known={served: "other's train-labels-idx1-ubyte"})
    assert str(info.value).endswith(": it is other's train-labels-idx1-ubyte")
    # Both digests whole: one being written into the table differs from the file's anywhere.
    assert str(info.value) == (f"SHA-256 of the uncompressed content is {served}, stages/datasets.yaml expects "
                               f"{file.sha256}: it is other's train-labels-idx1-ubyte")


def test_file_url_is_a_source(mirror):
    """MNIST_MIRROR may be any base URL urllib opens, file:// included (its response has no
    `.length` attribute, which HTTP responses have)."""
    directory, files = mirror
    file = files["test_labels"]
    assert fetch.fetch_verified(directory.as_uri(), file, TIMEOUT_S) == content_of(directory, file)


def test_fetch_file_falls_back_to_next_source(mirror, tmp_path):
    """After a source with a damaged file, fetch_file moves on and returns the good content."""
    directory, files = mirror
    file = files["test_labels"]
    bad = bad_mirror(tmp_path, file, "wrong content")
    assert fetch.fetch_file([str(bad), str(directory)], file, TIMEOUT_S) == content_of(directory, file)


@pytest.mark.parametrize("url, reason", [("http://[::1/", "not a valid URL (Invalid IPv6 URL)"),
                                         ("http://127.0.0.1:port/", "not a valid URL (nonnumeric port: 'port')")])
def test_a_malformed_url_is_a_source_that_fails_not_a_crash(mirror, url, reason):
    """A typo after the scheme in MNIST_MIRROR or fetch.mirrors (the params check only that a mirror
    is a URL or an absolute directory): urllib raises ValueError or http.client.InvalidURL, and the
    next source is still tried."""
    directory, files = mirror
    file = files["test_labels"]
    with pytest.raises(fetch.SourceError) as info:
        fetch.fetch_verified(url, file, TIMEOUT_S)
    assert str(info.value) == reason
    assert fetch.fetch_file([url, str(directory)], file, TIMEOUT_S) == content_of(directory, file)


def test_an_unreadable_file_in_a_local_mirror_is_a_source_that_fails(mirror, monkeypatch):
    """An I/O error reading a mirror's file (root reads through permissions, so a stand-in raises
    it) names the file, and the next source is still tried."""
    directory, files = mirror
    file = files["test_labels"]
    unreadable, expected = file.path_in(directory), content_of(directory, file)
    real_open = Path.open

    def open_(path, *args, **kwargs):
        if path == unreadable:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)
    with pytest.raises(fetch.SourceError, match=f"^cannot read {unreadable}: Permission denied$"):
        fetch.fetch_verified(str(directory), file, TIMEOUT_S)
    assert fetch.fetch_file([str(directory), directory.as_uri()], file, TIMEOUT_S) == expected


def test_fetch_file_reports_every_source(mirror, tmp_path):
    """When every source fails, one PipelineError lists each source's reason and the MNIST_MIRROR hint."""
    _, files = mirror
    file = files["test_labels"]
    (tmp_path / "empty").mkdir()
    sources = [str(bad_mirror(tmp_path, file, "wrong content")), str(bad_mirror(tmp_path, file, "truncated gzip")),
               str(tmp_path / "empty")]
    with pytest.raises(PipelineError) as info:
        fetch.fetch_file(sources, file, TIMEOUT_S)
    assert not isinstance(info.value, fetch.SourceError)
    lines = str(info.value).splitlines()
    assert file.gz_name in lines[0]
    assert [line.split(": ")[0].strip() for line in lines[1:4]] == sources
    assert "SHA-256" in lines[1] and "damaged gzip" in lines[2] and "neither" in lines[3]
    assert fetch.MIRROR_ENV in lines[4] and len(lines) == 5


def test_table_sizes_are_the_idx_files_sizes(mirror):
    """The sizes that bound what a source may serve are the real files' (the synthetic ones here, of
    60 train and 20 test images; the real MNIST's are checked by CI's fetch)."""
    directory, files = mirror
    for role, file in files.items():
        count = 60 if role.startswith("train") else 20
        assert datasets_mod.idx_size(role, count, 28) == file.size
    mnist = load_table()["mnist"]
    assert mnist.files["train_images"].size == 47_040_016 and mnist.files["test_labels"].size == 10_008


@pytest.mark.parametrize("form", ["plain", "gzipped"])
def test_a_local_file_larger_than_the_dataset_allows_is_refused(mirror, tmp_path, form):
    """A source holding more bytes than the file can be (a wrong or huge file) is refused, saying
    where the limit comes from, and the next source is tried."""
    directory, files = mirror
    file = files["train_labels"]
    big = tmp_path / "big"
    big.mkdir()
    oversized = bytes(fetch.served_limit(file) + 1000)
    name = file.name if form == "plain" else file.gz_name
    (big / name).write_bytes(oversized if form == "plain" else b"\x1f\x8b" + oversized)
    with pytest.raises(fetch.SourceError, match="more than .* bytes, more than the file can take .*datasets.yaml"):
        fetch.fetch_verified(str(big), file, TIMEOUT_S)
    assert fetch.fetch_file([str(big), str(directory)], file, TIMEOUT_S) == content_of(directory, file)


@pytest.mark.parametrize("form,count", [("plain", 600), ("gz", 600), ("plain", 70_000)])
def test_a_table_count_too_small_shows_the_files_own_count(tmp_path, form, count):
    """A table entry being written with too small a train_count makes the real file look too large:
    the refusal says the dimensions the file's header gives, and where the limit comes from.
    70,000 labels: a plain file past even the gzip allowance, refused before it is inflated."""
    directory = tmp_path / "mirror"
    directory.mkdir()
    content = write_idx(np.zeros(count, np.uint8))
    name = "train-labels-idx1-ubyte"
    (directory / (name if form == "plain" else f"{name}.gz")).write_bytes(
        content if form == "plain" else gzip.compress(content))
    # The size a train_count of 500 gives: an IDX header of one dimension (8 bytes) and 500 labels
    file = DataFile(name, hashlib.sha256(content).hexdigest(), 8 + 500)
    assert (count + 8 > fetch.served_limit(file)) == (count == 70_000)
    with pytest.raises(fetch.SourceError, match=f"gives the dimensions {count:,}; the file's size follows from its "
                                                "dataset's counts in stages/datasets.yaml$"):
        fetch.fetch_verified(str(directory), file, TIMEOUT_S)


def test_a_gzip_bomb_is_refused_one_byte_past_the_size(mirror, tmp_path):
    """A small .gz that inflates far beyond the file's size stops inflating at size + 1 bytes."""
    _, files = mirror
    file = files["test_images"]
    bomb = tmp_path / "bomb"
    bomb.mkdir()
    (bomb / file.gz_name).write_bytes(gzip.compress(bytes(1000 * file.size)))
    assert (bomb / file.gz_name).stat().st_size < fetch.served_limit(file)  # it passes the download limit
    with pytest.raises(fetch.SourceError, match=f"content larger than {file.size:,} bytes .*datasets.yaml"):
        fetch.fetch_verified(str(bomb), file, TIMEOUT_S)


def test_sources_put_the_override_first():
    """$MNIST_MIRROR, when set, is tried before the configured mirrors."""
    assert fetch.sources(["a", "b"], None) == ["a", "b"]
    assert fetch.sources(["a", "b"], "/local") == ["/local", "a", "b"]
    assert fetch.sources(["/local", "b"], "/local") == ["/local", "b"]  # tried, and blamed, once


def test_path_in_finds_the_plain_file_or_its_gz(tmp_path):
    """data/raw holds plain IDX files, a mirror gzipped ones; the reader takes whichever is there."""
    file = DataFile("train-images-idx3-ubyte", "0" * 64, 16)
    assert file.path_in(tmp_path) == tmp_path / file.name  # neither: the plain name, for the error
    (tmp_path / file.gz_name).write_bytes(b"gz")
    assert file.path_in(tmp_path) == tmp_path / file.gz_name
    (tmp_path / file.name).write_bytes(b"plain")
    assert file.path_in(tmp_path) == tmp_path / file.name


def test_missing_from_names_each_file_absent_in_both_forms(tmp_path):
    """The one check behind preprocess's, screen's and gpu_check's missing-file errors."""
    mnist = load_table()["mnist"]
    names = [mnist.files[role].name for role in FILE_ROLES]
    assert mnist.missing_from(tmp_path) == f"no {', '.join(names)} (nor .gz)"
    (tmp_path / (names[0] + ".gz")).write_bytes(b"gz")  # a mirror's form
    (tmp_path / names[2]).write_bytes(b"plain")  # data/raw's form
    assert mnist.missing_from(tmp_path) == f"no {names[1]}, {names[3]} (nor .gz)"
    assert mnist.missing_from(tmp_path, ("train_images", "test_images")) == ""


# ------------------------------------------------------------------------------------------
# HTTP, on a loopback server


class QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class ShortBody(BaseHTTPRequestHandler):
    """Announces more body than it sends, then closes: with Content-Length, or chunked."""
    protocol_version = "HTTP/1.1"
    chunked = False

    def do_GET(self):
        self.send_response(200)
        if self.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", "50000")  # under the limit for test_images
        self.end_headers()
        self.wfile.write(b"a\r\n0123456789\r\n" if self.chunked else b"\x1f\x8b" + bytes(998))
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


class ShortChunkedBody(ShortBody):
    chunked = True


class EndlessBody(BaseHTTPRequestHandler):
    """Sends zeros without a Content-Length until the client hangs up (a wrong URL's stream), or
    8 MiB, a hundred times the synthetic files' limit, so that a client without the limit fails
    the test in a second rather than filling the memory."""
    announce = None

    def do_GET(self):
        self.send_response(200)
        if self.announce is not None:
            self.send_header("Content-Length", str(self.announce))
        self.end_headers()
        try:
            for _ in range(128):
                self.wfile.write(bytes(65536))
        except OSError:  # the client stopped reading and closed: done
            pass

    def log_message(self, *args):
        pass


class HugeAnnouncedBody(EndlessBody):
    announce = 10**12


class TrickleBody(BaseHTTPRequestHandler):
    """Sends a byte every 50 ms, without a Content-Length (a stalled mirror that still answers
    within each read's timeout), for at most 4 s: a client without a rate floor waits it out."""
    chunked, byte, count, pause = False, b"\x1f", 80, 0.05

    def do_GET(self):
        self.send_response(200)
        if self.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for _ in range(self.count):
                self.wfile.write(self.byte)
                self.wfile.flush()
                time.sleep(self.pause)
        except OSError:  # the client gave up and closed: done
            pass

    def log_message(self, *args):
        pass


class TrickleChunkSize(TrickleBody):
    """Sends a chunked body's first chunk-size line a zero every 0.2 s, for at most 8 s: http.client
    reads that line within one read1() of the client, which its rate check never sees return."""
    chunked, byte, count, pause = True, b"0", 40, 0.2


class TrickleHeaders(BaseHTTPRequestHandler):
    """Answers with a status line, then a header every 0.2 s for at most 8 s: each read comes well
    within its timeout, so only a bound on the whole step ends the wait (before: hours)."""

    def do_GET(self):
        try:
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            for number in range(40):
                self.wfile.write(f"X-Trickle-{number}: x\r\n".encode())
                self.wfile.flush()
                time.sleep(0.2)
        except OSError:  # the client gave up and closed: done
            pass

    def log_message(self, *args):
        pass


def serve(handler, tls=None):
    """Starts a threading HTTP server on 127.0.0.1 (a free port), over TLS with the server-side
    context `tls`; returns (base URL, stop)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def stop():
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}", stop


@pytest.fixture
def http_mirrors(mirror, tmp_path):
    """Base URLs of a loopback server: (good mirror, mirror with a damaged train_labels file)."""
    directory, files = mirror
    bad_mirror(tmp_path, files["train_labels"], "wrong content")
    url, stop = serve(functools.partial(QuietFiles, directory=str(tmp_path)))
    yield f"{url}/mirror/", f"{url}/bad-wrong-content/"
    stop()


@pytest.fixture
def short_body_server(request):
    url, stop = serve(request.param)
    yield url
    stop()


def test_http_download_is_verified(mirror, http_mirrors):
    """Over HTTP the .gz is downloaded, unpacked and checked like a local file."""
    directory, files = mirror
    good, _ = http_mirrors
    for file in files.values():
        assert fetch.fetch_verified(good, file, TIMEOUT_S) == content_of(directory, file)


def test_http_damaged_file_then_fallback(mirror, http_mirrors):
    """A served file with the wrong content is rejected, and fetch_file falls back to the next URL."""
    directory, files = mirror
    good, bad = http_mirrors
    file = files["train_labels"]
    with pytest.raises(fetch.SourceError, match="SHA-256"):
        fetch.fetch_verified(bad, file, TIMEOUT_S)
    assert fetch.fetch_file([bad, good], file, TIMEOUT_S) == content_of(directory, file)


def test_http_404(mirror, http_mirrors):
    """A file the server does not have is a SourceError with the HTTP status."""
    _, files = mirror
    good, _ = http_mirrors
    with pytest.raises(fetch.SourceError, match="HTTP 404"):
        fetch.fetch_verified(good + "nothing-here/", files["test_images"], TIMEOUT_S)


@pytest.mark.parametrize(("short_body_server", "refusal"), [
    (EndlessBody, "sent more than .* bytes, more than the file can take"),
    (HugeAnnouncedBody, "announces 1,000,000,000,000 bytes, more than the file can take"),
], indirect=["short_body_server"])
def test_a_body_larger_than_the_file_is_refused_at_the_limit(mirror, short_body_server, refusal):
    """A server streaming without end, or announcing more than the file can be, is refused at the
    limit (or at once), not read into memory until it stops; the next source is then tried."""
    directory, files = mirror
    file = files["test_images"]
    with pytest.raises(fetch.SourceError, match=refusal):
        fetch.fetch_verified(short_body_server, file, TIMEOUT_S)
    assert fetch.fetch_file([short_body_server, str(directory)], file, TIMEOUT_S) == content_of(directory, file)


@pytest.mark.parametrize("short_body_server", [TrickleBody], indirect=True)
def test_a_download_slower_than_the_floor_over_timeout_s_is_refused(mirror, short_body_server):
    """A server that keeps sending a byte at a time, never idle for a whole timeout_s, is refused
    once timeout_s seconds (1 here) have brought less than MIN_RATE per second; the next source is
    then tried."""
    directory, files = mirror
    file = files["test_images"]
    with pytest.raises(fetch.SourceError, match=r"too slow: \d+ bytes in the last \d+\.\d s, under 16 KiB/s "
                                                r"\(fetch.timeout_s: 1; refused\)"):
        fetch.fetch_verified(short_body_server, file, 1.0)
    assert fetch.fetch_file([short_body_server, str(directory)], file, 1.0) == content_of(directory, file)


@pytest.mark.parametrize(("short_body_server", "step"), [
    (TrickleHeaders, "connecting and the response's headers"),
    (TrickleChunkSize, "one read of the body"),
], indirect=["short_body_server"], ids=["headers", "chunk-size line"])
def test_a_step_trickled_a_byte_at_a_time_is_cut_at_twice_timeout_s(mirror, short_body_server, step):
    """Each read of the trickle comes within its timeout (0.5 s), so neither the socket's timeout
    nor the body's rate check ends it: the watchdog cuts the connection after 2 x timeout_s."""
    directory, files = mirror
    file = files["test_images"]
    start = time.monotonic()
    with pytest.raises(fetch.SourceError, match=rf"^stalled: {step} took more than 1 s "
                                                r"\(2 x fetch.timeout_s: 0.5; refused\)$"):
        fetch.fetch_verified(short_body_server, file, 0.5)
    assert time.monotonic() - start < 4  # the server would go on for 8 s
    assert fetch.fetch_file([short_body_server, str(directory)], file, 0.5) == content_of(directory, file)


@pytest.fixture
def tls(tmp_path, monkeypatch):
    """A server-side TLS context for 127.0.0.1, with a certificate made here that the client is
    told to trust (SSL_CERT_FILE, which OpenSSL's default verify paths read)."""
    import datetime
    import ipaddress
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(hours=1))
                   .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                  critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context


def test_an_https_download_is_verified_through_the_watched_connection(mirror, tls):
    """The default mirrors are https: the watchdog's connection hooks must keep TLS working, and
    cut a TLS connection that trickles its headers."""
    directory, files = mirror
    file = files["train_labels"]
    url, stop = serve(functools.partial(QuietFiles, directory=str(directory)), tls)
    try:
        assert fetch.fetch_verified(url + "/", file, TIMEOUT_S) == content_of(directory, file)
    finally:
        stop()
    url, stop = serve(TrickleHeaders, tls)
    try:
        with pytest.raises(fetch.SourceError, match="^stalled: connecting and the response's headers took more than 1 s"):
            fetch.fetch_verified(url, file, 0.5)
    finally:
        stop()


class TrickleProxy(TrickleHeaders):
    """A proxy that answers CONNECT a header line at a time (http.client reads them without bound)."""
    do_CONNECT = TrickleHeaders.do_GET


def test_a_proxy_trickling_its_connect_reply_is_cut(mirror, monkeypatch):
    """Through HTTPS_PROXY the CONNECT reply is read on the plain socket, before any TLS: the
    watchdog must hold that socket from its creation (it held only the connected one: 6 s and
    more against a 1 s limit)."""
    _, files = mirror
    url, stop = serve(TrickleProxy)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("https_proxy", url)
    start = time.monotonic()
    try:
        with pytest.raises(fetch.SourceError, match="^stalled: connecting and the response's headers took more than 1 s"):
            fetch.fetch_verified("https://mirror.example/", files["test_images"], 0.5)
    finally:
        stop()
    assert time.monotonic() - start < 4


class RedirectWithEndlessBody(BaseHTTPRequestHandler):
    """A 302 to the mirror whose body runs on for up to 8 s: urllib read it whole before following."""
    target = ""

    def do_GET(self):
        self.send_response(302)
        self.send_header("Location", self.target + self.path)
        self.end_headers()
        deadline = time.monotonic() + 8
        try:
            while time.monotonic() < deadline:
                self.wfile.write(bytes(65536))
        except OSError:  # the client closed it: done
            pass

    def log_message(self, *args):
        pass


def test_a_redirects_body_is_not_read(mirror, http_mirrors):
    """Followed at once, its body unread: bounded in time and memory whatever the server sends."""
    directory, files = mirror
    good, _ = http_mirrors
    handler = type("Redirect", (RedirectWithEndlessBody,), {"target": good.rstrip("/")})
    url, stop = serve(handler)
    start = time.monotonic()
    try:
        file = files["test_labels"]
        assert fetch.fetch_verified(url + "/", file, TIMEOUT_S) == content_of(directory, file)
    finally:
        stop()
    assert time.monotonic() - start < 4


def test_refused_connection(mirror):
    """Nothing listening (port 9 on loopback) is a SourceError, not a crash."""
    _, files = mirror
    with pytest.raises(fetch.SourceError, match="cannot connect|transfer failed"):
        fetch.fetch_verified("http://127.0.0.1:9/", files["test_images"], TIMEOUT_S)


@pytest.mark.parametrize("short_body_server", [ShortBody, ShortChunkedBody], indirect=True,
                         ids=["content-length", "chunked"])
def test_connection_closed_early(mirror, short_body_server):
    """A transfer cut short is a SourceError (so the next source is tried), whatever the framing."""
    _, files = mirror
    with pytest.raises(fetch.SourceError, match="transfer"):
        fetch.fetch_verified(short_body_server, files["test_images"], TIMEOUT_S)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("short_body_server", [ShortChunkedBody], indirect=True)
def test_a_transfer_cut_short_ends_its_progress_line(mirror, short_body_server, monkeypatch):
    """On a terminal the download's progress is redrawn without a newline; a transfer that breaks
    off must still end that line, or the error printed next would be glued onto it."""
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with pytest.raises(fetch.SourceError, match="transfer"):
        fetch.fetch_verified(short_body_server, mirror[1]["test_images"], TIMEOUT_S)
    assert "downloading" in terminal.getvalue() and terminal.getvalue().endswith("\n")


# ------------------------------------------------------------------------------------------
# The stage: main([out_dir])


class SyntheticStage:
    """fetch.main's view of the world: params for a synthetic dataset with mirrors set per test."""

    def __init__(self, monkeypatch, tmp_path: Path):
        self.monkeypatch, self.tmp_path = monkeypatch, tmp_path
        self.directory = tmp_path / "mirror"
        self.entry = write_mirror(self.directory, n_train=60, n_test=20)
        monkeypatch.delenv(fetch.MIRROR_ENV, raising=False)
        self.files = self.set_mirrors([str(self.directory)]).dataset.files

    def set_mirrors(self, mirrors: list[str]) -> params_mod.Params:
        return use_synthetic_dataset(self.monkeypatch, self.tmp_path, self.entry, {
            "fetch": {"mirrors": {"synthetic": mirrors}},
            "preprocess": {"val_size": 10},  # the synthetic training set has 60 images
            "train": {"batch_size": 10}})


@pytest.fixture
def stage(monkeypatch, tmp_path) -> SyntheticStage:
    return SyntheticStage(monkeypatch, tmp_path)


def test_main_writes_the_four_pinned_contents(stage, tmp_path):
    """With a good source, out_dir holds exactly the four files, uncompressed: the bytes whose
    SHA-256 the table pins, whatever gzip header or zlib build the mirror's copy came from."""
    stage.set_mirrors([str(tmp_path / "missing"), str(stage.directory)])
    out = tmp_path / "work" / "raw"
    fetch.main([str(out)])
    files = stage.files
    assert sorted(p.name for p in out.iterdir()) == sorted(files[role].name for role in FILE_ROLES)
    for file in files.values():
        assert (out / file.name).read_bytes() == content_of(stage.directory, file)
        assert hashlib.sha256((out / file.name).read_bytes()).hexdigest() == file.sha256
    assert sorted(p.name for p in out.parent.iterdir()) == ["raw"]


def test_main_mirror_env_wins(stage, tmp_path, monkeypatch):
    """$MNIST_MIRROR is used before the configured (here: dead) mirrors."""
    stage.set_mirrors([str(tmp_path / "missing")])
    monkeypatch.setenv(fetch.MIRROR_ENV, str(stage.directory))
    out = tmp_path / "work" / "raw"
    fetch.main([str(out)])
    assert len(list(out.glob("*-ubyte"))) == 4


def test_main_refuses_a_mirror_url_with_a_password_without_printing_it(stage, tmp_path, monkeypatch, capsys):
    """urllib would read "alice:S3cret@127.0.0.1" as a host name and every log line would show it."""
    monkeypatch.setenv(fetch.MIRROR_ENV, "http://alice:S3cret@127.0.0.1:9/mnist/")
    out = tmp_path / "work" / "raw"
    with pytest.raises(PipelineError, match=r"^MNIST_MIRROR: http://\*\*\*@127\.0\.0\.1:9/mnist/: a user name or "
                                            "password in a mirror's URL is not supported") as info:
        fetch.main([str(out)])
    assert "S3cret" not in str(info.value) + "".join(capsys.readouterr()) and not out.exists()


@pytest.mark.parametrize(("source", "shown"), [
    ("https://token@example.org/mnist/", "https://***@example.org/mnist/"),
    ("https://a:b@c@example.org", "https://***@example.org"),
    ("https://example.org/mnist@2/", None),  # an @ in the path is no credential
    ("https://example.org/mnist?from=a@b", None),  # nor one in the query
    ("/data/mirror@2", None),
])
def test_credentials_are_found_in_the_authority_only(source, shown):
    problem = datasets_mod.credentials_problem(source)
    assert (problem is None) if shown is None else problem.startswith(f"{shown}: a user name or password")


def test_main_leaves_nothing_when_every_source_fails(stage, tmp_path):
    """Three files fetched and the fourth unavailable: out_dir is not created, no temporary is left."""
    directory = stage.directory
    (directory / stage.files["test_labels"].gz_name).unlink()
    stage.set_mirrors([str(directory), str(tmp_path / "missing")])
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(PipelineError, match="could not fetch t10k-labels"):
        fetch.main([str(work / "raw")])
    assert list(work.iterdir()) == []


def test_main_failure_keeps_previous_output(stage, tmp_path):
    """A failed fetch leaves an existing out_dir exactly as it was."""
    stage.set_mirrors([str(tmp_path / "missing")])
    out = tmp_path / "work" / "raw"
    out.mkdir(parents=True)
    old = out / stage.files["train_images"].name  # an earlier fetch's (any other file is refused: below)
    old.write_bytes(b"old")
    with pytest.raises(PipelineError, match="could not fetch"):
        fetch.main([str(out)])
    assert [p.name for p in out.iterdir()] == [old.name] and old.read_bytes() == b"old"
    assert sorted(p.name for p in out.parent.iterdir()) == ["raw"]
    stage.set_mirrors([str(stage.directory)])  # and a fetch that succeeds replaces it
    fetch.main([str(out)])
    assert hashlib.sha256(old.read_bytes()).hexdigest() == stage.files["train_images"].sha256


def test_main_replaces_links_to_a_cache_even_broken_ones(stage, tmp_path):
    """With DVC's cache.type symlink data/raw holds links to cache objects; where the cache moved away
    they are broken, and fetch run by hand must repair them, not call them files it did not write.
    Only the links are replaced: what they point to stays."""
    out = tmp_path / "work" / "raw"
    out.mkdir(parents=True)
    kept = tmp_path / "cache-object"
    kept.write_bytes(b"a cache object")
    (out / stage.files["train_images"].name).symlink_to(kept)
    (out / stage.files["test_images"].name).symlink_to(tmp_path / "moved-away")
    fetch.main([str(out)])
    assert not any(path.is_symlink() for path in out.iterdir()) and len(list(out.iterdir())) == 4
    assert kept.read_bytes() == b"a cache object"


@pytest.mark.parametrize("kind", ["a file", "a folder of other files", "a subfolder", "one other file"])
def test_main_refuses_to_replace_what_it_did_not_write(stage, tmp_path, kind):
    """fetch replaces its output directory whole. Under `dvc repro` DVC has removed it first; run by
    hand on a folder of the user's (`stages/run fetch ~/thesis`), it deleted their files and exited
    0. Refused before any download, naming what is there; the table's own files may be replaced."""
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    if kind == "a file":
        out.write_text("precious")
    else:
        out.mkdir()
        (out / stage.files["test_labels"].name).write_bytes(b"an earlier fetch's")
        if kind == "a subfolder":
            (out / "notes").mkdir()
        else:
            for name in (["thesis.tex"] if kind == "one other file" else ["thesis.tex", "data.csv", "a.png"]):
                (out / name).write_text("precious")
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    stage.set_mirrors([str(tmp_path / "missing")])  # nothing would be downloaded anyway: refused before
    expected = {"a file": f"{out} is a file; fetch writes a directory there",
                "a folder of other files": f"{out} holds 'a.png', 'data.csv', 'thesis.tex', which fetch did not write",
                "a subfolder": f"{out} holds 'notes', which fetch did not write",
                "one other file": f"{out} holds 'thesis.tex', which fetch did not write"}[kind]
    with pytest.raises(PipelineError, match=f"^{re.escape(expected)}"):
        fetch.main([str(out)])
    if kind == "a file":
        assert out.read_text() == "precious"
    else:
        assert sorted(p.name for p in out.iterdir()) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # no temporary either


def test_known_files_name_every_file_of_the_table_by_its_dataset():
    """fetch (and the benchmarks' check of --raw) say whose file a wrong one is: MNIST's and
    Fashion-MNIST's share names, so after a `fashion` repro data/raw holds garments."""
    table = load_table()
    known = datasets_mod.known_files(table)
    assert len(known) == sum(len(dataset.files) for dataset in table.values()) == 4 * len(table)
    garments = table["fashion-mnist"].files["train_images"]
    assert str(known[garments.sha256]) == "fashion-mnist's train-images-idx3-ubyte"
    assert known[garments.sha256] == datasets_mod.KnownFile(table["fashion-mnist"], "train_images")
    assert str(known[table["mnist"].files["test_labels"].sha256]) == "mnist's t10k-labels-idx1-ubyte"
