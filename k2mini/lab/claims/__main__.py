"""`python -m k2mini.lab.claims`: every checked claim with its notebook and negative control (Markdown)."""

from . import registry

claims = registry()
print(f"{len(claims)} checked claims\n")
print("| notebook | claim | what it says | negative control (makes it False in `pytest -m claim`) |")
print("|---|---|---|---|")
for c in claims:
    print(f"| {c.notebook} | `{c.name}` | {c.doc} | {c.control} |")
