"""Rewrite docs/config.md from the schema (`finetune.config.reference_markdown`); tests/test_config.py
fails when the file is stale."""

from pathlib import Path

from finetune.config import reference_markdown

if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "docs" / "config.md"
    out.write_text(reference_markdown())  # safe-write: the repository's own docs/
    print(f"wrote {out}")
