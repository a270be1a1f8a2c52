"""What the keys suites (test_openai_sdk_keys.py, test_anthropic_sdk_keys.py)
share: the keyed gateway `cargo test --test sdk` starts for them
(`keys_with_the_python_sdks`: `auth: {mode: required}`, a key `sdk-good` that
may use the `fake-*` routes, an expired key `sdk-old`), given in the
environment. Without it (the other SDK run, whose gateway has no keys) the
suites are skipped.
"""

from __future__ import annotations

import os

import pytest

BASE = os.environ.get("PROMPTGATE_KEYS_BASE_URL", "")
GOOD = os.environ.get("PROMPTGATE_KEY_GOOD", "")
EXPIRED = os.environ.get("PROMPTGATE_KEY_EXPIRED", "")
BAD = "pg-this-key-was-never-issued-0000"
TEXT = "Hello from the fake upstream."
MESSAGES = [{"role": "user", "content": "Say hello."}]

needs_keyed_gateway = pytest.mark.skipif(
    not BASE, reason="needs the keyed gateway of tests/sdk.rs::keys_with_the_python_sdks"
)
