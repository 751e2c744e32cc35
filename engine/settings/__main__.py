"""`python -m engine.settings`: print the README's configuration table."""

from engine.settings.variables import markdown_table

print(markdown_table())
