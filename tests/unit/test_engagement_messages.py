"""Messages as they leave: templates per locale with the footer links, the email's bytes
(headers a mail parser reads back, RFC 2047 subject, quoted-printable body, RFC 8058
headers, the Message-ID from the idempotency key), and the webhook signature."""

import hashlib
import hmac
import uuid
from email import message_from_bytes
from email.policy import default

import pytest

from deploy.local.mailcatcher import file_name
from services.engagement.channels import (
    DeliveryError,
    Outgoing,
    Rendered,
    Templates,
    email_bytes,
    language,
    webhook_signature,
)
from services.engagement.settings import EngagementSettings


def rendered(lang: str) -> Rendered:
    return Templates().render("thank_you", lang, {"points": 42, "store_id": "s1", "available_points": 100},
                              unsubscribe_url="http://x/u/t", complaint_url="http://x/c/t")


def test_the_locale_picks_the_language_and_every_message_ends_with_both_links():
    assert language("pl-PL") == "pl" and language("en_GB") == "en"
    assert language("de-DE") == "pl" and language("de-DE", "en-US") == "en"  # the default locale
    assert language(None) == "pl"
    pl, en = rendered("pl"), rendered("en")
    assert pl.subject == "Dziękujemy za zakupy" and "42 pkt" in pl.body and "w sklepie s1" in pl.body
    assert en.subject == "Thank you for your purchase" and "42 points" in en.body
    for r in (pl, en):
        assert "http://x/u/t" in r.body and "http://x/c/t" in r.body


def test_the_email_reads_back_with_its_headers_and_body():
    touchpoint = uuid.uuid4()
    out = Outgoing(touchpoint, "c1", "ala@example.com", None, rendered("pl"), "http://x/u/t", "http://x/u/t")
    raw = email_bytes(EngagementSettings(message_id_domain="shop.example"), out)
    assert raw.isascii()
    mail = message_from_bytes(raw, policy=default)
    assert mail["Subject"] == "Dziękujemy za zakupy" and mail["To"] == "ala@example.com"
    assert mail["Message-ID"] == f"<{touchpoint}@shop.example>"
    assert mail["List-Unsubscribe"] == "<http://x/u/t>"
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert mail.get_body(("plain",)).get_content().replace("\r\n", "\n").startswith("Dziękujemy za zakupy w sklepie s1.")
    assert file_name(mail["Message-ID"], raw) == f"{touchpoint}@shop.example.eml"


def test_a_header_value_with_a_line_break_is_never_sent():
    out = Outgoing(uuid.uuid4(), "c1", "a@example.com\r\nBcc: b@evil.test", None, rendered("en"), "u", "u")
    with pytest.raises(DeliveryError):
        email_bytes(EngagementSettings(), out)


def test_the_webhook_signature_is_hmac_sha256_of_the_body():
    assert webhook_signature("k", b"{}") == "sha256=" + hmac.new(b"k", b"{}", hashlib.sha256).hexdigest()
