"""The built-in demo policy and the public demo keys.

``guardproxy serve --demo`` without ``--policy`` loads ``DEMO_POLICY`` (package data next
to this module, so an installed wheel needs no checkout) and forwards to the fake model
it starts. The demo keys are published in the README: ``policy_warnings`` flags them in
any other policy.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

DEMO_POLICY = Path(__file__).with_name("demo.yaml")
DEMO_ACCOUNTS = Path(__file__).with_name("demo_accounts.yaml")
DEMO_KEYS = ("gp-demo-free", "gp-demo-pro")
# sha256 hex -> the public key it is the hash of
DEMO_KEY_HASHES = {hashlib.sha256(key.encode()).hexdigest(): key for key in DEMO_KEYS}
