"""Backend facts: what a runtime fuses, its dtype rules and kernel quirks, one module each."""
