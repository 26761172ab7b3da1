"""Alembic environment, shipped inside the package."""
