"""Structured (JSON) logs that carry the correlation_id of the message being handled: one
format for every logger of the process, FastStream's and uvicorn's included."""

import contextvars
import json
import logging
import sys
from datetime import datetime, timezone

correlation_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("correlation_id", default=None)

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName",
                                                                            "color_message"}
# Every subscriber says so at start; the services create their topics themselves
# (shared/topics.py), so the warning is expected and says nothing.
_EXPECTED = ("Auto create topics is disabled",)


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        cid = correlation_id.get()
        if cid:
            entry["correlation_id"] = cid
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD and v not in ("", None)})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class DropExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(_EXPECTED))


def configure_logging(service: str, *, level: str = "INFO", json_logs: bool = True) -> None:
    if json_logs:
        formatter: logging.Formatter = JsonFormatter(service)
    else:
        formatter = logging.Formatter(f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    handler.addFilter(DropExpected())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiokafka").setLevel("WARNING")
    # One line per HTTP request is a debugging aid, not an operational log (the demo alone
    # wrote 190 KB a minute): uvicorn's access log only at DEBUG. /metrics counts requests.
    logging.getLogger("uvicorn.access").setLevel("DEBUG" if level.upper() == "DEBUG" else "WARNING")
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "faststream"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # FastStream's broker logger does not propagate and adds its own coloured handler on
    # stdout unless the logger already has a stream handler on stdout: give it ours.
    broker = logging.getLogger("faststream.access.kafka")
    broker_handler = logging.StreamHandler(sys.stdout)
    broker_handler.setFormatter(formatter)
    broker_handler.addFilter(DropExpected())
    broker.handlers[:] = [broker_handler]
    broker.propagate = False
