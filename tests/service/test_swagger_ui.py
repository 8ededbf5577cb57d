"""Swagger UI as a person uses it: headless Chromium, no internet, Try it out returns a job."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ready
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
# CI installs both (.ci/run); elsewhere the test is skipped when they are missing, never in CI.
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER) and not os.environ.get("CI"),
    reason="needs Debian's chromium and chromium-driver",
)


@pytest.fixture()
def browser():  # type: ignore[no-untyped-def]
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # type: ignore[assignment]
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,2000",
        f"--user-data-dir={tempfile.mkdtemp()}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.mark.usefixtures("worker")
def test_docs_list_methods_and_try_it_out_returns_a_job(browser, live_server: str, tenant: tuple[str, str]) -> None:  # type: ignore[no-untyped-def]
    wait = WebDriverWait(browser, 30)
    browser.get(live_server + "/docs")
    wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, ".opblock")))
    page = browser.find_element(By.TAG_NAME, "body").text
    for route in ("/v1/edits/sdedit", "/v1/generations/text-to-image", "/v1/jobs/{job_id}", "/v1/files"):
        assert route in page, route
    # Each operation is listed once, under one tag (`operations-<tag>-<operationId>`): job creation routes are
    # under their group (generations, edits, ...), not under `jobs` as well.
    blocks = [e.get_attribute("id") or "" for e in browser.find_elements(By.CSS_SELECTOR, ".opblock")]
    operation_ids = [block.split("-", 2)[2] for block in blocks]
    assert len(operation_ids) == len(set(operation_ids)), sorted(operation_ids)
    assert not [block for block in blocks if block.startswith("operations-jobs-create_")]
    # Every asset came from this server: nothing was fetched from a CDN.
    sources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert sources and all(s.startswith(live_server) for s in sources), sources

    # Authorize with the tenant's key.
    browser.find_element(By.CSS_SELECTOR, ".btn.authorize").click()
    field = wait.until(ready.visibility_of_element_located((By.CSS_SELECTOR, ".auth-container input")))
    field.send_keys(tenant[1])
    browser.find_element(By.CSS_SELECTOR, ".auth-btn-wrapper .btn.modal-btn.auth.authorize").click()
    browser.find_element(By.CSS_SELECTOR, ".btn-done").click()

    # Try it out on text-to-image with the schema's example.
    block = browser.find_element(By.ID, "operations-generations-create_text_to_image")
    block.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    # Its documented responses include the errors, each with the ErrorBody schema.
    documented = "table.responses-table:not(.live-responses-table) tr.response[data-code]"
    wait.until(lambda _: block.find_elements(By.CSS_SELECTOR, documented))
    codes = {row.get_attribute("data-code") for row in block.find_elements(By.CSS_SELECTOR, documented)}
    assert {"201", "400", "401", "413", "422"} <= codes, codes
    wait.until(lambda _: block.find_element(By.CSS_SELECTOR, ".try-out__btn")).click()
    wait.until(lambda _: block.find_element(By.CSS_SELECTOR, ".btn.execute")).click()
    status = wait.until(
        lambda _: block.find_element(By.CSS_SELECTOR, ".live-responses-table tr.response .response-col_status")
    )
    assert status.text.strip().startswith("201"), status.text
    body = block.find_element(By.CSS_SELECTOR, ".live-responses-table tr.response .response-col_description").text
    assert '"kind": "text-to-image"' in body and '"id": "job_' in body
