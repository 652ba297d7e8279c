"""Data preparation for tiny-shakespeare: see data/prepare.py."""
