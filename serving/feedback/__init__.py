"""Corrections from users: checked, rate-limited and stored (training/feedback/store.py) from the page
(serving/page.py) and from programs holding a feedback key (serving/feedback/api.py)."""
