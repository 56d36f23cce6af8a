"""The Pli relay: stores ciphertext envelopes, routes them, and never decrypts anything."""

from relay.app import create_app
from relay.config import RelayConfig, load_config

__all__ = ["RelayConfig", "create_app", "load_config"]
