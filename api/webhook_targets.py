"""A job's callback URL at submission: it must reach a public address, or one the allowlist names.

The rule is `contract.webhook_targets` (the worker applies it again at delivery); here a refusal is a 422 naming
`callback_url`, before anything is stored.
"""

from __future__ import annotations

from pydantic import AnyHttpUrl

from api.errors import invalid
from contract.webhook_targets import Allowlist, check_target
from store.settings import Settings


def check_callback_url(url: AnyHttpUrl | None, settings: Settings) -> None:
    """422 on `callback_url` when its host is, or resolves to, a private address, or does not resolve."""
    if url is None:
        return
    try:
        check_target(str(url), Allowlist.parse(settings.webhook_allow_private))
    except ValueError as exc:
        raise invalid("callback_url", str(exc)) from exc
