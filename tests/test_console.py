"""The web console at /ui/, in a real browser (Debian's chromium, driven by Playwright).

One `switchyard up` with an admin token and one browser for the module; each test opens its
own tab, enters the token through the page, and checks what the operator sees, and, for the
actions, what OpenAI clients see through Envoy afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.conftest import Running, require_program, switchyard, wait_until

TOKEN = "console-test-token"
MODEL = "llama-3-8b"
MODELS = [
    {
        "name": MODEL,
        "versions": [
            {"name": "v1", "weight": 100, "backend": {"sim": {}}},
            {"name": "v2", "weight": 0, "backend": {"sim": {}}},
        ],
    }
]
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
]  # fmt: skip
WAIT_MS = 15_000


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Running]:
    directory = tmp_path_factory.mktemp("console")
    with switchyard("up", directory, MODELS, env={"SWITCHYARD_ADMIN_TOKEN": TOKEN}) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = require_program("chromium", "Debian package chromium (make system-deps)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Browser, stack: Running) -> Iterator[Page]:
    """A fresh tab on the console (no token yet); any rollout left active is aborted after.
    A script error in the page fails the test."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    tab = context.new_page()
    tab.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield tab
        assert errors == [], errors
    finally:
        context.close()
        for rollout in stack.api("GET", "/v1/rollouts?active=true")[1]["rollouts"]:
            stack.api("POST", f"/v1/rollouts/{rollout['id']}/abort")


@pytest.fixture
def client(stack: Running) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.proxy}/v1", api_key="unused", max_retries=0)


def open_console(page: Page, stack: Running, token: str = TOKEN) -> None:
    page.goto(f"{stack.admin}/ui")
    page.fill("#token", token)
    page.click("text=Use token")
    expect(page.locator("#live")).to_have_text("Live")


def card(page: Page):
    return page.locator(f'article[data-model="{MODEL}"]')


def expect_weight(page: Page, version: str, weight: int) -> None:
    segment = card(page).locator(f'.bar .segment[data-version="{version}"]')
    expect(segment).to_have_attribute("data-weight", str(weight))


def stable_and_candidate(stack: Running) -> tuple[str, str]:
    model = stack.api("GET", f"/v1/models/{MODEL}")[1]
    candidate = next(v["name"] for v in model["versions"] if v["name"] != model["stable"])
    return model["stable"], candidate


def served_by(client: openai.OpenAI, count: int = 10) -> set[str]:
    """The versions that answered `count` completions through Envoy."""
    versions = set()
    for _ in range(count):
        raw = client.completions.with_raw_response.create(model=MODEL, prompt="hi", max_tokens=2)
        versions.add(raw.headers["x-switchyard-version"])
    return versions


def start_from_form(page: Page, steps: str, pause: str = "") -> None:
    page.select_option("#rf-strategy", "canary")
    page.fill("#rf-steps", steps)
    page.fill("#rf-pause", pause)
    page.click("#rf-submit")


def start_gated_canary(stack: Running, candidate: str, weight: int) -> dict:
    spec = {"model": MODEL, "to": candidate, "strategy": "canary",
            "steps": [{"set_weight": weight}, {"pause": {}}, {"set_weight": 100}]}  # fmt: skip
    status, rollout = stack.api("POST", "/v1/rollouts", spec)
    assert status == 201, rollout
    return rollout


def test_overview_without_token_says_so_then_shows_versions_and_weights(page, stack):
    page.goto(f"{stack.admin}/ui")
    assert page.url == f"{stack.admin}/ui/"
    expect(page.locator("#notice")).to_contain_text("missing or wrong bearer token")
    expect(page.locator("#live")).to_have_text("Not authorized")

    open_console(page, stack)
    assert TOKEN not in page.url
    expect(page.locator("#notice")).to_have_text("")
    stable, candidate = stable_and_candidate(stack)
    expect_weight(page, stable, 100)
    expect_weight(page, candidate, 0)
    rows = card(page).locator("table.versions tbody tr")
    expect(rows).to_have_count(2)
    for version, weight in ((stable, 100), (candidate, 0)):
        row = card(page).locator(f'table.versions tr[data-version="{version}"]')
        expect(row).to_contain_text(f"{weight}%")
        expect(row).to_contain_text("active")
        expect(row).to_contain_text("ready")
        expect(row).to_contain_text("http://127.0.0.1:")
    unlabelled = page.evaluate(
        """[...document.querySelectorAll('input, select, button, progress')]
           .filter((e) => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                          && !e.textContent.trim())
           .map((e) => e.outerHTML)"""
    )
    assert unlabelled == [], unlabelled  # every control has a name a screen reader can read
    expect(card(page).locator(".bar")).to_have_attribute(
        "aria-label", f"Weights of {MODEL}: v1 {100 if stable == 'v1' else 0}%, "
        f"v2 {100 if stable == 'v2' else 0}%"
    )  # fmt: skip


