"""Messages and the channels that carry them: Jinja2 templates per locale, email over SMTP
(aiosmtplib, any server), a webhook (HTTP POST, HMAC-signed). Every message carries its
idempotency key: the SMTP Message-ID derives from it, the webhook sends it as a header."""

import binascii
import functools
import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from email.header import Header
from email.utils import formatdate, parseaddr
from pathlib import Path

import aiosmtplib
import httpx
from jinja2 import Environment, FileSystemLoader, StrictUndefined, Template, select_autoescape

from services.engagement.settings import EngagementSettings

TEMPLATES = Path(__file__).parent / "templates"
LANGUAGES = ("pl", "en")

FOOTER = {
    "pl": "\n\n--\nUwagi lub reklamacja: {complaint_url}\nNie chcesz tych wiadomości? Wypisz się: {unsubscribe_url}\n",
    "en": "\n\n--\nA remark or a complaint: {complaint_url}\nDon't want these messages? Unsubscribe: {unsubscribe_url}\n",
}


def language(locale: str | None, default: str = "pl-PL") -> str:
    for candidate in (locale, default):
        lang = (candidate or "").replace("_", "-").split("-")[0].lower()
        if lang in LANGUAGES:
            return lang
    return "en"


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str
    body: str
    lang: str


class Templates:
    def __init__(self, folder: Path = TEMPLATES) -> None:
        # Plain text mail: no HTML escaping, but every variable must exist (a typo fails loudly).
        # Templates are read once (no auto_reload: a stat of the file per message otherwise);
        # an edited template takes effect at the next start.
        self.env = Environment(loader=FileSystemLoader(folder), autoescape=select_autoescape([]),
                               undefined=StrictUndefined, keep_trailing_newline=False, auto_reload=False)
        self._compiled: dict[tuple[str, str], Template] = {}

    def template(self, template: str, lang: str) -> Template:
        key = (template, lang)
        if key not in self._compiled:
            self._compiled[key] = self.env.get_template(f"{lang}/{template}.txt")
        return self._compiled[key]

    def render(self, template: str, lang: str, variables: dict, *, unsubscribe_url: str,
               complaint_url: str) -> Rendered:
        text = self.template(template, lang).render(
            **{"points": None, "pending": False, "available_points": None, "store_id": None, "category": None,
               "expires_on": None, "from_tier": None, "to_tier": None, "incentive_points": None,
               "survey_url": None, **variables})
        first, _, rest = text.partition("\n")
        subject = first.removeprefix("Subject:").strip()
        body = rest.strip() + FOOTER[lang].format(unsubscribe_url=unsubscribe_url, complaint_url=complaint_url)
        return Rendered(subject, body, lang)


@dataclass(frozen=True, slots=True)
class Outgoing:
    touchpoint_id: uuid.UUID
    customer_id: str
    to_email: str | None
    to_phone: str | None
    rendered: Rendered
    unsubscribe_url: str
    unsubscribe_post_url: str


class DeliveryError(Exception):
    """The channel did not take the message; retried with backoff, then marked failed."""


def message_id(touchpoint_id: uuid.UUID, domain: str) -> str:
    return f"<{touchpoint_id}@{domain}>"


@functools.lru_cache(maxsize=4096)
def _header(value: str) -> str:
    """A header value as ASCII: RFC 2047 encoded words when it is not. Cached: a journey's
    subjects are few, and the email package's encoder costs tens of microseconds a call."""
    return value if value.isascii() else Header(value, "utf-8").encode()


@functools.lru_cache(maxsize=2)
def _date(second: int) -> str:
    return formatdate(second, localtime=False, usegmt=True)


