"""A local mail catcher (aiosmtpd): an SMTP server on loopback that keeps every message as
an .eml file in a folder. The file is named after the message's Message-ID, so a message
sent twice with the same id (the engagement dispatcher's resend after a crash) is one file;
`deliveries.log` keeps one line per SMTP delivery, duplicates included.

    python -m deploy.local.mailcatcher --dir .run/mail --port 8025
"""

import argparse
import asyncio
import hashlib
import os
import re
import signal
import threading
from email import message_from_bytes
from email.policy import default as default_policy
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

_SAFE = re.compile(r"[^A-Za-z0-9@._-]")
_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(.+?)[ \t]*$", re.IGNORECASE | re.MULTILINE)
def file_name(message_id: str | None, raw: bytes) -> str:
    if message_id:
        name = _SAFE.sub("_", message_id.strip().strip("<>"))[:150]
        if name:
            return f"{name}.eml"
    return f"no-id-{hashlib.sha256(raw).hexdigest()[:24]}.eml"


class _Keeper:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._folder = str(folder)
        self.lock = threading.Lock()
        # Kept open: opening a file costs as much as the rest of a delivery here.
        self.log = open(folder / "deliveries.log", "a", buffering=1)  # noqa: SIM115 - lives as long as the server; O_APPEND keeps lines whole across processes

    async def handle_DATA(self, server, session, envelope) -> str:
        raw = envelope.original_content or envelope.content
        # Only the Message-ID is needed here: read from the header block, not a full parse.
        found = _MESSAGE_ID.search(raw.split(b"\r\n\r\n", 1)[0].replace(b"\r\n", b"\n"))
        name = file_name(found[1].decode(errors="replace") if found else None, raw)
        tmp = f"{self._folder}/.{name}.{os.getpid()}.{threading.get_ident()}.tmp"
        # os-level calls: pathlib's and io's objects cost as much as the write itself here.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, raw)
        finally:
            os.close(fd)
        os.replace(tmp, f"{self._folder}/{name}")  # atomic: a reader never sees half a message
        with self.lock:
            self.log.write(f"{name}\n")
        return "250 Message accepted"


class MailCatcher:
    """Start/stop in-process (tests) or run as a process (make up)."""

    def __init__(self, folder: Path, *, host: str = "127.0.0.1", port: int = 8025) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.host, self.port = host, port
        self.controller = Controller(_Keeper(self.folder), hostname=host, port=port, decode_data=False,
                                     data_size_limit=10_000_000)

    def start(self) -> "MailCatcher":
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    def messages(self) -> list:
        return [message_from_bytes(p.read_bytes(), policy=default_policy) for p in sorted(self.folder.glob("*.eml"))]

    def deliveries(self) -> list[str]:
        path = self.folder / "deliveries.log"
        return path.read_text().split() if path.exists() else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8025)
    parser.add_argument("--processes", type=int, default=1,
                        help="server processes sharing the port (SO_REUSEPORT), for benchmarks")
    args = parser.parse_args()
    children = []
    for _ in range(args.processes - 1):
        pid = os.fork()
        if pid == 0:
            children = None
            break
        children.append(pid)
    try:
        import uvloop  # the loop in C: the catcher must not be what a dispatch benchmark measures
        uvloop.run(serve(Path(args.dir), args.host, args.port, reuse_port=args.processes > 1))
    except ImportError:
        asyncio.run(serve(Path(args.dir), args.host, args.port, reuse_port=args.processes > 1))
    for pid in children or []:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)


async def serve(folder: Path, host: str, port: int, *, reuse_port: bool = False) -> None:
    """The catcher as a process: the SMTP server on this process's own event loop (no
    controller thread to share the interpreter with)."""
    folder.mkdir(parents=True, exist_ok=True)
    keeper = _Keeper(folder)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(keeper, hostname="mailcatcher.local", decode_data=False,
                                                   data_size_limit=10_000_000), host, port,
                                    reuse_port=reuse_port)
    print(f"mail catcher on {host}:{port}, keeping messages in {folder}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    await server.wait_closed()


if __name__ == "__main__":
    main()