def test_canary_from_the_form_moves_the_bar_and_promote_reaches_envoy(page, stack, client):
    open_console(page, stack)
    stable, candidate = stable_and_candidate(stack)
    page.select_option("#rf-to", candidate)
    start_from_form(page, "20,60,100")  # no pause: each step waits for Resume or Promote
    expect(page.locator("#notice")).to_contain_text("Started ro-")
    expect_weight(page, candidate, 20)
    expect_weight(page, stable, 80)
    expect(card(page).locator(".badge").first).to_have_text("paused")
    expect(card(page).locator(".step-text")).to_have_text("step 2 of 5")

    card(page).get_by_role("button", name="Resume").click()
    expect_weight(page, candidate, 60)
    expect(card(page).locator(".step-text")).to_have_text("step 4 of 5")

    card(page).get_by_role("button", name="Promote").click()
    expect_weight(page, candidate, 100)
    expect(card(page).locator(".badge").first).to_have_text("last: succeeded")
    assert served_by(client) == {candidate}
    assert stack.api("GET", f"/v1/models/{MODEL}")[1]["stable"] == candidate
    history = page.locator("#history li.entry").first
    expect(history).to_have_attribute("data-phase", "succeeded")
    expect(history).to_contain_text(f"{stable} → {candidate}")


def test_abort_button_sends_envoy_traffic_back(page, stack, client):
    open_console(page, stack)
    stable, candidate = stable_and_candidate(stack)
    page.select_option("#rf-to", candidate)
    start_from_form(page, "90,100")
    expect_weight(page, candidate, 90)
    # Envoy may fail a version's share over to stable until its hosts pass a health check.
    wait_until(lambda: candidate in served_by(client, 5), message=f"{candidate} to serve")

    card(page).get_by_role("button", name="Abort").click()
    expect_weight(page, stable, 100)
    expect(card(page).locator(".badge").first).to_have_text("last: aborted")
    assert served_by(client) == {stable}
    expect(page.locator("#history li.entry").first).to_have_attribute("data-phase", "aborted")


def test_refused_actions_show_the_api_message(page, stack):
    open_console(page, stack)
    _, candidate = stable_and_candidate(stack)
    page.select_option("#rf-to", candidate)

    start_from_form(page, "10,abc")  # the API's validation message, naming the field
    error = page.locator("#rf-error")
    expect(error).to_contain_text("422")
    expect(error).to_contain_text("steps[2].set_weight")
    expect(page.locator("#rf-steps")).to_have_attribute("aria-invalid", "true")

    rollout = start_gated_canary(stack, candidate, 30)
    expect_weight(page, candidate, 30)
    start_from_form(page, "10,50")  # a second rollout on the same model
    expect(error).to_contain_text(f"already has an active rollout ({rollout['id']})")
    expect(error).to_contain_text("409")

    page.fill("#token", "not-the-token")
    page.click("text=Use token")
    expect(page.locator("#notice")).to_contain_text("missing or wrong bearer token")
    card(page).get_by_role("button", name="Promote").click()
    expect(page.locator("#notice")).to_contain_text("Refused (401 unauthorized)")
    status, after = stack.api("GET", f"/v1/rollouts/{rollout['id']}")
    assert status == 200 and after["phase"] == "paused", after  # the refused promote did nothing


def test_emergency_rollback_button_restores_the_stable_version(page, stack, client):
    open_console(page, stack)
    stable, candidate = stable_and_candidate(stack)
    start_gated_canary(stack, candidate, 90)
    expect_weight(page, candidate, 90)

    button = card(page).get_by_role("button", name="Emergency rollback")
    button.focus()
    page.keyboard.press("Enter")  # keyboard only: open, then Escape cancels
    dialog = page.locator("#confirm")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text(f"Emergency rollback of {MODEL}")
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    assert stack.api("GET", f"/v1/models/{MODEL}")[1]["active_rollout"]

    button.click()
    dialog.get_by_role("button", name="Roll back").click()
    expect(page.locator("#notice")).to_contain_text(f"Rolled back: {MODEL} → {stable}")
    expect_weight(page, stable, 100)
    expect(card(page).locator(".badge").first).to_have_text("last: aborted")
    assert served_by(client) == {stable}
    wait_until(lambda: not stack.api("GET", f"/v1/models/{MODEL}")[1]["active_rollout"])


def test_an_adapter_version_shows_the_model_whose_servers_run_it(page, stack, tmp_path):
    adapter = tmp_path / "support-v1"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    backend = {"adapter": {"base": MODEL, "path": str(adapter)}}
    status, body = stack.api("POST", "/v1/models", {"name": "support-bot", "versions": [
        {"name": "v1", "weight": 100, "backend": backend}]})  # fmt: skip
    assert status == 201, body
    open_console(page, stack)
    row = page.locator('article[data-model="support-bot"] table.versions tr[data-version="v1"]')
    tag = row.locator(".tag.adapter")
    expect(tag).to_have_text(f"LoRA on {MODEL}")
    expect(tag).to_have_attribute("title", f"served as support-bot--v1 by {MODEL}'s servers, "
                                  f"from {adapter}")  # fmt: skip
    expect(row).to_contain_text("active")
    expect(row).to_contain_text("http://127.0.0.1:")  # the base's servers
