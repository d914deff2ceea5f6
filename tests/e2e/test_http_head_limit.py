"""Request heads are bounded on every HTTP service: a header past the limit is answered 431
with the usual body and the connection closed, and a client sending huge headers cannot grow
the process's memory (before: eight 32 MB headers took a service from 153 MB to 655 MB)."""

import json
import socket

import pytest

from tests.support.processes import ServiceProcess

pytestmark = [pytest.mark.slow]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def raw_request(port: int, head: bytes, *, chunk: bytes = b"", repeat: int = 0) -> bytes:
    """Send `head`, then `chunk` `repeat` times (stopping when the server closes), and read
    the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(head)
            for _ in range(repeat):
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        try:
            while True:
                got = sock.recv(65536)
                if not got:
                    break
                answer += got
        except (ConnectionResetError, socket.timeout):
            pass
        return answer


@pytest.mark.parametrize("service", ["purchases", "rewards"])
def test_a_head_past_the_limit_gets_431_and_huge_headers_do_not_grow_memory(service, base_env, tmp_path):
    extra = {"REWARDS_JWT_SECRET": "j" * 40} if service == "rewards" else {}
    proc = ServiceProcess(service, base_env, extra, log_dir=tmp_path).start()
    try:
        answer = raw_request(proc.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n")
        status, _, rest = answer.partition(b"\r\n")
        assert status == b"HTTP/1.1 431 Request Header Fields Too Large"
        assert json.loads(rest.split(b"\r\n\r\n", 1)[1])["detail"]["reason"] == "headers_too_large"

        ok = raw_request(proc.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Fine: " + b"a" * 8_000 +
                         b"\r\nConnection: close\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200")

        before = rss_kib(proc.proc.pid)
        for _ in range(8):  # eight 32 MB headers, each sent in 1 MB chunks until the server hangs up
            raw_request(proc.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Huge: ", chunk=b"a" * (1 << 20), repeat=32)
        assert rss_kib(proc.proc.pid) - before < 30 * 1024
    finally:
        proc.stop()
