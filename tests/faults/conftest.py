"""The fault-matrix suite's fixtures; its helpers live in faultkit.py."""

from faultkit import _clean_asrft_env  # noqa: F401 - an autouse fixture, registered by being here
