"""Signed webhook delivery on a job's terminal state."""

from __future__ import annotations

import hashlib
import hmac
import json
import time

import httpx

from contract.jobs import JobOut
from store.tables import Job


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """`sha256=<hex>` of HMAC-SHA256(secret, timestamp + "." + body)."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def deliver(job: Job, secret: str, timeout: float) -> int:
    """POST the job to its callback URL; returns the HTTP status (raises on a network error)."""
    assert job.callback_url
    body = json.dumps({"event": f"job.{job.state}", "job": JobOut.of(job).model_dump(mode="json")}).encode()
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "X-Atelier-Event": f"job.{job.state}",
        "X-Atelier-Timestamp": timestamp,
        "X-Atelier-Signature": sign(secret, timestamp, body),
    }
    response = httpx.post(job.callback_url, content=body, headers=headers, timeout=timeout)
    return response.status_code
