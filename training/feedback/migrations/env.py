"""Alembic's entry point: run on the connection the store passes in (training/feedback/store.py)."""

from alembic import context

from training.feedback.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