def email_bytes(settings: EngagementSettings, out: Outgoing) -> bytes:
    """The message as bytes, written directly: the email package's header objects cost
    several milliseconds a message, which capped the dispatcher near 120 messages/s."""
    for value in (out.to_email, out.unsubscribe_post_url):
        if "\r" in value or "\n" in value:
            raise DeliveryError("a header value with a line break")
    headers = [
        ("From", _header(settings.mail_from)),
        ("To", out.to_email),
        ("Subject", _header(out.rendered.subject)),
        ("Date", _date(int(time.time()))),
        # Derived from the touchpoint's idempotency key: a resend after a crash carries the same id.
        ("Message-ID", message_id(out.touchpoint_id, settings.message_id_domain)),
        ("Content-Language", out.rendered.lang),
        # RFC 8058 one-click unsubscribe (and RFC 2369's header it extends)
        ("List-Unsubscribe", f"<{out.unsubscribe_post_url}>"),
        ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
        ("MIME-Version", "1.0"),
        ("Content-Type", 'text/plain; charset="utf-8"'),
        ("Content-Transfer-Encoding", "quoted-printable"),
    ]
    body = binascii.b2a_qp(out.rendered.body.replace("\r\n", "\n").encode()).replace(b"\n", b"\r\n")
    return "".join(f"{k}: {v}\r\n" for k, v in headers).encode() + b"\r\n" + body + b"\r\n"


class EmailChannel:
    """A small pool of SMTP sessions reused across messages (a session per message would cap
    the rate at the server's connection setup)."""

    def __init__(self, settings: EngagementSettings) -> None:
        self.settings = settings
        self._idle: list[aiosmtplib.SMTP] = []
        self._sender = parseaddr(settings.mail_from)[1] or settings.mail_from

    async def _connect(self) -> aiosmtplib.SMTP:
        s = self.settings
        client = aiosmtplib.SMTP(hostname=s.smtp_host, port=s.smtp_port, use_tls=s.smtp_tls,
                                 start_tls=s.smtp_starttls if s.smtp_starttls else False, timeout=s.smtp_timeout_s)
        await client.connect()
        if s.smtp_username:
            await client.login(s.smtp_username, s.smtp_password.get_secret_value() if s.smtp_password else "")
        return client

    async def send(self, out: Outgoing) -> None:
        if not out.to_email:
            raise DeliveryError("no e-mail address")
        client = self._idle.pop() if self._idle else None
        try:
            if client is None or not client.is_connected:
                client = await self._connect()
            await self._transaction(client, out.to_email, email_bytes(self.settings, out))
        # ValueError: an address aiosmtplib will not put on a command line (the session may
        # hold half an envelope: closed like the others).
        except (TimeoutError, aiosmtplib.SMTPException, OSError, ValueError) as exc:
            if client is not None:
                client.close()
            raise DeliveryError(f"{type(exc).__name__}: {exc}") from exc
        self._idle.append(client)

    async def _transaction(self, client: aiosmtplib.SMTP, to: str, message: bytes) -> None:
        """MAIL, RCPT, DATA: sendmail's steps without its second parse of each address and
        its SIZE pass over the message."""
        try:
            await client.mail(self._sender)
            await client.rcpt(to)
            await client.data(message)
        except aiosmtplib.SMTPResponseException:
            try:  # the envelope reset for the next message on this session, as sendmail does
                await client.rset()
            except (aiosmtplib.SMTPException, OSError):
                client.close()
            raise

    async def close(self) -> None:
        while self._idle:
            client = self._idle.pop()
            try:
                await client.quit()
            except Exception:  # noqa: BLE001 - closing anyway
                client.close()


def webhook_signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class WebhookChannel:
    """POST {touchpoint_id, customer_id, phone, subject, body} to a provider's gateway, with
    Idempotency-Key (the touchpoint id) and X-Signature (HMAC-SHA256 of the body)."""

    def __init__(self, settings: EngagementSettings) -> None:
        self.settings = settings
        self._client: httpx.AsyncClient | None = None

    async def send(self, out: Outgoing) -> None:
        s = self.settings
        if not s.webhook_url:
            raise DeliveryError("ENGAGEMENT_WEBHOOK_URL is not set")
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=s.webhook_timeout_s)
        body = json.dumps({"touchpoint_id": str(out.touchpoint_id), "customer_id": out.customer_id,
                           "phone": out.to_phone, "subject": out.rendered.subject, "body": out.rendered.body,
                           "unsubscribe_url": out.unsubscribe_url}).encode()
        headers = {"Content-Type": "application/json", "Idempotency-Key": str(out.touchpoint_id)}
        if s.webhook_secret:
            headers["X-Signature"] = webhook_signature(s.webhook_secret.get_secret_value(), body)
        try:
            response = await self._client.post(s.webhook_url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise DeliveryError(f"{type(exc).__name__}: {exc}") from exc
        if response.status_code >= 300:
            raise DeliveryError(f"webhook answered {response.status_code}")

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
