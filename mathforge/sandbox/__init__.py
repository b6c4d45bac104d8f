"""NeMo-Skills-compatible code sandbox: `mathforge sandbox` (server.py), its isolated workers
(worker.py, limits.py, shell.py) and `SandboxProcess` to start it from other code (launcher.py)."""

from mathforge.sandbox.launcher import SandboxProcess, free_port

__all__ = ["SandboxProcess", "free_port"]
