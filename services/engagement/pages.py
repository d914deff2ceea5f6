"""The customer-facing pages: plain HTML forms that work without JavaScript (survey,
unsubscribe, remark or complaint). Every value from outside is escaped by Jinja2."""

from jinja2 import Environment, select_autoescape

_env = Environment(autoescape=select_autoescape(default=True, default_for_string=True))

_LAYOUT = """<!doctype html><html lang="{{ lang }}"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{{ title }}</title>
<style>body{font-family:sans-serif;max-width:36rem;margin:2rem auto;padding:0 1rem}
fieldset{border:0;padding:0;margin:1rem 0}label{margin-right:.6rem;white-space:nowrap}
textarea{width:100%;min-height:6rem}button{font-size:1rem;padding:.5rem 1.2rem}</style></head>
<body><h1>{{ title }}</h1>{{ body }}</body></html>"""

TEXT = {
    "pl": {"survey": "Jak oceniasz zakupy?", "nps": "Jak bardzo prawdopodobne jest, że polecisz nas znajomym? (0-10)",
           "csat": "Jak bardzo jesteś zadowolony z zakupu? (1-5)", "remark": "Uwagi (opcjonalnie)",
           "send": "Wyślij", "thanks": "Dziękujemy za odpowiedź!", "unsub": "Wypisanie z wiadomości",
           "unsub_q": "Czy na pewno nie chcesz już otrzymywać od nas wiadomości?", "unsub_b": "Wypisz mnie",
           "unsub_done": "Wypisano. Nie wyślemy już wiadomości na ten kanał.", "complaint": "Uwagi i reklamacje",
           "complaint_q": "Napisz, co możemy poprawić. Odpowiemy w ciągu 48 godzin.",
           "complaint_done": "Dziękujemy. Zajmiemy się tym i odezwiemy się wkrótce.",
           "unavailable": "Ta ankieta jest już niedostępna.", "bad_link": "Ten link jest nieprawidłowy lub wygasł."},
    "en": {"survey": "How was your purchase?", "nps": "How likely are you to recommend us to a friend? (0-10)",
           "csat": "How satisfied are you with your purchase? (1-5)", "remark": "A remark (optional)",
           "send": "Send", "thanks": "Thank you for your answer!", "unsub": "Unsubscribe",
           "unsub_q": "Do you really want to stop receiving our messages?", "unsub_b": "Unsubscribe me",
           "unsub_done": "Unsubscribed. We will not send you messages on this channel any more.",
           "complaint": "Remarks and complaints", "complaint_q": "Tell us what we can do better. We answer within 48 hours.",
           "complaint_done": "Thank you. We are on it and will be in touch soon.",
           "unavailable": "This survey is no longer available.", "bad_link": "This link is invalid or has expired."},
}

_SURVEY = """<form method="post">
<fieldset><legend>{{ t.nps }}</legend>
{% for n in range(11) %}<label><input type="radio" name="nps" value="{{ n }}" required> {{ n }}</label>{% endfor %}
</fieldset>
<fieldset><legend>{{ t.csat }}</legend>
{% for n in range(1, 6) %}<label><input type="radio" name="csat" value="{{ n }}"> {{ n }}</label>{% endfor %}
</fieldset>
<fieldset><label for="remark">{{ t.remark }}</label><textarea id="remark" name="remark" maxlength="4000"></textarea>
</fieldset><button type="submit">{{ t.send }}</button></form>"""

_UNSUBSCRIBE = """<p>{{ t.unsub_q }}</p><form method="post">
<input type="hidden" name="List-Unsubscribe" value="One-Click"><button type="submit">{{ t.unsub_b }}</button></form>"""

_COMPLAINT = """<p>{{ t.complaint_q }}</p><form method="post">
<textarea name="remark" maxlength="4000" required></textarea><button type="submit">{{ t.send }}</button></form>"""


def page(lang: str, title_key: str, body_template: str = "", message_key: str | None = None) -> str:
    t = TEXT.get(lang, TEXT["en"])
    body = _env.from_string(body_template).render(t=t) if body_template else ""
    if message_key:
        body = _env.from_string("<p>{{ m }}</p>").render(m=t[message_key]) + body
    return _env.from_string(_LAYOUT).render(lang=lang, title=t[title_key], body=_markup(body))


def _markup(html: str):
    from markupsafe import Markup
    return Markup(html)


def survey_form(lang: str) -> str:
    return page(lang, "survey", _SURVEY)


def unsubscribe_form(lang: str) -> str:
    return page(lang, "unsub", _UNSUBSCRIBE)


def complaint_form(lang: str) -> str:
    return page(lang, "complaint", _COMPLAINT)
