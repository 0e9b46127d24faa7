"""Regenerate docs/configuration.md from the config dataclasses (tests/test_config.py checks it is current)."""

from pathlib import Path

from ringtrain.config import render_config_reference

if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    out.write_text(render_config_reference() + "\n")
    print(f"wrote {out}")
