"""Keep secrets out of what athanor prints and writes.

Two kinds: credentials inside URLs (``http://user:secret@host``, e.g. in ``HF_ENDPOINT``), and
the values of secret environment variables (``HF_TOKEN``, ``WANDB_API_KEY``, ...) plus the token
``hf auth login`` stored, which a config can pull in with ``${oc.env:HF_TOKEN}``. Messages show
``***`` instead; a written config keeps the ``${oc.env:NAME}`` reference, so it still loads back
to the same value where that variable is set, and the file itself holds no secret.
"""
from __future__ import annotations

import os
import re
from typing import Any

# scheme://userinfo@ : the userinfo (user, user:password or a bare token) is the secret part.
URL_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
# Variable names that hold secrets (HF_TOKEN, HUGGING_FACE_HUB_TOKEN, WANDB_API_KEY,
# AWS_SECRET_ACCESS_KEY, ...); TOKENIZERS_PARALLELISM does not match.
SECRET_NAME = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIALS?)($|_)",
                         re.I)
MIN_SECRET_CHARS = 8  # shorter values ("1", "true") are settings, and replacing them would garble text
HIDDEN = "***"


def secret_values() -> dict[str, str]:
    """``{secret value: environment variable name}``; the stored Hub token counts as HF_TOKEN."""
    found: dict[str, str] = {}
    for name, value in os.environ.items():
        if SECRET_NAME.search(name) and len(value) >= MIN_SECRET_CHARS:
            found.setdefault(value, name)
    try:  # `hf auth login` writes the token to a file that HF_TOKEN does not show
        from huggingface_hub import get_token

        token = get_token()
    except Exception:
        token = None
    if token and len(token) >= MIN_SECRET_CHARS:
        found.setdefault(token, "HF_TOKEN")
    return found


def redact(text: str) -> str:
    """``text`` with URL credentials and secret values replaced by ``***`` (for messages)."""
    text = URL_CREDENTIALS.sub(lambda m: f"{m.group('scheme')}{HIDDEN}@", str(text))
    for value in sorted(secret_values(), key=len, reverse=True):
        text = text.replace(value, HIDDEN)
    return text


def unresolve_secrets(data: Any, secrets: dict[str, str] | None = None) -> Any:
    """A copy of a config container (dicts, lists, scalars) in which every secret value inside a
    string is written back as the ``${oc.env:NAME}`` interpolation it came from (or could have)."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(data, dict):
        return {k: unresolve_secrets(v, secrets) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [unresolve_secrets(v, secrets) for v in data]
    if isinstance(data, str):
        for value in sorted(secrets, key=len, reverse=True):
            data = data.replace(value, "${oc.env:" + secrets[value] + "}")
    return data


def holds_secret(text: str) -> bool:
    return bool(URL_CREDENTIALS.search(text)) or any(value in text for value in secret_values())
