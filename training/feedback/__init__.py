"""User corrections as training data: the SQLAlchemy models, their Alembic migrations and the store.

The page and the feedback API (serving/feedback/) write rows; `make finetune` (training/recipes/finetune.py)
reads them. It lives in `training` because the trainer reads it and the trainer never imports serving.
"""
