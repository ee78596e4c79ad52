"""Rewrite the README's TrainingArguments field list from the registry: ``python -m functrain.trainer.fields_readme``."""

from functrain.trainer.registry import README, readme_with_fields

if __name__ == "__main__":
    README.write_text(readme_with_fields(README.read_text()))
    print(f"rewrote the field list in {README}")
