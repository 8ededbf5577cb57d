"""Signed webhook delivery on a job's terminal state."""

from __future__ import annotations

import hashlib
import hmac
import json
import time

import httpx

from contract.jobs import JobOut
from contract.webhook_targets import Allowlist, check_target
from store.tables import Job


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """`sha256=<hex>` of HMAC-SHA256(secret, timestamp + "." + body)."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def deliver(job: Job, secret: str, timeout: float, allow: Allowlist) -> int:
    """POST the job to its callback URL; returns the HTTP status (raises on a network error).

    The target is checked again first, as at submission, against what its name resolves to now: TargetRefused
    for a private address, TargetUnresolved for a name that does not resolve. Redirects are not followed."""
    assert job.callback_url
    check_target(job.callback_url, allow)
    body = json.dumps({"event": f"job.{job.state}", "job": JobOut.of(job).model_dump(mode="json")}).encode()
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "X-Atelier-Event": f"job.{job.state}",
        "X-Atelier-Timestamp": timestamp,
        "X-Atelier-Signature": sign(secret, timestamp, body),
    }
    response = httpx.post(job.callback_url, content=body, headers=headers, timeout=timeout, follow_redirects=False)
    return response.status_code
