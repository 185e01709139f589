"""Shared pytest set-up: tests/ on sys.path for the helper modules kept there."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
