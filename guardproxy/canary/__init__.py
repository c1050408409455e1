"""Output canaries: keyed marks in responses, and forensics."""
