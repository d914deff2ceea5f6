"""Schemathesis against each service's OpenAPI document (positive and negative cases, valid
credentials): no 5xx, responses in the documented content type and schema, invalid data
refused, and no status code the document does not declare. Cases are generated before the
service starts (derandomized: the same cases every run), then sent to it in-process. No
operation is left out and no status is exempt."""

import pytest

from services.ledger.main import create_app as create_ledger
from services.purchases import repository as purchases_repository
from services.purchases.main import create_app as create_purchases
from services.rewards.main import create_app as create_rewards
from tests.support.hostile import FuzzReport, fuzz, max_examples, openapi_cases, serving
from tests.support.ledger import ADMIN as LEDGER_ADMIN
from tests.support.ledger import ledger_settings
from tests.support.purchases import purchases_settings
from tests.support.rewards import ADMIN as REWARDS_ADMIN
from tests.support.rewards import bearer, rewards_settings

pytestmark = pytest.mark.asyncio(loop_scope="session")

# The fulfilment and support routes of the rewards service: generated like every other.
REWARDS_FULFILMENT_OPERATIONS = {
    "GET /v1/admin/fulfilments", "POST /v1/admin/redemptions/{redemption_id}/ship",
    "POST /v1/admin/redemptions/{redemption_id}/deliver", "GET /v1/admin/redemptions",
    "GET /v1/admin/redemptions/{redemption_id}",
}


def check(report: FuzzReport, cases: list) -> None:
    print(report.summary())
    detail = "\n".join([report.summary(), *report.failures,
                        *(f"undocumented {op} -> {status}: {body}" for (op, status), body in report.undocumented.items())])
    # nearly every case reaches the service (a few have header values HTTP cannot carry)
    assert len(cases) >= 50 and report.sent >= 0.9 * len(cases), detail
    assert not report.failures, detail
    assert not report.undocumented, detail


async def test_purchases_answers_every_generated_request_as_its_openapi_document_says(base_env):
    settings = purchases_settings(base_env, admin_api_key="purchases-admin-test-key")
    app = create_purchases(settings)
    cases = openapi_cases(app, max_examples_per_mode=max_examples())
    async with serving(app, "http://purchases") as client:
        await purchases_repository.add_api_key(app.state.runtime.pool, key="key-store-1", store_id="store-1")
        report = await fuzz(client, cases, auth=lambda op: (
            {"X-Admin-Key": "purchases-admin-test-key"} if op.path.startswith("/v1/admin/")
            else {"X-API-Key": "key-store-1"}))
        ready = await client.get("/readyz")
    assert ready.status_code == 200
    check(report, cases)


async def test_ledger_answers_every_generated_request_as_its_openapi_document_says(base_env):
    settings = ledger_settings(base_env)
    app = create_ledger(settings)
    cases = openapi_cases(app, max_examples_per_mode=max_examples())
    async with serving(app, "http://ledger") as client:
        report = await fuzz(client, cases, auth=lambda op: LEDGER_ADMIN)
        ready = await client.get("/readyz")
    assert ready.status_code == 200
    check(report, cases)


async def test_rewards_answers_every_generated_request_as_its_openapi_document_says(base_env):
    # saga_wait_ms=0: a generated redemption answers 202 at once instead of waiting for a ledger
    settings = rewards_settings(base_env, saga_wait_ms=0)
    app = create_rewards(settings)
    cases = openapi_cases(app, max_examples_per_mode=max_examples())
    assert REWARDS_FULFILMENT_OPERATIONS <= {c.operation.label for c in cases}
    headers = {**REWARDS_ADMIN, **bearer("fuzz-customer", settings)}
    async with serving(app, "http://rewards") as client:
        report = await fuzz(client, cases, auth=lambda op: headers)
        ready = await client.get("/readyz")
    assert ready.status_code == 200
    check(report, cases)


async def test_churn_answers_every_generated_request_as_its_openapi_document_says(base_env):
    from services.churn.main import create_app as create_churn
    from tests.support.churn import ADMIN as CHURN_ADMIN
    from tests.support.churn import churn_settings

    app = create_churn(churn_settings(base_env))
    cases = openapi_cases(app, max_examples_per_mode=max_examples())
    async with serving(app, "http://churn") as client:
        report = await fuzz(client, cases, auth=lambda op: CHURN_ADMIN)
        ready = await client.get("/readyz")
    assert ready.status_code == 200
    check(report, cases)


async def test_engagement_answers_every_generated_request_as_its_openapi_document_says(base_env):
    from deploy.local.infra import free_port
    from services.engagement.main import create_app as create_engagement
    from tests.support.engagement import ADMIN_KEY as ENGAGEMENT_ADMIN_KEY
    from tests.support.engagement import engagement_settings

    # No mail is sent here (nothing listens on the SMTP port: a send would be retried later);
    # the app is served over ASGI, not on its HTTP port.
    app = create_engagement(engagement_settings(base_env, smtp_port=free_port(), http_port=free_port()))
    cases = openapi_cases(app, max_examples_per_mode=max_examples())
    async with serving(app, "http://engagement") as client:
        report = await fuzz(client, cases, auth=lambda op: {"X-Admin-Key": ENGAGEMENT_ADMIN_KEY})
        ready = await client.get("/readyz")
    assert ready.status_code == 200
    check(report, cases)
