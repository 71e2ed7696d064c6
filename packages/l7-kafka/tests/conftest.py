"""Kafka test harness: helper modules on sys.path, a real tansu broker, a proxy."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
