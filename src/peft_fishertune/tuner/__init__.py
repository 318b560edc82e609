"""The PEFT tuner: config -> layer -> model (PEFT's three-file layout)."""
