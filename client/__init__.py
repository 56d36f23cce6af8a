"""The Pli client: a practitioner's device. Builds, signs and encrypts cases; verifies and opens them."""
